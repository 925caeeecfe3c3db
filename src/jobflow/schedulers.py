"""Schedulers: EventFlow's IJobScheduler, run now in-process or published to the broker."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from types import TracebackType
from typing import Protocol, runtime_checkable

import dramatiq
import structlog

from jobflow.broker import create_broker
from jobflow.broker.names import RUN_JOB_ACTOR, jobs_queue
from jobflow.envelope import (
    MAX_DELAY,
    CommandEnvelope,
    JobEnvelope,
    check_payload_size,
    make_envelope,
    requested_in_past,
)
from jobflow.job import Job
from jobflow.middleware.due_time import DUE_OPTION
from jobflow.registry import JobRegistry, default_registry
from jobflow.runner import JobRunner, run_coroutine_here
from jobflow.settings import Settings

logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("jobflow")

__all__ = ["MAX_DELAY", "BrokerJobScheduler", "InstantJobScheduler", "JobScheduler"]


@runtime_checkable
class JobScheduler(Protocol):
    """``schedule`` returns the job's id; a past ``run_at`` or a negative delay means now."""

    def schedule(self, job: Job, *, delay: timedelta | None = None, run_at: datetime | None = None) -> str: ...

    def schedule_now(self, job: Job) -> str: ...

    async def schedule_async(
        self, job: Job, *, delay: timedelta | None = None, run_at: datetime | None = None
    ) -> str: ...


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


def _ms(delta: timedelta) -> int:
    return max(0, int(delta / timedelta(milliseconds=1)))


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
        """Publish ``job``; returns its id once RabbitMQ confirmed it, or raises BrokerUnavailableError."""
        envelope = make_envelope(job, self.registry, delay=delay, run_at=run_at)
        past = requested_in_past(envelope.scheduled_at, delay, run_at)
        if past is not None:
            logger.info(
                "job.due_in_past", job_id=envelope.job_id, job_name=envelope.name, past_ms=_ms(past), runs="now"
            )
        due_ms = int(envelope.due_at.timestamp() * 1000)
        message: dramatiq.Message[None] = dramatiq.Message(
            queue_name=self.queue,
            actor_name=RUN_JOB_ACTOR,
            args=(envelope.to_wire(),),
            kwargs={},
            # The due time is the caller's: the broker counts the remaining delay from it when it
            # writes the message, so connecting or declaring first never makes the job late.
            options={DUE_OPTION: due_ms},
            message_id=envelope.job_id,
            message_timestamp=int(envelope.scheduled_at.timestamp() * 1000),
        )
        check_payload_size(
            len(message.encode()), self.settings.max_payload_bytes, name=envelope.name, version=envelope.version
        )
        self.broker.enqueue(message)
        logger.info(
            "job.scheduled",
            job_id=envelope.job_id,
            job_name=envelope.name,
            job_version=envelope.version,
            queue=self.queue,
            due_at=envelope.due_at.isoformat(),
            delay_ms=_ms(envelope.due_at - envelope.scheduled_at),
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
