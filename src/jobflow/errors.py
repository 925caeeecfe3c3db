"""The exceptions jobflow raises.

Every real error derives from :class:`JobflowError`, which carries the job's (or command's)
name, version and id where they are known::

    JobflowError
     +-- ConfigurationError        a setting or argument that cannot work (bad URL, bad option)
     |    +-- JobflowTypeError     an argument of the wrong type, or a class keyword jobflow does not take
     +-- RegistrationError         a second class or handler claims a taken (name, version)
     +-- SchedulingError           misuse of a scheduler (delay and run_at together, naive datetime)
     +-- BrokerUnavailableError    the broker did not confirm in time (also a Dramatiq ConnectionClosed)
     +-- UnknownJobError           no job type is registered under (name, version)
     +-- UnknownCommandError       no command type or handler is registered under (name, version)
     +-- InvalidPayloadError       a message whose data the registered type rejects, or not an envelope
     +-- TransientError            raise it from a job: always retried (after ``retry_after``, if given)
     +-- PermanentError            raise it from a job: never retried, dead-lettered at once
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from dramatiq.errors import ConnectionClosed


class JobflowError(Exception):
    """Base of every jobflow error; carries the job's identity where it is known."""

    def __init__(
        self,
        message: str,
        *,
        name: str | None = None,
        version: int | None = None,
        job_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.name = name
        self.version = version
        self.job_id = job_id


class ConfigurationError(JobflowError, ValueError):
    """A setting or argument that cannot work."""


class JobflowTypeError(ConfigurationError, TypeError):
    """An argument of the wrong type, or a keyword jobflow does not take: also a ``TypeError``,
    which is what Python raises for such misuse, so code that expects that keeps working."""


class RegistrationError(JobflowError):
    """A second job class, command class or handler claims what another already holds."""


class SchedulingError(JobflowError, ValueError):
    """A scheduler was called with arguments that cannot be honoured."""


class BrokerUnavailableError(JobflowError, ConnectionClosed):
    """The broker did not take a message (or a declaration) within the deadline.

    Nothing that raised it was confirmed, so nothing is reported as scheduled; the broker may still
    hold a copy whose confirm was lost (at least once). ``broker`` is the URL with its password
    masked; ``job_ids`` lists every job of a bulk call that was not confirmed. It is also Dramatiq's
    ``ConnectionClosed``, so Dramatiq's worker restarts a consumer that meets it, as it always has.
    """

    def __init__(
        self,
        message: str,
        *,
        broker: str | None = None,
        name: str | None = None,
        version: int | None = None,
        job_id: str | None = None,
        job_ids: Sequence[str] = (),
    ) -> None:
        JobflowError.__init__(self, message, name=name, version=version, job_id=job_id)
        self.broker = broker
        self.job_ids = tuple(job_ids) or ((job_id,) if job_id else ())


class UnknownJobError(JobflowError, LookupError):
    """No job type is registered under the requested (name, version)."""


class UnknownCommandError(JobflowError, LookupError):
    """No command type, or no handler, is registered under the requested (name, version)."""


class InvalidPayloadError(JobflowError, ValueError):
    """A message that is not a jobflow envelope, or whose data the registered type rejects."""


class TransientError(JobflowError):
    """Raised by a job to say: this may work later, retry it.

    ``retry_after`` replaces the policy's backoff for this retry (a rate limit's Retry-After, say);
    the retry still counts as an attempt.
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after: timedelta | None = None,
        name: str | None = None,
        version: int | None = None,
        job_id: str | None = None,
    ) -> None:
        if retry_after is not None and (not isinstance(retry_after, timedelta) or retry_after < timedelta(0)):
            raise ConfigurationError(f"retry_after must be a timedelta >= 0, got {retry_after!r}")
        super().__init__(message, name=name, version=version, job_id=job_id)
        self.retry_after = retry_after


class PermanentError(JobflowError):
    """Raised by a job to say: this will never work, do not retry it."""
