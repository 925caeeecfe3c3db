"""Recurring schedules on the in-memory broker: a thread in the process, for development and demos.

Like the broker's messages, its state lives in the process: occurrences that came due while it did
not run are handled as ``missed`` says only within the process's life. In production the elected
driver of :mod:`jobflow.broker.schedules` keeps the state in RabbitMQ.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from dramatiq.common import current_millis

from jobflow.broker.schedules import plan_occurrences
from jobflow.job_ids import occurrence_job_id
from jobflow.log_config import get_logger

if TYPE_CHECKING:
    from jobflow.broker.memory import MemoryBroker
    from jobflow.registry import JobRegistry

logger: structlog.typing.FilteringBoundLogger = get_logger()


class LocalScheduleDriver:
    """Publishes a registry's occurrences ``schedule_ahead`` early into an in-process broker."""

    def __init__(self, broker: MemoryBroker, registry: JobRegistry, step_s: float = 0.25) -> None:
        from jobflow.schedulers import BrokerJobScheduler  # noqa: PLC0415  (it imports the brokers)

        self.broker = broker
        self.schedules = {s.name: s for s in registry.schedules()}
        self.scheduler = BrokerJobScheduler(broker=broker, settings=broker.settings, registry=registry)
        self.ahead_ms = round(broker.settings.schedule_ahead * 1000)
        self.step_s = step_s
        self.entries: dict[str, Any] = {}
        self.published = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="jobflow-local-schedules", daemon=True)
        self._thread.start()
        logger.info("schedules.driving", driver="in-process", schedules=sorted(self.schedules))

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as exc:  # a bad step must not end the schedules: the next one retries
                logger.warning("schedules.step_failed", error_type=type(exc).__name__, error=str(exc))
            self._stop.wait(self.step_s)

    def step(self) -> None:
        now = current_millis()
        for schedule, at in plan_occurrences(self.schedules, self.entries, now, self.ahead_ms):
            due_at = datetime.fromtimestamp(at / 1000, UTC)
            job_id = occurrence_job_id(schedule.name, due_at)
            _envelope, message = self.scheduler.occurrence_message(schedule.job, due_at, job_id, schedule.queue)
            self.broker.enqueue(message, delay=max(0, at - current_millis()) or None)
            self.entries[schedule.name] = {"last_ms": at}
            self.published += 1
            logger.info(
                "schedule.occurrence_published",
                schedule=schedule.name,
                job_id=job_id,
                job_name=type(schedule.job).job_name,
                queue=message.queue_name,
                due_at=due_at.isoformat(),
            )
