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

from jobflow.errors import BrokerUnavailableError, ConfigurationError

logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("jobflow")

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

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        describe = getattr(broker, "describe_worker", None)
        if describe is not None:
            logger.info("worker.started", **describe(worker))
