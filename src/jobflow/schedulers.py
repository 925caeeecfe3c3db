"""Schedulers: EventFlow's IJobScheduler, run now in-process or published to the broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Protocol, runtime_checkable

import dramatiq
import structlog

from jobflow.broker.names import RUN_JOB_ACTOR, jobs_queue
from jobflow.broker.rabbitmq import create_broker
from jobflow.envelope import CommandEnvelope, JobEnvelope
from jobflow.errors import SchedulingError
from jobflow.job import Job
from jobflow.middleware.time_limit import check_payload_size
from jobflow.registry import JobRegistry, default_registry
from jobflow.runner import JobRunner, run_coroutine_here
from jobflow.settings import Settings

logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("jobflow")

#: The longest delay a scheduler accepts.
MAX_DELAY = timedelta(days=8 * 366)


@runtime_checkable
class JobScheduler(Protocol):
    """``schedule`` returns the job's id; a past ``run_at`` or a negative delay means now."""

    def schedule(self, job: Job, *, delay: timedelta | None = None, run_at: datetime | None = None) -> str: ...

    def schedule_now(self, job: Job) -> str: ...

    async def schedule_async(
        self, job: Job, *, delay: timedelta | None = None, run_at: datetime | None = None
    ) -> str: ...


def resolve_due(now: datetime, delay: timedelta | None, run_at: datetime | None) -> datetime:
    """When a job is due, refusing arguments that cannot mean one point in time."""
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


def make_envelope(
    job: Job, registry: JobRegistry, *, delay: timedelta | None = None, run_at: datetime | None = None
) -> JobEnvelope:
    """Check the job belongs to ``registry`` and wrap it with a fresh id and its due time."""
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
    return JobEnvelope(
        job_id=str(uuid.uuid4()),
        name=cls.job_name,
        version=cls.job_version,
        data=job.to_data(),
        scheduled_at=now,
        due_at=resolve_due(now, delay, run_at),
    )


class _CollectingCommandBus:
    """Holds the commands a job published so the instant scheduler dispatches them after it."""

    def __init__(self) -> None:
        self.published: list[CommandEnvelope] = []

    def publish(self, envelope: CommandEnvelope) -> None:
        self.published.append(envelope)


class InstantJobScheduler:
    """Runs each job now, in the caller (EventFlow's default): for development and tests.

    The job makes a JSON round trip first, so what would not survive the broker fails here too.
    A delay is ignored with a warning. The job's exception propagates to the caller.
    """

    queue = "instant"

    def __init__(self, registry: JobRegistry | None = None) -> None:
        self.registry = registry or default_registry

    def _prepare(
        self, job: Job, delay: timedelta | None, run_at: datetime | None
    ) -> tuple[JobEnvelope, JobRunner, _CollectingCommandBus]:
        envelope = make_envelope(job, self.registry, delay=delay, run_at=run_at)
        if envelope.due_at > envelope.scheduled_at:
            logger.warning(
                "job.delay_ignored",
                job_id=envelope.job_id,
                job_name=envelope.name,
                job_version=envelope.version,
                due_at=envelope.due_at.isoformat(),
                reason="InstantJobScheduler runs every job now",
            )
        bus = _CollectingCommandBus()
        return JobEnvelope.model_validate_json(envelope.model_dump_json()), JobRunner(self.registry, bus), bus

    def schedule(self, job: Job, *, delay: timedelta | None = None, run_at: datetime | None = None) -> str:
        envelope, runner, bus = self._prepare(job, delay, run_at)
        runner.run_job(envelope, attempt=1, queue=self.queue, run_coroutine=run_coroutine_here)
        for command in bus.published:
            runner.dispatch_command(_round_trip(command), attempt=1, queue=self.queue, run_coroutine=run_coroutine_here)
        return envelope.job_id

    def schedule_now(self, job: Job) -> str:
        return self.schedule(job)

    async def schedule_async(self, job: Job, *, delay: timedelta | None = None, run_at: datetime | None = None) -> str:
        envelope, runner, bus = self._prepare(job, delay, run_at)
        await runner.run_job_async(envelope, attempt=1, queue=self.queue)
        for command in bus.published:
            await runner.dispatch_command_async(_round_trip(command), attempt=1, queue=self.queue)
        return envelope.job_id


def _round_trip(envelope: CommandEnvelope) -> CommandEnvelope:
    return CommandEnvelope.model_validate_json(envelope.model_dump_json())


class BrokerJobScheduler:
    """Publishes each job as a persistent Dramatiq message and returns once the broker confirmed.

    ``url`` defaults to ``JOBFLOW_BROKER_URL``: ``memory://`` (in-process) or ``amqp(s)://``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        broker: dramatiq.Broker | None = None,
        settings: Settings | None = None,
        registry: JobRegistry | None = None,
    ) -> None:
        if settings is None:
            settings = Settings(broker_url=url) if url is not None else Settings()
        elif url is not None:
            settings = settings.model_copy(update={"broker_url": url})
        self.settings = settings
        self.registry = registry or default_registry
        self._owns_broker = broker is None
        self.broker = broker if broker is not None else create_broker(settings)
        self.queue = jobs_queue(settings.queue_prefix)
        self.broker.declare_queue(self.queue)

    def schedule(self, job: Job, *, delay: timedelta | None = None, run_at: datetime | None = None) -> str:
        envelope = make_envelope(job, self.registry, delay=delay, run_at=run_at)
        now_ms = int(time.time() * 1000)
        delay_ms = max(0, int((envelope.due_at - envelope.scheduled_at).total_seconds() * 1000))
        message: dramatiq.Message[None] = dramatiq.Message(
            queue_name=self.queue,
            actor_name=RUN_JOB_ACTOR,
            args=(envelope.to_wire(),),
            kwargs={},
            options={},
            message_id=envelope.job_id,
            message_timestamp=now_ms,
        )
        size = len(message.encode())
        check_payload_size(size, self.settings.max_payload_bytes, name=envelope.name, version=envelope.version)
        self.broker.enqueue(message, delay=delay_ms or None)
        logger.info(
            "job.scheduled",
            job_id=envelope.job_id,
            job_name=envelope.name,
            job_version=envelope.version,
            queue=self.queue,
            due_at=envelope.due_at.isoformat(),
            delay_ms=delay_ms,
        )
        return envelope.job_id

    def schedule_now(self, job: Job) -> str:
        return self.schedule(job)

    async def schedule_async(self, job: Job, *, delay: timedelta | None = None, run_at: datetime | None = None) -> str:
        # The publish blocks until the broker confirms: keep it off the event loop.
        return await asyncio.to_thread(self.schedule, job, delay=delay, run_at=run_at)

    def close(self) -> None:
        """Close the broker connections this scheduler opened."""
        if self._owns_broker:
            self.broker.close()

    def __enter__(self) -> BrokerJobScheduler:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
