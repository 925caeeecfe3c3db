"""Helpers for testing jobs: record outcomes, and make the in-memory broker's publishes fail.

``OutcomeTracker`` is a middleware that records each message's outcome, so a test can wait until
work is done. ``MemoryBroker.faults`` (:class:`PublishFaults`) refuses publishes or loses their
confirms on demand, so an application can check that its jobs survive a broker that fails.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.middleware import Middleware

from jobflow.broker.memory import MemoryBroker, PublishFaults, is_retry, to_actor

__all__ = ["MemoryBroker", "Outcome", "OutcomeTracker", "PublishFaults", "is_retry", "to_actor"]


@dataclass(frozen=True)
class Outcome:
    message_id: str
    actor_name: str
    args: tuple[Any, ...]
    error: str | None
    at: float
    #: The queue the message was consumed from.
    queue_name: str = ""


class OutcomeTracker(Middleware):
    """Remembers every processed message; ``wait_for`` blocks until a condition over them holds."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self._changed = threading.Condition()

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        outcome = Outcome(
            message_id=message.message_id,
            actor_name=message.actor_name,
            args=tuple(message.args),
            error=None if exception is None else f"{type(exception).__name__}: {exception}",
            at=time.time(),
            queue_name=message.queue_name,
        )
        with self._changed:
            self.outcomes.append(outcome)
            self._changed.notify_all()

    def succeeded(self, actor_name: str | None = None) -> list[Outcome]:
        with self._changed:
            return [o for o in self.outcomes if o.error is None and actor_name in (None, o.actor_name)]

    def wait_for(self, done: Any, timeout: float) -> bool:
        """Wait until ``done(tracker)`` is true; False when ``timeout`` seconds passed first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 0.1))
            return True
