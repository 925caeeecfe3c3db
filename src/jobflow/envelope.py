"""What travels as the actor's argument inside a Dramatiq message: (name, version, JSON data).

Also the rules of what a scheduler may send: when a job is due (a point in time fixed by the
caller, before anything talks to the broker), and how large its message may be.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from jobflow.errors import InvalidPayloadError, SchedulingError
from jobflow.job import Job
from jobflow.job_ids import new_job_id

if TYPE_CHECKING:
    from jobflow.registry import JobRegistry

#: The longest delay a scheduler accepts (the ladder holds 2**38 ms, about 8.7 years).
MAX_DELAY = timedelta(days=8 * 366)

#: A due time at most this far in the past is "now" without comment (a ``run_at=datetime.now(UTC)``).
PAST_TOLERANCE = timedelta(seconds=1)


def describe_validation_error(exc: ValidationError) -> str:
    """What pydantic rejected, by field, without the input values (job data may hold secrets)."""
    problems = [
        f"{'.'.join(str(part) for part in error['loc']) or '(root)'}: {error['msg']}"
        for error in exc.errors(include_url=False, include_input=False, include_context=False)
    ]
    return f"{exc.error_count()} validation error(s): " + "; ".join(problems)


class _Envelope(BaseModel):
    # Unknown keys are ignored so that an older worker can run what a newer producer wrote.
    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str = Field(min_length=1)
    version: int = Field(ge=1)
    data: dict[str, Any]

    @classmethod
    def parse(cls, raw: Any) -> Any:
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            # Not chained: pydantic's message quotes the input, which may hold secrets.
            raise InvalidPayloadError(f"not a valid {cls.__name__}: {describe_validation_error(exc)}") from None

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class JobEnvelope(_Envelope):
    """One scheduled job: its id, type, data and when it is due."""

    job_id: str = Field(min_length=1)
    scheduled_at: AwareDatetime
    due_at: AwareDatetime


class CommandEnvelope(_Envelope):
    """One command on its way to the command-bus actor."""

    command_id: str = Field(min_length=1)
    #: The job that published it, when a PublishCommandJob did.
    job_id: str | None = None
    sent_at: datetime


def envelope_identity(args: Any) -> tuple[str | None, int | None]:
    """(name, version) of the envelope in a message's arguments, read leniently: it may be poison."""
    raw = args[0] if isinstance(args, list | tuple) and len(args) == 1 and isinstance(args[0], dict) else {}
    name, version = raw.get("name"), raw.get("version")
    return (
        name if isinstance(name, str) and name else None,
        version if isinstance(version, int) and not isinstance(version, bool) else None,
    )


def resolve_due(now: datetime, delay: timedelta | None, run_at: datetime | None) -> datetime:
    """When a job is due; a past ``run_at`` or a negative delay means ``now``."""
    if delay is not None and run_at is not None:
        raise SchedulingError("give delay or run_at, not both")
    if delay is not None:
        if not isinstance(delay, timedelta):
            raise SchedulingError(f"delay must be a datetime.timedelta, not {type(delay).__name__}")
        due = now + max(delay, timedelta(0))
    elif run_at is not None:
        if not isinstance(run_at, datetime):
            raise SchedulingError(f"run_at must be a datetime.datetime, not {type(run_at).__name__}")
        if run_at.tzinfo is None or run_at.utcoffset() is None:
            raise SchedulingError(
                f"run_at must be timezone-aware (got naive {run_at.isoformat()}); e.g. datetime.now(UTC)"
            )
        due = max(run_at, now)
    else:
        due = now
    if due - now > MAX_DELAY:
        raise SchedulingError(f"a job can be delayed by at most {MAX_DELAY.days} days; got {due - now}")
    return due


def requested_in_past(now: datetime, delay: timedelta | None, run_at: datetime | None) -> timedelta | None:
    """How far in the past the caller asked for a job, when it was more than a slip of the clock."""
    if delay is not None and delay < -PAST_TOLERANCE:
        return -delay
    if run_at is not None and now - run_at > PAST_TOLERANCE:
        return now - run_at
    return None


def make_envelope(
    job: Job,
    registry: JobRegistry,
    *,
    delay: timedelta | None = None,
    run_at: datetime | None = None,
    job_id: str | None = None,
) -> JobEnvelope:
    """Check the job belongs to ``registry`` and wrap it with its due time and an id (a fresh one
    that carries the due time, unless a recurring schedule gives its occurrence's: then a past
    ``run_at`` stays the due time, so a missed occurrence run late is seen, and counted, as late)."""
    if not isinstance(job, Job):
        raise SchedulingError(f"a scheduler takes a jobflow.Job instance, not {type(job).__name__}")
    cls = type(job)
    registered = registry.get(cls.job_name, cls.job_version)
    if registered is not cls:
        raise SchedulingError(
            f"{cls.__qualname__} is not the class registered as ({cls.job_name!r}, {cls.job_version}) in this"
            f" scheduler's registry ({registered.__qualname__} is)",
            name=cls.job_name,
            version=cls.job_version,
        )
    now = datetime.now(UTC)
    due = run_at if job_id is not None and run_at is not None and delay is None else resolve_due(now, delay, run_at)
    return JobEnvelope(
        job_id=job_id or new_job_id(due),
        name=cls.job_name,
        version=cls.job_version,
        data=job.to_data(),
        scheduled_at=now,
        due_at=due,
    )


def check_payload_size(size: int, limit: int, *, name: str, version: int) -> None:
    """Refuse, at schedule time, a message the worker would dead-letter as too large."""
    if size > limit:
        raise SchedulingError(
            f"job ({name!r}, {version}) is {size} bytes as a message, over the limit of {limit} bytes"
            " (JOBFLOW_MAX_PAYLOAD_BYTES): keep large data in a store and pass the job a reference to it",
            name=name,
            version=version,
        )
