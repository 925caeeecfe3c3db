"""Running one job or one command: validate, bind the log context, execute, log the outcome.

The worker's actors and InstantJobScheduler share this path, so a job behaves the same in
development and in production. Commands a job publishes through ``ctx.command_bus`` are held until
``execute`` returns, then published (confirmed, on a worker) before the job's message is acked: a
job that fails sends none, and a job whose commands could not be published has failed.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from time import perf_counter
from typing import Any

import structlog
from dramatiq.errors import Retry
from pydantic import ValidationError
from structlog.contextvars import bound_contextvars

from jobflow.command import Command
from jobflow.context import CommandBus, CommandContext, JobContext
from jobflow.envelope import CommandEnvelope, JobEnvelope, describe_validation_error
from jobflow.errors import InvalidPayloadError, JobflowError, SchedulingError, TransientError
from jobflow.job import Job
from jobflow.log_config import get_logger, job_data_shown
from jobflow.registry import JobRegistry

logger: structlog.typing.FilteringBoundLogger = get_logger()

CoroutineRunner = Callable[[Coroutine[Any, Any, Any]], Any]


def run_coroutine_here(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run an async job from synchronous code that owns no event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise SchedulingError(
        "an async job cannot run synchronously inside a running event loop: use `await schedule_async(...)`"
    )


@contextmanager
def _observed(
    kind: str, fields: Mapping[str, Any], data: Mapping[str, Any], **started: Any
) -> Iterator[structlog.typing.FilteringBoundLogger]:
    """Bind the fields for everything logged inside, and log started / succeeded / failed once each.

    ``data`` (the job's or command's) is logged only where ``JOBFLOW_LOG_JOB_DATA`` allows it: it
    may hold secrets. An expected :class:`TransientError` is one line, without a traceback.
    """
    log = logger.bind(**fields)
    shown = {"data": dict(data)} if job_data_shown() else {}
    with bound_contextvars(**fields):
        log.info(f"{kind}.started", **started, **shown)
        t0 = perf_counter()
        try:
            yield log
        except BaseException as exc:
            expected = isinstance(exc, TransientError | Retry)
            (log.warning if expected else log.error)(
                f"{kind}.failed",
                duration_ms=round((perf_counter() - t0) * 1000, 3),
                error_type=type(exc).__name__,
                error=str(exc),
                exc_info=not expected,
                **shown,
            )
            raise
        log.info(f"{kind}.succeeded", duration_ms=round((perf_counter() - t0) * 1000, 3))


def _validated(cls: type[Job] | type[Command], envelope: JobEnvelope | CommandEnvelope, ident: str) -> Any:
    try:
        return cls.from_data(envelope.data)
    except ValidationError as exc:
        raise InvalidPayloadError(
            f"data rejected by {cls.__qualname__} ({envelope.name!r}, {envelope.version}):"
            f" {describe_validation_error(exc)}",
            name=envelope.name,
            version=envelope.version,
            job_id=ident,
        ) from None  # not chained: pydantic's message quotes the input, which may hold secrets


class HeldCommands:
    """The command bus a job sees: it keeps what the job publishes until the job has succeeded."""

    def __init__(self) -> None:
        self.held: list[tuple[CommandEnvelope, str | None]] = []

    def publish(self, envelope: CommandEnvelope, queue: str | None = None) -> None:
        self.held.append((envelope, queue))


class JobRunner:
    """Executes jobs and commands of one registry, with the given command bus and services."""

    def __init__(self, registry: JobRegistry, command_bus: CommandBus) -> None:
        self.registry = registry
        self.command_bus = command_bus

    def _job_fields(self, envelope: JobEnvelope, attempt: int, queue: str) -> dict[str, Any]:
        return {
            "job_id": envelope.job_id,
            "job_name": envelope.name,
            "job_version": envelope.version,
            "attempt": attempt,
            "queue": queue,
        }

    def _prepare_job(
        self, envelope: JobEnvelope, attempt: int, queue: str, log: structlog.typing.FilteringBoundLogger
    ) -> tuple[Job, JobContext, HeldCommands]:
        try:
            cls = self.registry.get(envelope.name, envelope.version)
        except JobflowError as exc:
            exc.job_id = envelope.job_id
            raise
        job: Job = _validated(cls, envelope, envelope.job_id)
        held = HeldCommands()
        ctx = JobContext(
            job_id=envelope.job_id,
            job_name=envelope.name,
            job_version=envelope.version,
            attempt=attempt,
            due_at=envelope.due_at,
            queue=queue,
            log=log,
            command_bus=held,
            services=self.registry.services,
        )
        return job, ctx, held

    def _release(self, held: HeldCommands) -> None:
        for envelope, queue in held.held:
            self.command_bus.publish(envelope, queue)

    def run_job(
        self,
        envelope: JobEnvelope,
        *,
        attempt: int,
        queue: str,
        run_coroutine: CoroutineRunner,
        due_at: datetime | None = None,
    ) -> None:
        """``due_at``, when the message carries one, overrides the envelope's: a retry is due when its backoff ends."""
        lateness = _lateness_ms(due_at or envelope.due_at)
        with _observed("job", self._job_fields(envelope, attempt, queue), envelope.data, lateness_ms=lateness) as log:
            job, ctx, held = self._prepare_job(envelope, attempt, queue, log)
            result = job.execute(ctx)
            if inspect.isawaitable(result):
                run_coroutine(_as_coroutine(result))
            self._release(held)

    async def run_job_async(self, envelope: JobEnvelope, *, attempt: int, queue: str) -> None:
        with _observed(
            "job", self._job_fields(envelope, attempt, queue), envelope.data, lateness_ms=_lateness_ms(envelope.due_at)
        ) as log:
            job, ctx, held = self._prepare_job(envelope, attempt, queue, log)
            result = job.execute(ctx)
            if inspect.isawaitable(result):
                await result
            self._release(held)

    def _command_fields(self, envelope: CommandEnvelope, attempt: int, queue: str) -> dict[str, Any]:
        return {
            "command_id": envelope.command_id,
            "command_name": envelope.name,
            "command_version": envelope.version,
            "job_id": envelope.job_id,
            "attempt": attempt,
            "queue": queue,
        }

    def _prepare_command(
        self, envelope: CommandEnvelope, attempt: int, queue: str, log: structlog.typing.FilteringBoundLogger
    ) -> tuple[Any, Callable[..., Any], CommandContext]:
        cls = self.registry.get_command(envelope.name, envelope.version)
        handler = self.registry.handler_for(envelope.name, envelope.version)
        command = _validated(cls, envelope, envelope.command_id)
        ctx = CommandContext(
            command_id=envelope.command_id,
            command_name=envelope.name,
            command_version=envelope.version,
            attempt=attempt,
            queue=queue,
            job_id=envelope.job_id,
            log=log,
            services=self.registry.services,
        )
        return command, handler, ctx

    def dispatch_command(
        self, envelope: CommandEnvelope, *, attempt: int, queue: str, run_coroutine: CoroutineRunner
    ) -> Any:
        with _observed("command", self._command_fields(envelope, attempt, queue), envelope.data) as log:
            command, handler, ctx = self._prepare_command(envelope, attempt, queue, log)
            result = handler(command, ctx)
            if inspect.isawaitable(result):
                result = run_coroutine(_as_coroutine(result))
            return result

    async def dispatch_command_async(self, envelope: CommandEnvelope, *, attempt: int, queue: str) -> Any:
        with _observed("command", self._command_fields(envelope, attempt, queue), envelope.data) as log:
            command, handler, ctx = self._prepare_command(envelope, attempt, queue, log)
            result = handler(command, ctx)
            if inspect.isawaitable(result):
                result = await result
            return result


def _as_coroutine(awaitable: Any) -> Coroutine[Any, Any, Any]:
    if inspect.iscoroutine(awaitable):
        return awaitable

    async def wrapped() -> Any:
        return await awaitable

    return wrapped()


def _lateness_ms(due_at: datetime) -> float:
    return round((datetime.now(UTC) - due_at).total_seconds() * 1000, 3)
