"""Limits: how long one attempt may run, and how large a message may be.

A time limit is per job (or command) type, 10 minutes unless its class says otherwise; running
past it raises Dramatiq's ``TimeLimitExceeded`` in the job's thread, a transient failure. The size
limit (``JOBFLOW_MAX_PAYLOAD_BYTES``, 1 MiB) is enforced by the scheduler, with a clear error, and
by the worker's consumer, which dead-letters what is over it unread.
"""

from __future__ import annotations

import threading
from typing import Any

import dramatiq
from dramatiq.middleware import TimeLimit

from jobflow.errors import SchedulingError
from jobflow.middleware.targets import target_of

#: What the consumer tolerates over the limit: options middleware stamps on the way (due time,
#: retry count, delay bookkeeping) after the scheduler measured the message.
CONSUMER_HEADROOM_BYTES = 4096


class JobTimeLimit(TimeLimit):
    """Dramatiq's TimeLimit with the limit of the message's job or command type.

    It must come *after* the failure middleware in the broker's list: ``after_*`` hooks run in
    reverse, so the deadline is disarmed before a retry or dead letter is published and cannot
    interrupt that publish.
    """

    def __init__(self, *, interval: int = 1000) -> None:
        super().__init__(interval=interval)
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

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        limit = target_of(broker, message).options.time_limit
        self.manager.add_timeout(threading.get_ident(), limit.total_seconds() * 1000)  # type: ignore[no-untyped-call]


def check_payload_size(size: int, limit: int, *, name: str, version: int) -> None:
    """Refuse, at schedule time, a message the worker would dead-letter as too large."""
    if size > limit:
        raise SchedulingError(
            f"job ({name!r}, {version}) is {size} bytes as a message, over the limit of {limit} bytes"
            " (JOBFLOW_MAX_PAYLOAD_BYTES): keep large data in a store and pass the job a reference to it",
            name=name,
            version=version,
        )
