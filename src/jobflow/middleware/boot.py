"""What a ``dramatiq`` worker process checks as it starts: that its broker's topology can work.

Declaring the ladder and the queues at process boot turns a configuration that cannot work (a
ladder or queue of another type, permissions refused) into one clear line and a non-zero exit,
instead of a consumer that logs CRITICAL every second forever. A broker that is merely down is
not fatal: the consumers keep trying to connect, as Dramatiq's always have.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import dramatiq
import structlog
from dramatiq.middleware import Middleware

from jobflow.broker.connection import redact_url
from jobflow.errors import BrokerUnavailableError, ConfigurationError
from jobflow.log_config import get_logger
from jobflow.middleware.targets import declare_routed_queues, registry_of
from jobflow.settings import Settings

logger: structlog.typing.FilteringBoundLogger = get_logger()

#: Dramatiq's exit code for "broker connection failed during worker start-up".
EXIT_FATAL = 3


def exit_fatally(error: BaseException) -> None:
    """One line that says what cannot work, then the process ends with :data:`EXIT_FATAL`."""
    logger.critical("worker.fatal_configuration", error=str(error), exit_code=EXIT_FATAL)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(EXIT_FATAL)  # from any thread: a consumer thread's SystemExit would end only that thread


class WorkerBoot(Middleware):
    """Declares the topology when a ``dramatiq`` worker process boots; exits on a fatal configuration."""

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        declare = getattr(broker, "declare_topology", None)
        if declare is None:
            return
        broker.on_fatal = exit_fatally  # type: ignore[attr-defined]  # consumers meeting one later exit too
        if isinstance(dramatiq.get_encoder(), dramatiq.PickleEncoder):
            exit_fatally(ConfigurationError("jobflow's broker does not unpickle: use a JSON or your own encoder"))
        try:
            declare()
        except ConfigurationError as exc:
            exit_fatally(exc)
        except BrokerUnavailableError as exc:
            logger.warning("worker.broker_unavailable", error=str(exc), outcome="consumers keep trying to connect")

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        # Dramatiq imports the job modules after process_boot: only now are their types, and the
        # queues they name, known; the worker consumes what is declared when it starts.
        declare_routed_queues(broker)

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        logger.info("worker.started", **describe_worker(broker, worker))
        start_watchdog = getattr(broker, "start_watchdog", None)  # the delay ladder's; one worker is elected
        if start_watchdog is not None:
            start_watchdog()
        start_schedules = getattr(broker, "start_schedule_driver", None)  # one worker is elected to drive
        if start_schedules is not None:
            start_schedules(registry_of(broker))

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        stop_watchdog = getattr(broker, "stop_watchdog", None)  # a daemon thread: it never holds the exit up
        if stop_watchdog is not None:
            stop_watchdog()
        stop_schedules = getattr(broker, "stop_schedule_driver", None)
        if stop_schedules is not None:
            stop_schedules()


def describe_worker(broker: dramatiq.Broker, worker: Any) -> dict[str, Any]:
    """What a worker serves, for its one start-up line: broker (password masked), queues, types and versions."""
    settings = getattr(broker, "settings", None)
    registry = registry_of(broker)
    jobs: dict[str, list[int]] = {}
    for job in registry.jobs():
        jobs.setdefault(job.job_name, []).append(job.job_version)
    commands: dict[str, list[int]] = {}
    for command in registry.commands():
        commands.setdefault(command.command_name, []).append(command.command_version)
    return {
        "broker": redact_url(settings.broker_url) if isinstance(settings, Settings) else type(broker).__name__,
        "queues": sorted(getattr(worker, "consumers", None) or broker.get_declared_queues()),
        "jobs": jobs,
        "commands": commands,
        "threads": getattr(worker, "worker_threads", None),
        "pid": os.getpid(),
    }
