"""Skips a message whose job was cancelled: acknowledged, with a ``job.cancelled`` event, never run.

It runs right after :class:`~jobflow.middleware.shutdown.Shutdown`, before any middleware that
counts a start or could delay the message again: a cancelled job is not started, not re-timed and
not retried. A worker does not run its first message before its cancel reader caught up with the
stream (:mod:`jobflow.broker.cancels`), so a cancel made before it started is never missed.
"""

from __future__ import annotations

from typing import Any

import dramatiq
import structlog
from dramatiq.middleware import Middleware, SkipMessage

from jobflow.log_config import get_logger
from jobflow.metrics import instruments, labels_of
from jobflow.middleware.targets import target_of

#: How long a message waits for the cancel reader to catch up (the broker is unreachable meanwhile).
READY_WAIT_S = 30.0

logger: structlog.typing.FilteringBoundLogger = get_logger()


class Cancellations(Middleware):
    """Checks each message against the cancels its broker knows (``broker.cancellations``)."""

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        start = getattr(broker, "start_cancel_reader", None)
        if start is None:
            return
        if not start():
            logger.warning(
                "cancel.reader_not_ready",
                outcome="messages wait for the cancel stream to be read before they run",
            )

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        stop = getattr(broker, "stop_cancel_reader", None)
        if stop is not None:
            stop()

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        cancels = getattr(broker, "cancellations", None)
        if cancels is None:
            return
        reader = getattr(broker, "cancel_reader", None)
        if reader is not None and reader.running and not reader.ready.is_set():
            reader.wait_ready(READY_WAIT_S)  # a cancel made before the worker started must be known
        if not cancels.take(message.message_id):
            return
        target = target_of(broker, message)
        logger.info(
            "job.cancelled",
            job_id=message.message_id,
            job_name=target.name,
            job_version=target.version,
            queue=message.queue_name,
            attempt=int(message.options.get("retries", 0) or 0) + 1,
            outcome="acknowledged, not run",
        )
        instruments().cancelled.labels(*labels_of(message)).inc()
        raise SkipMessage("the job was cancelled")
