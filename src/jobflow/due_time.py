"""Every message carries the time it is due, so a worker can log lateness and never run early.

Dramatiq drops its own ``eta`` option once a delayed message is released, so jobflow stamps its
own ``due_ms`` (epoch milliseconds) on every enqueue: first schedules, delayed sends and retries.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import dramatiq
from dramatiq.common import current_millis
from dramatiq.middleware import CurrentMessage, Middleware

DUE_OPTION = "due_ms"


class DueTime(Middleware):
    """Stamps ``due_ms`` on each message as it is enqueued."""

    def before_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None) -> None:
        message.options[DUE_OPTION] = current_millis() + max(0, delay or 0)


def current_due_at() -> datetime | None:
    """When the message being processed was due, if its producer stamped it."""
    message = CurrentMessage.get_current_message()
    due = message.options.get(DUE_OPTION) if message is not None else None
    return datetime.fromtimestamp(due / 1000, UTC) if isinstance(due, int) else None
