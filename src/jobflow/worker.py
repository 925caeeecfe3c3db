"""The two actors a worker runs, and an in-process worker for development, tests and the demo."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import dramatiq
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.common import q_name
from dramatiq.middleware import CurrentMessage

from jobflow.broker.names import DISPATCH_COMMAND_ACTOR, RUN_JOB_ACTOR, commands_queue, jobs_queue, routed_queue
from jobflow.envelope import CommandEnvelope, JobEnvelope
from jobflow.errors import ConfigurationError, UnknownCommandError
from jobflow.log_config import hide_message_data
from jobflow.middleware.due_time import current_due_at
from jobflow.middleware.targets import declare_routed_queues
from jobflow.registry import JobRegistry, default_registry
from jobflow.runner import JobRunner
from jobflow.schedulers import prepare_queue
from jobflow.settings import Settings


def _queue(default: str) -> str:
    """The queue the running message came from (a routed type's, or the default one)."""
    message = CurrentMessage.get_current_message()
    return q_name(message.queue_name) if message is not None else default


def _attempt() -> int:
    message = CurrentMessage.get_current_message()
    return 1 + int(message.options.get("retries", 0)) if message is not None else 1


def _run_on_worker_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """Async jobs run on the AsyncIO middleware's event-loop thread; outside a worker, on a new loop."""
    loop_thread = get_event_loop_thread()
    if loop_thread is None:
        return asyncio.run(coro)
    return loop_thread.run_coroutine(coro)


class BrokerCommandBus:
    """Sends each command to its queue for the command-bus actor, confirmed by the broker.

    The queue is the one the publishing job named (``PublishCommandJob`` carries its command
    type's); without one, the command type's in ``registry`` if it is registered here, else the
    default ``<prefix>.commands``.
    """

    def __init__(self, broker: dramatiq.Broker, prefix: str, registry: JobRegistry) -> None:
        self.broker = broker
        self.prefix = prefix
        self.registry = registry
        self.queue_name = commands_queue(prefix)
        broker.declare_queue(self.queue_name)

    def _queue_of(self, envelope: CommandEnvelope, queue: str | None) -> str:
        if queue is None:
            try:
                queue = self.registry.get_command(envelope.name, envelope.version).__jobflow_queue__
            except UnknownCommandError:
                return self.queue_name
        target = routed_queue(self.prefix, queue)
        prepare_queue(self.broker, target)
        return target

    def publish(self, envelope: CommandEnvelope, queue: str | None = None) -> None:
        self.broker.enqueue(
            dramatiq.Message(
                queue_name=self._queue_of(envelope, queue),
                actor_name=DISPATCH_COMMAND_ACTOR,
                args=(envelope.to_wire(),),
                kwargs={},
                options={},
                message_id=envelope.command_id,
            )
        )


@dataclass(frozen=True)
class Actors:
    """The run-job and command-bus actors declared on one broker."""

    run_job: dramatiq.Actor[[dict[str, Any]], None]
    dispatch_command: dramatiq.Actor[[dict[str, Any]], None]
    runner: JobRunner
    queue_prefix: str


def settings_of(broker: dramatiq.Broker) -> Settings:
    """The settings ``broker`` was built with (a broker jobflow did not build: the environment's)."""
    settings = getattr(broker, "settings", None)
    return settings if isinstance(settings, Settings) else Settings()


def declare_actors(
    broker: dramatiq.Broker, *, registry: JobRegistry | None = None, settings: Settings | None = None
) -> Actors:
    """Declare jobflow's actors on ``broker`` once; later calls return the same actors.

    The queue prefix is the broker's own; ``settings``, if given, must agree with it.
    """
    prefix = settings_of(broker).queue_prefix
    if settings is not None and settings.queue_prefix != prefix:
        raise ConfigurationError(
            f"the broker was built for queue prefix {prefix!r}, not {settings.queue_prefix!r}:"
            " build the broker from these settings (jobflow.create_broker(settings))"
        )
    existing: Actors | None = getattr(broker, "_jobflow_actors", None)
    if existing is not None:
        if existing.queue_prefix != prefix or (registry is not None and registry is not existing.runner.registry):
            raise ConfigurationError(
                f"jobflow's actors are already declared on this broker with queue prefix {existing.queue_prefix!r}"
                " and another registry or prefix; use one broker per application"
            )
        return existing

    hide_message_data()  # Dramatiq's records of a message show its arguments: the job's data
    jobs_q, commands_q = jobs_queue(prefix), commands_queue(prefix)
    registry = registry or default_registry
    runner = JobRunner(registry, BrokerCommandBus(broker, prefix, registry))

    def run_job(envelope: dict[str, Any]) -> None:
        runner.run_job(
            JobEnvelope.parse(envelope),
            attempt=_attempt(),
            queue=_queue(jobs_q),
            run_coroutine=_run_on_worker_loop,
            due_at=current_due_at(),
        )

    def dispatch_command(envelope: dict[str, Any]) -> None:
        runner.dispatch_command(
            CommandEnvelope.parse(envelope),
            attempt=_attempt(),
            queue=_queue(commands_q),
            run_coroutine=_run_on_worker_loop,
        )

    actors = Actors(
        run_job=dramatiq.Actor(
            run_job, broker=broker, actor_name=RUN_JOB_ACTOR, queue_name=jobs_q, priority=0, options={}
        ),
        dispatch_command=dramatiq.Actor(
            dispatch_command,
            broker=broker,
            actor_name=DISPATCH_COMMAND_ACTOR,
            queue_name=commands_q,
            priority=0,
            options={},
        ),
        runner=runner,
        queue_prefix=prefix,
    )
    broker._jobflow_actors = actors  # type: ignore[attr-defined]  # one set per broker, found again by later calls
    return actors


class InProcessWorker:
    """A Dramatiq worker inside this process, for the in-memory broker (or a quick local run).

    Production workers are ``dramatiq jobflow.actors your.jobs``.
    """

    def __init__(
        self,
        broker: dramatiq.Broker,
        *,
        registry: JobRegistry | None = None,
        settings: Settings | None = None,
        threads: int = 4,
    ) -> None:
        self.actors = declare_actors(broker, registry=registry, settings=settings)
        self.broker = broker
        self._worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)

    def __enter__(self) -> InProcessWorker:
        self.start()
        return self

    def start(self) -> None:
        """Declare the topology (a configuration that cannot work raises here), then consume."""
        declare_routed_queues(self.broker)
        declare = getattr(self.broker, "declare_topology", None)
        if declare is not None:
            declare()
        self._worker.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        self._worker.stop()
