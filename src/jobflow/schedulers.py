"""Schedulers: EventFlow's IJobScheduler, run now in-process or published to the broker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import datetime, timedelta
from types import TracebackType
from typing import Protocol, runtime_checkable

import dramatiq
import structlog

from jobflow.broker import create_broker
from jobflow.broker.names import RUN_JOB_ACTOR, jobs_queue, routed_queue
from jobflow.broker.rabbitmq import JobflowRabbitmqBroker
from jobflow.cancel import CancelResult, check_job_id
from jobflow.envelope import (
    MAX_DELAY,
    CommandEnvelope,
    JobEnvelope,
    check_payload_size,
    make_envelope,
    requested_in_past,
)
from jobflow.errors import BrokerUnavailableError, SchedulingError
from jobflow.job import Job
from jobflow.log_config import get_logger
from jobflow.middleware.due_time import DUE_OPTION
from jobflow.registry import JobRegistry, default_registry
from jobflow.runner import JobRunner, run_coroutine_here
from jobflow.settings import Settings
from jobflow.versioned import check_queue_name

logger: structlog.typing.FilteringBoundLogger = get_logger()

__all__ = ["MAX_DELAY", "BrokerJobScheduler", "InstantJobScheduler", "JobScheduler"]


@runtime_checkable
class JobScheduler(Protocol):
    """``schedule`` returns the job's id; a past ``run_at`` or a negative delay means now."""

    def schedule(
        self, job: Job, *, delay: timedelta | None = None, run_at: datetime | None = None, queue: str | None = None
    ) -> str: ...

    def schedule_now(self, job: Job, *, queue: str | None = None) -> str: ...

    def schedule_many(
        self,
        jobs: Iterable[Job],
        *,
        delay: timedelta | None = None,
        run_at: datetime | None = None,
        queue: str | None = None,
    ) -> list[str]: ...

    async def schedule_many_async(
        self,
        jobs: Iterable[Job],
        *,
        delay: timedelta | None = None,
        run_at: datetime | None = None,
        queue: str | None = None,
    ) -> list[str]: ...

    async def schedule_async(
        self, job: Job, *, delay: timedelta | None = None, run_at: datetime | None = None, queue: str | None = None
    ) -> str: ...

    def cancel(self, job_id: str) -> CancelResult: ...

    def cancel_many(self, job_ids: Iterable[str]) -> list[CancelResult]: ...

    async def cancel_async(self, job_id: str) -> CancelResult: ...


class _CollectingCommandBus:
    """Holds the commands a job published so the instant scheduler dispatches them after it."""

    def __init__(self) -> None:
        self.published: list[CommandEnvelope] = []

    def publish(self, envelope: CommandEnvelope, queue: str | None = None) -> None:
        self.published.append(envelope)  # run here: the routing does not matter


class InstantJobScheduler:
    """Runs each job now, in the caller (EventFlow's default): for development and tests.

    The job makes a JSON round trip first, so what would not survive the broker fails here too.
    A delay is ignored with a warning. The job's exception propagates to the caller.
    """

    queue = "instant"

    def __init__(self, registry: JobRegistry | None = None) -> None:
        self.registry = registry or default_registry

    def close(self) -> None:
        """Nothing to close: there for code written against either scheduler."""

    def __enter__(self) -> InstantJobScheduler:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _prepare(
        self, job: Job, delay: timedelta | None, run_at: datetime | None, queue: str | None = None
    ) -> tuple[JobEnvelope, JobRunner, _CollectingCommandBus]:
        if queue is not None:
            check_queue_name(queue)  # accepted and ignored, as a delay is: but misuse still says so
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

    def schedule(
        self, job: Job, *, delay: timedelta | None = None, run_at: datetime | None = None, queue: str | None = None
    ) -> str:
        envelope, runner, bus = self._prepare(job, delay, run_at, queue)
        runner.run_job(envelope, attempt=1, queue=self.queue, run_coroutine=run_coroutine_here)
        for command in bus.published:
            runner.dispatch_command(_round_trip(command), attempt=1, queue=self.queue, run_coroutine=run_coroutine_here)
        return envelope.job_id

    def schedule_now(self, job: Job, *, queue: str | None = None) -> str:
        return self.schedule(job, queue=queue)

    def schedule_many(
        self,
        jobs: Iterable[Job],
        *,
        delay: timedelta | None = None,
        run_at: datetime | None = None,
        queue: str | None = None,
    ) -> list[str]:
        """Each job in turn, now; the first that raises stops the rest."""
        return [self.schedule(job, delay=delay, run_at=run_at, queue=queue) for job in jobs]

    async def schedule_many_async(
        self,
        jobs: Iterable[Job],
        *,
        delay: timedelta | None = None,
        run_at: datetime | None = None,
        queue: str | None = None,
    ) -> list[str]:
        return [await self.schedule_async(job, delay=delay, run_at=run_at, queue=queue) for job in jobs]

    def cancel(self, job_id: str) -> CancelResult:
        """A no-op that says so: every job of this scheduler ran when it was scheduled."""
        job_id = check_job_id(job_id)
        logger.info("job.cancel_ignored", job_id=job_id, reason="InstantJobScheduler runs every job at once")
        return CancelResult(job_id, recorded=False, pending=False)

    def cancel_many(self, job_ids: Iterable[str]) -> list[CancelResult]:
        return [self.cancel(job_id) for job_id in job_ids]

    async def cancel_async(self, job_id: str) -> CancelResult:
        return self.cancel(job_id)

    async def schedule_async(
        self, job: Job, *, delay: timedelta | None = None, run_at: datetime | None = None, queue: str | None = None
    ) -> str:
        envelope, runner, bus = self._prepare(job, delay, run_at, queue)
        await runner.run_job_async(envelope, attempt=1, queue=self.queue)
        for command in bus.published:
            await runner.dispatch_command_async(_round_trip(command), attempt=1, queue=self.queue)
        return envelope.job_id


def prepare_queue(broker: dramatiq.Broker, queue: str) -> None:
    """Have ``queue`` exist for publishing without making this process's worker consume it (a job
    that schedules to a routed queue must not turn its worker into a consumer of that queue)."""
    require = getattr(broker, "require_queue", None)
    if require is not None:
        require(queue)
    elif queue not in broker.get_declared_queues():
        broker.declare_queue(queue)  # the in-memory broker accepts messages only for declared queues


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
        #: The default queue (``<prefix>.jobs``); a type's ``queue=`` or a call's ``queue=`` routes elsewhere.
        self.queue = jobs_queue(settings.queue_prefix)
        self.broker.declare_queue(self.queue)
        self._routed = {self.queue}

    def schedule(
        self, job: Job, *, delay: timedelta | None = None, run_at: datetime | None = None, queue: str | None = None
    ) -> str:
        """Publish ``job``; returns its id once RabbitMQ confirmed it, or raises BrokerUnavailableError."""
        envelope, message = self._message(job, delay, run_at, queue)
        self.broker.enqueue(message)
        self._scheduled(envelope, message.queue_name)
        return envelope.job_id

    def schedule_now(self, job: Job, *, queue: str | None = None) -> str:
        return self.schedule(job, queue=queue)

    def schedule_many(
        self,
        jobs: Iterable[Job],
        *,
        delay: timedelta | None = None,
        run_at: datetime | None = None,
        queue: str | None = None,
    ) -> list[str]:
        """Publish every job with their confirms pipelined; returns their ids once all are confirmed.

        Every job is validated before the first is published. If some are not confirmed in time,
        :class:`BrokerUnavailableError` lists their ids in ``job_ids``; the others stay scheduled.
        """
        prepared = [self._message(job, delay, run_at, queue) for job in jobs]
        try:
            if isinstance(self.broker, JobflowRabbitmqBroker):
                self.broker.enqueue_many([message for _, message in prepared])
            else:  # the in-memory broker: no round trips to save
                self._enqueue_each([message for _, message in prepared])
        except BrokerUnavailableError as exc:
            unconfirmed = set(exc.job_ids)
            for envelope, message in prepared:
                if envelope.job_id not in unconfirmed:
                    self._scheduled(envelope, message.queue_name)
            raise
        for envelope, message in prepared:
            self._scheduled(envelope, message.queue_name)
        return [envelope.job_id for envelope, _ in prepared]

    async def schedule_async(
        self, job: Job, *, delay: timedelta | None = None, run_at: datetime | None = None, queue: str | None = None
    ) -> str:
        """:meth:`schedule` without blocking the event loop: every task shares the one publisher."""
        broker = self.broker
        if not isinstance(broker, JobflowRabbitmqBroker):  # the in-memory broker publishes at once
            return self.schedule(job, delay=delay, run_at=run_at, queue=queue)
        envelope, message = self._message(job, delay, run_at, queue)
        pending = broker.enqueue_start(message)
        await broker.publisher.wait_async(pending.future)
        broker.enqueue_finish(pending)
        self._scheduled(envelope, message.queue_name)
        return envelope.job_id

    async def schedule_many_async(
        self,
        jobs: Iterable[Job],
        *,
        delay: timedelta | None = None,
        run_at: datetime | None = None,
        queue: str | None = None,
    ) -> list[str]:
        """:meth:`schedule_many` for a coroutine (the confirms are awaited on a worker thread)."""
        return await asyncio.to_thread(self.schedule_many, list(jobs), delay=delay, run_at=run_at, queue=queue)

    def cancel(self, job_id: str) -> CancelResult:
        """Cancel a scheduled job: once this returns the cancel is durable, and no worker starts the
        job (a worker reads a new cancel within milliseconds; one started later reads it first).

        Cancelling a job that already ran, or an id never scheduled, is not an error: the broker
        cannot tell them apart from a pending job without walking every queue, so ``pending`` is None.
        """
        return self.cancel_many([job_id])[0]

    def cancel_many(self, job_ids: Iterable[str]) -> list[CancelResult]:
        """Cancel several jobs, their confirms pipelined; raises :class:`BrokerUnavailableError` with
        the ids whose cancel was not confirmed."""
        cancel_many = getattr(self.broker, "cancel_many", None)
        if cancel_many is None:
            raise SchedulingError(f"{type(self.broker).__name__} cannot cancel jobs: use jobflow's broker")
        results: list[CancelResult] = cancel_many(list(job_ids))
        for result in results:
            logger.info("job.cancel_recorded", job_id=result.job_id)
        return results

    async def cancel_async(self, job_id: str) -> CancelResult:
        """:meth:`cancel` for a coroutine (the confirm is awaited on a worker thread)."""
        return await asyncio.to_thread(self.cancel, job_id)

    def _enqueue_each(self, messages: list[dramatiq.Message[None]]) -> None:
        failed: list[str] = []
        first: BrokerUnavailableError | None = None
        for message in messages:
            try:
                self.broker.enqueue(message)
            except BrokerUnavailableError as exc:
                failed.append(message.message_id)
                first = first or exc
        if first is not None:
            raise BrokerUnavailableError(
                f"{len(failed)} of {len(messages)} jobs were not confirmed: {first}",
                broker=first.broker,
                job_ids=failed,
            ) from first

    def queue_for(self, job_type: type[Job], queue: str | None = None) -> str:
        """The RabbitMQ queue a job of ``job_type`` goes to: ``queue`` if given, else its type's."""
        name = check_queue_name(queue) if queue is not None else job_type.__jobflow_queue__
        target = routed_queue(self.settings.queue_prefix, name)
        if target not in self._routed:
            prepare_queue(self.broker, target)
            self._routed.add(target)
        return target

    def occurrence_message(
        self, job: Job, due_at: datetime, job_id: str, queue: str | None = None
    ) -> tuple[JobEnvelope, dramatiq.Message[None]]:
        """The message of a recurring schedule's occurrence, with the id the schedule derives."""
        return self._message(job, None, due_at, queue, job_id=job_id)

    def _message(
        self,
        job: Job,
        delay: timedelta | None,
        run_at: datetime | None,
        queue: str | None = None,
        *,
        job_id: str | None = None,
    ) -> tuple[JobEnvelope, dramatiq.Message[None]]:
        envelope = make_envelope(job, self.registry, delay=delay, run_at=run_at, job_id=job_id)
        past = requested_in_past(envelope.scheduled_at, delay, run_at)
        if past is not None and job_id is None:  # a missed occurrence is in the past by design
            logger.info(
                "job.due_in_past", job_id=envelope.job_id, job_name=envelope.name, past_ms=_ms(past), runs="now"
            )
        due_ms = int(envelope.due_at.timestamp() * 1000)
        message: dramatiq.Message[None] = dramatiq.Message(
            queue_name=self.queue_for(type(job), queue),
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
        return envelope, message

    def _scheduled(self, envelope: JobEnvelope, queue: str) -> None:
        logger.info(
            "job.scheduled",
            job_id=envelope.job_id,
            job_name=envelope.name,
            job_version=envelope.version,
            queue=queue,
            due_at=envelope.due_at.isoformat(),
            delay_ms=_ms(envelope.due_at - envelope.scheduled_at),
        )

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
