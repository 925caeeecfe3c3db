"""How long one attempt may run.

A jobflow job or command has the time limit of its type (10 minutes unless its class or registry
says otherwise); a plain Dramatiq actor keeps Dramatiq's rule (the message's ``time_limit``
option, else the actor's, else 10 minutes, in ms). Running past it raises Dramatiq's
``TimeLimitExceeded`` in the job's thread: a transient failure.
"""

from __future__ import annotations

import threading
from typing import Any

import dramatiq
from dramatiq.middleware import TimeLimit

from jobflow.middleware.targets import target_of


class JobTimeLimit(TimeLimit):
    """Dramatiq's TimeLimit with the limit of the message's job or command type.

    It must come *after* the failure middleware in the broker's list: ``after_*`` hooks run in
    reverse, so the deadline is disarmed before a retry or dead letter is published and cannot
    interrupt that publish (:func:`jobflow.middleware.stack` keeps that order; a test pins it).
    """

    def __init__(self, *, time_limit: float = 600_000, interval: int = 1000) -> None:
        super().__init__(time_limit=time_limit, interval=interval)
        self._started = False
        self._start_lock = threading.Lock()

    def _start(self, broker: dramatiq.Broker) -> None:
        with self._start_lock:
            if not self._started:
                self._started = True
                super().after_process_boot(broker)  # type: ignore[no-untyped-call]

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        self._start(broker)

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        # An in-process worker boots no process: start the watchdog with the worker instead.
        self._start(broker)

    def limit_ms(self, broker: dramatiq.Broker, message: Any) -> float:
        target = target_of(broker, message)
        if target.kind is not None:
            return target.options.time_limit.total_seconds() * 1000
        actor = broker.get_actor(message.actor_name)
        limit = message.options.get("time_limit") or actor.options.get("time_limit", self.time_limit)
        return float(limit)

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self.manager.add_timeout(threading.get_ident(), self.limit_ms(broker, message))  # type: ignore[no-untyped-call]
