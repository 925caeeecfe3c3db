"""jobflow's Dramatiq middleware, one per module, and the stack they run in.

The order matters and :func:`stack` is the one place that sets it (a test pins it): Dramatiq runs
``before_*`` hooks in list order and ``after_*`` hooks in reverse, so :class:`JobTimeLimit` comes
after :class:`Failures`: its deadline is disarmed before a retry or a dead letter is published, and
cannot interrupt that publish. :class:`Metrics` comes after Failures and :class:`DueTime`: it sees a
failed attempt before its retry is published, and never counts an early message as started.
:class:`Shutdown` comes first: once a worker's stop began it refuses a message before any other
middleware saw it; :class:`Cancellations` next: a cancelled job is skipped before anything counts,
re-times or runs it.
"""

from __future__ import annotations

from dramatiq.middleware import AsyncIO, CurrentMessage, Middleware, Retries, TimeLimit, default_middleware

from jobflow.middleware.boot import WorkerBoot
from jobflow.middleware.cancel import Cancellations
from jobflow.middleware.due_time import DUE_OPTION, DueTime, current_due_at
from jobflow.middleware.failures import Failures
from jobflow.middleware.metrics import Metrics
from jobflow.middleware.shutdown import DaemonAsyncIO, Shutdown
from jobflow.middleware.time_limit import JobTimeLimit


def stack(given: list[Middleware] | None = None) -> list[Middleware]:
    """Dramatiq's middleware (``given``, else its defaults) with jobflow's in their places.

    Retries becomes :class:`Failures` (its defaults carried over), TimeLimit becomes
    :class:`JobTimeLimit`; AsyncIO, CurrentMessage, :class:`DueTime`, :class:`WorkerBoot` and
    :class:`Metrics` are added when missing; AsyncIO becomes :class:`DaemonAsyncIO` and
    :class:`Shutdown` goes first, then :class:`Cancellations`.
    Failures is added even where Retries was left out: without it a failed message would be acked.
    """
    base = list(given) if given is not None else [m() for m in default_middleware]
    out: list[Middleware] = []
    time_limit = JobTimeLimit()
    shutdown = Shutdown()
    cancellations = Cancellations()
    for m in base:
        if isinstance(m, Retries):
            out.append(
                Failures(
                    max_retries=m.max_retries,
                    min_backoff=m.min_backoff,
                    max_backoff=m.max_backoff,
                    retry_when=m.retry_when,
                )
            )
        elif isinstance(m, JobTimeLimit):
            time_limit = m
        elif isinstance(m, TimeLimit):
            time_limit = JobTimeLimit(time_limit=m.time_limit)
        elif isinstance(m, Shutdown):
            shutdown = m
        elif isinstance(m, Cancellations):
            cancellations = m
        elif isinstance(m, AsyncIO) and not isinstance(m, DaemonAsyncIO):
            out.append(DaemonAsyncIO())
        else:
            out.append(m)
    for kind in (Failures, DaemonAsyncIO, CurrentMessage, DueTime, WorkerBoot, Metrics):
        if not any(isinstance(m, kind) for m in out):
            out.append(kind())
    return [shutdown, cancellations, *out, time_limit]


__all__ = [
    "DUE_OPTION",
    "Cancellations",
    "DaemonAsyncIO",
    "DueTime",
    "Failures",
    "JobTimeLimit",
    "Metrics",
    "Shutdown",
    "WorkerBoot",
    "current_due_at",
    "stack",
]
