"""Every message carries the time it is due, so a worker can log lateness and never run early.

Dramatiq drops its own ``eta`` option once a delayed message is released, so jobflow stamps its
own ``due_ms`` (epoch milliseconds) on every enqueue: first schedules, delayed sends and retries.
A scheduler stamps it itself, from the caller's ``delay`` or ``run_at``, before it publishes: the
broker computes the remaining delay from it when the message is written, so time spent connecting
or declaring never makes a job late.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import dramatiq
import structlog
from dramatiq.broker import MessageProxy
from dramatiq.common import current_millis
from dramatiq.middleware import CurrentMessage, Middleware, SkipMessage

from jobflow.broker.ladder import MAX_DELAY_MS
from jobflow.log_config import get_logger

DUE_OPTION = "due_ms"


#: An early message closer than this to its due time waits in the worker thread; a farther one
#: goes back into the broker's delay topology for the rest of its delay.
MAX_EARLY_SLEEP_MS = 25

logger: structlog.typing.FilteringBoundLogger = get_logger()


class DueTime(Middleware):
    """Stamps ``due_ms`` on each message as it is enqueued, and never lets one run before it.

    The broker cannot release a message early, but a producer whose clock runs ahead of the
    worker's can stamp a time still in the worker's future: such a message waits out the difference.
    """

    def before_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None) -> None:
        # A delay counts from now; without one, a due time the caller fixed (a scheduler's run_at,
        # set before anything talked to the broker) stands, and the broker holds the message until it.
        if delay is not None or not isinstance(message.options.get(DUE_OPTION), int):
            message.options[DUE_OPTION] = current_millis() + max(0, delay or 0)

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        due = message.options.get(DUE_OPTION)
        if not isinstance(due, int):
            return
        early = due - current_millis()
        if early <= 0:
            return
        if early <= MAX_EARLY_SLEEP_MS:
            time.sleep(early / 1000)
            return
        logger.warning("message.early", message_id=message.message_id, early_ms=early, queue=message.queue_name)
        try:
            broker.enqueue(message.copy(), delay=min(early, MAX_DELAY_MS))
        except Exception:
            # Not delayed again (broker trouble): neither run it early nor hold a thread for its
            # delay; failed, it is rejected, and RabbitMQ dead-letters it with its x-death header.
            logger.exception("message.early_requeue_failed", message_id=message.message_id)
            message.fail()
            raise SkipMessage(f"{early} ms early and could not be delayed again: rejected") from None
        raise SkipMessage(f"{early} ms early: delayed again")


def current_due_at() -> datetime | None:
    """When the message being processed was due, if its producer stamped it."""
    message = CurrentMessage.get_current_message()
    due = message.options.get(DUE_OPTION) if message is not None else None
    return datetime.fromtimestamp(due / 1000, UTC) if isinstance(due, int) else None
