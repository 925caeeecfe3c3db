"""Errors of the operators' commands, each with the exit code the command line ends with::

JobflowError
 +-- OperatorError        exit 1: the command ran but could not do everything asked
      +-- UsageProblem    exit 2: an argument that cannot work (as Click's own usage errors)
      +-- NotFoundError   exit 3: a dead letter (or other named thing) that is not there
      +-- BrokerError     exit 4: the broker is unreachable, refused us, or dropped the connection
"""

from __future__ import annotations

from jobflow.errors import JobflowError

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_BROKER = 4


class OperatorError(JobflowError):
    """An operator's command could not do all it was asked."""

    exit_code = EXIT_INCOMPLETE


class UsageProblem(OperatorError, ValueError):
    """An argument or option that cannot work."""

    exit_code = EXIT_USAGE


class NotFoundError(OperatorError, LookupError):
    """What the operator named is not there."""

    exit_code = EXIT_NOT_FOUND


class BrokerError(OperatorError):
    """The broker cannot be reached, refused the connection, or dropped it midway.

    ``broker`` is the URL with its password masked (the message says it too).
    """

    exit_code = EXIT_BROKER

    def __init__(
        self,
        message: str,
        *,
        broker: str | None = None,
        name: str | None = None,
        version: int | None = None,
        job_id: str | None = None,
    ) -> None:
        super().__init__(message, name=name, version=version, job_id=job_id)
        self.broker = broker
