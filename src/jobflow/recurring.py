"""Recurring jobs, declared in code beside the job: a stable name, a job, a cron expression or an interval.

Workers run them (:mod:`jobflow.broker.schedules`): no beat process to deploy. Each occurrence is an
ordinary job (versioned, retried, dead-lettered, cancellable) whose id is derived from the schedule's
name and the occurrence's time (:func:`jobflow.job_ids.occurrence_job_id`), so a second publication
of one occurrence is recognisable. An interval counts from the Unix epoch (``every=1h`` runs on the
hour, in UTC), so every worker computes the same occurrences; a cron expression is read in its
``timezone`` by croniter (DST included).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import ValidationError

from jobflow.errors import JobflowError, RegistrationError, SchedulingError, UnknownJobError
from jobflow.job import Job
from jobflow.job_ids import occurrence_job_id
from jobflow.registry import JobRegistry, default_registry
from jobflow.versioned import check_queue_name

#: What to do with occurrences that came due while no worker ran: run the last of them once, or skip them.
Missed = Literal["once", "skip"]

_RANDOM = re.compile(r"(^|,)[HR]($|[(/,])")
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
#: The shortest interval: occurrences are published ahead through the broker, one message each.
MIN_INTERVAL = timedelta(seconds=1)


@dataclass(frozen=True)
class RecurringSchedule:
    """One recurring schedule; make it with :func:`recurring`."""

    name: str
    job: Job
    cron: str | None = None
    every: timedelta | None = None
    timezone: str = "UTC"
    missed: Missed = "once"
    queue: str | None = None
    _zone: ZoneInfo = field(default=ZoneInfo("UTC"), repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_zone", ZoneInfo(self.timezone))

    def describe(self) -> str:
        if self.every is not None:
            return f"every {self.every.total_seconds():g} s"
        return f"cron {self.cron!r} ({self.timezone})"

    def occurrence_id(self, due_at: datetime) -> str:
        """The job id of the occurrence due at ``due_at``: cancel it to skip that one run."""
        if due_at.tzinfo is None:
            raise SchedulingError(f"schedule {self.name!r}: due_at must be timezone-aware, got {due_at.isoformat()}")
        at_ms = round(due_at.timestamp() * 1000)
        if self.next_after(at_ms - 1) != at_ms:
            raise SchedulingError(
                f"schedule {self.name!r} ({self.describe()}) has no occurrence at {due_at.isoformat()}"
            )
        return occurrence_job_id(self.name, datetime.fromtimestamp(at_ms / 1000, UTC))

    def next_after(self, after_ms: int) -> int:
        """The first occurrence strictly after ``after_ms`` (epoch ms)."""
        if self.every is not None:
            step = round(self.every.total_seconds() * 1000)
            return (after_ms // step + 1) * step
        assert self.cron is not None
        start = datetime.fromtimestamp(after_ms / 1000, UTC).astimezone(self._zone)
        times = croniter(self.cron, start)
        for _ in range(4):  # a repeated hour holds at most one candidate to pass over
            following: datetime = times.get_next(datetime)
            if not self._repeated(following):
                break
        return round(following.timestamp() * 1000)

    def _repeated(self, local: datetime) -> bool:
        """The second pass of a wall time the clocks went back over, for a job at a fixed hour:
        like cron, a daily job at 02:30 runs once on that night (hourly ones run in both passes)."""
        assert self.cron is not None
        if self.cron.split()[1] == "*":
            return False
        first = local.replace(fold=0)
        return local.fold == 1 or first.utcoffset() != local.utcoffset()

    def occurrences(self, after_ms: int, until_ms: int, limit: int = 1000) -> list[int]:
        """Occurrences in (``after_ms``, ``until_ms``], at most ``limit`` of the first."""
        found: list[int] = []
        at = self.next_after(after_ms)
        while at <= until_ms and len(found) < limit:
            found.append(at)
            at = self.next_after(at)
        return found

    def last_at_or_before(self, at_ms: int, since_ms: int) -> int | None:
        """The latest occurrence in (``since_ms``, ``at_ms``], or None (what ``missed="once"`` runs)."""
        if self.every is not None:
            step = round(self.every.total_seconds() * 1000)
            latest = at_ms // step * step
            return latest if latest > since_ms else None
        assert self.cron is not None
        # From a point safely before the latest candidate, step with next_after: both agree by
        # construction, across DST too (croniter's get_prev is unreliable in a repeated hour).
        end = datetime.fromtimestamp(at_ms / 1000, UTC).astimezone(self._zone) + timedelta(milliseconds=1)
        previous: datetime = croniter(self.cron, end).get_prev(datetime)
        at = max(since_ms, round(previous.timestamp() * 1000) - 3 * 3_600_000)
        found: int | None = None
        for _ in range(10_000):
            at = self.next_after(at)
            if at > at_ms:
                break
            found = at
        return found


def recurring(
    name: str,
    job: Job | type[Job],
    *,
    data: Mapping[str, Any] | None = None,
    cron: str | None = None,
    every: timedelta | None = None,
    timezone: str = "UTC",
    missed: Missed = "once",
    queue: str | None = None,
    registry: JobRegistry | None = None,
) -> RecurringSchedule:
    """Declare a recurring schedule of ``job`` (module level, beside the job's class).

    ``job`` is a job instance, or a job class and its ``data`` (validated now, not at the first run).
    Give ``cron`` (five fields, read in ``timezone``) or ``every`` (at least one second). ``name`` is
    the schedule's identity across deploys: renaming it starts a new schedule. Declaring the same
    name again with the same definition (a module imported twice) is harmless; with another, an error.
    """
    registry = registry or default_registry
    if not isinstance(name, str) or not _NAME.match(name):
        raise RegistrationError(f"a schedule name is 1-200 letters, digits and _.:-, got {name!r}")
    job = _instance(name, job, data)
    cls = type(job)
    try:
        known = registry.get(cls.job_name, cls.job_version)
    except UnknownJobError:
        known = None
    if known is not cls:
        raise RegistrationError(f"schedule {name!r}: {cls.__qualname__} is not registered in this registry")
    _check_timing(name, cron, every)
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise RegistrationError(f"schedule {name!r}: unknown timezone {timezone!r}") from None
    if missed not in ("once", "skip"):
        raise RegistrationError(f"schedule {name!r}: missed= is 'once' or 'skip', got {missed!r}")
    if queue is not None:
        try:
            check_queue_name(queue)
        except JobflowError as exc:
            raise RegistrationError(f"schedule {name!r}: {exc}") from None
    if every is not None and timezone != "UTC":
        raise RegistrationError(f"schedule {name!r}: every= counts from the epoch in UTC; timezone= goes with cron=")
    schedule = RecurringSchedule(name, job, cron, every, timezone, missed, queue, zone)
    try:
        schedule.next_after(0)
    except Exception as exc:  # croniter accepts "0 0 31 2 *", then finds no date
        raise RegistrationError(f"schedule {name!r}: {cron!r} never comes due ({type(exc).__name__})") from None
    registry.add_schedule(schedule)
    return schedule


def _check_timing(name: str, cron: str | None, every: timedelta | None) -> None:
    if (cron is None) == (every is None):
        raise RegistrationError(f"schedule {name!r}: give cron= or every=, exactly one")
    if every is not None:
        if not isinstance(every, timedelta) or every < MIN_INTERVAL:
            raise RegistrationError(f"schedule {name!r}: every= is a timedelta of at least 1 second, got {every!r}")
        if every % timedelta(milliseconds=1):
            raise RegistrationError(f"schedule {name!r}: every= must be whole milliseconds, got {every!r}")
    if cron is not None and (not isinstance(cron, str) or len(cron.split()) != 5 or not croniter.is_valid(cron)):
        raise RegistrationError(f"schedule {name!r}: {cron!r} is not a five-field cron expression")
    if cron is not None and any(_RANDOM.search(f) for f in cron.upper().split()):  # croniter's R and H forms
        raise RegistrationError(f"schedule {name!r}: {cron!r}: R and H differ per process; every worker must agree")


def _instance(name: str, job: object, data: Mapping[str, Any] | None) -> Job:
    if isinstance(job, type) and issubclass(job, Job):
        try:
            return job.model_validate(dict(data or {}))
        except ValidationError as exc:
            wrong = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors())
            raise RegistrationError(f"schedule {name!r}: data= is not a valid {job.job_name} ({wrong})") from None
    if not isinstance(job, Job):
        raise RegistrationError(f"schedule {name!r}: job must be a jobflow.Job instance or class, not {job!r}")
    if data is not None:
        raise RegistrationError(f"schedule {name!r}: data= goes with a job class; this job is an instance")
    return job
