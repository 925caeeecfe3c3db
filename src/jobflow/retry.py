"""Retry policies: how often, how soon, and for which exceptions a failed job is tried again.

Defaults, and why (compare Hangfire: 10 attempts over about 7 hours; NServiceBus: 5 immediate
then 3 delayed retries within a minute; Dramatiq: 20 retries over about a month, which users find
too aggressive): **10 attempts**, the first retry after **15 s**, doubling, **capped at 1 hour**,
with **equal jitter** (each delay drawn between half and all of its step). That is about two hours
from the first failure to the dead-letter queue: long enough to outlive a deploy, a failover or a
short outage of a dependency, short enough that a broken job reaches an operator the same working
day instead of hiding in retries for a month. Jitter spreads the jobs an outage failed together so
they do not come back as one wave. Every exception is transient unless it says otherwise: like
Hangfire and Dramatiq, an unforeseen exception is retried, because most are (timeouts, deadlocks,
connection resets).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal, NamedTuple

from dramatiq.errors import Retry
from dramatiq.middleware import Interrupt, TimeLimitExceeded

from jobflow.errors import (
    ConfigurationError,
    InvalidPayloadError,
    PermanentError,
    TransientError,
    UnknownCommandError,
    UnknownJobError,
)

#: The longest retry delay a job may ask for: the delay topology's reach, like schedulers.MAX_DELAY.
MAX_RETRY_DELAY = timedelta(days=8 * 366)

#: How long one attempt may run unless its type says otherwise; overrunning is a transient failure.
DEFAULT_TIME_LIMIT = timedelta(minutes=10)

ExceptionTypes = tuple[type[BaseException], ...]
Verdict = Literal["transient", "permanent"]

# Raised by jobflow itself when a message can never succeed, whatever a policy says.
_ALWAYS_PERMANENT: ExceptionTypes = (PermanentError, UnknownJobError, UnknownCommandError, InvalidPayloadError)
# Time limits, Dramatiq's Retry and thread interrupts (shutdown) say nothing about the job's input.
_ALWAYS_TRANSIENT: ExceptionTypes = (TransientError, Retry, Interrupt)


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts, backoff and transient exceptions of one job or command type (or the default).

    ``max_attempts`` counts the first run (1: never retry). The delay before retry *n* (n >= 1) is
    ``min(max_backoff, backoff * multiplier**(n-1))``, then reduced by up to ``jitter`` of itself
    at random, so ``max_backoff`` is a true upper bound. An exception is retried when it is a
    :class:`~jobflow.TransientError` (always), else when it matches ``transient`` and not
    ``permanent``; a :class:`~jobflow.PermanentError` never is. A time limit counts as transient.
    """

    max_attempts: int = 10
    backoff: timedelta = timedelta(seconds=15)
    max_backoff: timedelta = timedelta(hours=1)
    multiplier: float = 2.0
    jitter: float = 0.5
    transient: ExceptionTypes = field(default=(Exception,))
    permanent: ExceptionTypes = field(default=())

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be an int >= 1, got {self.max_attempts!r}")
        for name in ("backoff", "max_backoff"):
            value = getattr(self, name)
            if not isinstance(value, timedelta) or value < timedelta(0):
                raise ConfigurationError(f"{name} must be a timedelta >= 0, got {value!r}")
        if self.max_backoff > MAX_RETRY_DELAY:
            raise ConfigurationError(f"max_backoff must be at most {MAX_RETRY_DELAY.days} days")
        if not isinstance(self.multiplier, int | float) or self.multiplier < 1:
            raise ConfigurationError(f"multiplier must be a number >= 1, got {self.multiplier!r}")
        if not isinstance(self.jitter, int | float) or not 0 <= self.jitter <= 1:
            raise ConfigurationError(f"jitter must be between 0 and 1, got {self.jitter!r}")
        for name in ("transient", "permanent"):
            types = getattr(self, name)
            if not isinstance(types, tuple) or not all(
                isinstance(t, type) and issubclass(t, BaseException) for t in types
            ):
                raise ConfigurationError(f"{name} must be a tuple of exception classes, got {types!r}")

    def delay(self, retry: int, *, rng: random.Random | None = None) -> timedelta:
        """The backoff before retry number ``retry`` (1 for the first retry), jitter included."""
        cap = self.max_backoff.total_seconds()
        try:
            step = min(cap, self.backoff.total_seconds() * self.multiplier ** max(0, retry - 1))
        except OverflowError:  # thousands of attempts: long past the cap
            step = cap
        return timedelta(seconds=step * (1 - self.jitter * (rng or random).random()))

    def verdict(self, exc: BaseException) -> Verdict:
        """Whether ``exc`` may go away on its own (retry) or never will (dead-letter at once)."""
        if isinstance(exc, _ALWAYS_PERMANENT):
            return "permanent"
        if isinstance(exc, _ALWAYS_TRANSIENT):
            return "transient"
        if isinstance(exc, self.permanent) or not isinstance(exc, self.transient):
            return "permanent"
        return "transient"


#: The policy of every type that sets none, unless the registry's ``retry_policy`` is changed.
DEFAULT_RETRY_POLICY = RetryPolicy()


class TypeOptions(NamedTuple):
    """What a job or command type sets for its executions (its class options, else the registry's)."""

    retry: RetryPolicy
    time_limit: timedelta


def check_time_limit(value: object) -> timedelta:
    if not isinstance(value, timedelta) or value <= timedelta(0):
        raise ConfigurationError(f"time_limit must be a timedelta > 0, got {value!r}")
    return value


def requested_delay(exc: BaseException) -> timedelta | None:
    """The delay a job asked for (``TransientError(retry_after=...)``, ``dramatiq.Retry(delay=ms)``)."""
    if isinstance(exc, TransientError) and exc.retry_after is not None:
        return min(exc.retry_after, MAX_RETRY_DELAY)
    if isinstance(exc, Retry) and isinstance(exc.delay, int | float) and exc.delay >= 0:
        return min(timedelta(milliseconds=exc.delay), MAX_RETRY_DELAY)
    return None


def is_time_limit(exc: BaseException) -> bool:
    return isinstance(exc, TimeLimitExceeded)
