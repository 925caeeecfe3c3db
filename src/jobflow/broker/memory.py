"""The in-memory broker, for development, tests and the demo (like Hangfire's in-memory storage).

It is Dramatiq's stub broker with jobflow's middleware, and a publish seam that can fail on demand
(:class:`PublishFaults`), so the no-loss paths (a retry or a command whose publish fails) are
tested without RabbitMQ too. Its messages, and its delays, live in the process and die with it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import current_millis

from jobflow.broker.local_schedules import LocalScheduleDriver
from jobflow.cancel import CancelResult, CancelSet, check_job_id, hold_until_ms
from jobflow.errors import BrokerUnavailableError
from jobflow.middleware import stack
from jobflow.settings import Settings

if TYPE_CHECKING:
    from jobflow.registry import JobRegistry

Match = Callable[[dramatiq.Message[Any], int | None], bool]
Fault = Literal["refuse", "lose_confirm"]


@dataclass
class _Rule:
    fault: Fault
    times: int
    when: Match | None


@dataclass
class PublishFaults:
    """Publishes of one in-memory broker that fail, as RabbitMQ's can.

    ``refuse``: the publish raises :class:`~jobflow.BrokerUnavailableError` and nothing is enqueued
    (the broker never had it). ``lose_confirm``: the message is enqueued, then the publish raises
    (its confirm was lost): a caller that tries again makes a duplicate. ``when(message, delay)``
    picks the publishes a rule applies to; each rule applies ``times`` times.
    """

    refused: list[dramatiq.Message[Any]] = field(default_factory=list)
    unconfirmed: list[dramatiq.Message[Any]] = field(default_factory=list)
    _rules: list[_Rule] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def refuse(self, times: int = 1, *, when: Match | None = None) -> None:
        with self._lock:
            self._rules.append(_Rule("refuse", times, when))

    def lose_confirm(self, times: int = 1, *, when: Match | None = None) -> None:
        with self._lock:
            self._rules.append(_Rule("lose_confirm", times, when))

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def take(self, message: dramatiq.Message[Any], delay: int | None) -> Fault | None:
        """The fault for this publish, if a rule applies (and counts it)."""
        with self._lock:
            for rule in self._rules:
                if rule.times > 0 and (rule.when is None or rule.when(message, delay)):
                    rule.times -= 1
                    return rule.fault
        return None


def is_retry(message: dramatiq.Message[Any], _delay: int | None) -> bool:
    """Matches the publish of a retry (an attempt after the first)."""
    return int(message.options.get("retries", 0) or 0) >= 1


def to_actor(name: str) -> Match:
    """Matches publishes of messages for the actor ``name``."""
    return lambda message, _delay: message.actor_name == name


class MemoryBroker(StubBroker):
    """Dramatiq's stub broker with jobflow's middleware and failing publishes on demand."""

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__(middleware=stack())
        self.settings = settings or Settings(broker_url="memory://")
        self.faults = PublishFaults()
        #: Cancels are kept in the process, as the broker's messages are.
        self.cancellations = CancelSet()
        #: Started by an in-process worker whose registry declares recurring schedules (WorkerBoot).
        self.schedule_driver: LocalScheduleDriver | None = None

    def start_schedule_driver(self, registry: JobRegistry) -> None:
        """Drive ``registry``'s recurring schedules from this process (the first worker does)."""
        if not registry.schedules() or self.schedule_driver is not None:
            return
        self.schedule_driver = LocalScheduleDriver(self, registry)
        self.schedule_driver.start()

    def stop_schedule_driver(self) -> None:
        driver, self.schedule_driver = self.schedule_driver, None
        if driver is not None:
            driver.stop()

    def cancel_many(self, job_ids: Sequence[str]) -> list[CancelResult]:
        """Record a cancel of each job: the in-process workers skip it when it comes due."""
        now = current_millis()
        results = []
        for job_id in (check_job_id(j) for j in job_ids):
            until = hold_until_ms(job_id, now)
            self.cancellations.add(job_id, until, now)
            results.append(CancelResult(job_id, recorded=True, pending=None, until_ms=until))
        return results

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        fault = self.faults.take(message, delay)
        if fault == "refuse":
            self.faults.refused.append(message)
            raise BrokerUnavailableError(
                f"the in-memory broker refused message {message.message_id} (PublishFaults.refuse)",
                broker=self.settings.broker_url,
                job_id=message.message_id,
            )
        enqueued = super().enqueue(message, delay=delay)
        if fault == "lose_confirm":
            self.faults.unconfirmed.append(enqueued)
            raise BrokerUnavailableError(
                f"the in-memory broker lost the confirm of message {message.message_id} (PublishFaults.lose_confirm)",
                broker=self.settings.broker_url,
                job_id=message.message_id,
            )
        return enqueued


_memory_brokers: dict[str, MemoryBroker] = {}
_memory_lock = threading.Lock()


def memory_broker(url: str = "memory://", settings: Settings | None = None) -> MemoryBroker:
    """The process-wide in-memory broker for this URL: schedulers and in-process workers share it.

    The first call for a URL fixes its settings (queue prefix, limits); later ones get that broker.
    """
    with _memory_lock:
        broker = _memory_brokers.get(url)
        if broker is None:
            given = settings or Settings(broker_url=url)
            broker = _memory_brokers[url] = MemoryBroker(given.model_copy(update={"broker_url": url}))
        return broker
