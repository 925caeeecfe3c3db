"""DueTime: never run early, and never hold a thread for an early message's delay."""

from __future__ import annotations

import time
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import current_millis

import jobflow
from jobflow import JobRegistry, Settings
from jobflow.broker.names import RUN_JOB_ACTOR
from jobflow.envelope import make_envelope

from .helpers import tracked_worker, wait


def raw_put(broker: StubBroker, queue: str, message: dramatiq.Message[Any]) -> None:
    """Put a message on the in-memory queue as a producer with another clock would: unstamped."""
    broker.queues[queue].put(message.encode())


class TestEarlyMessages:
    def test_early_message_waits_for_its_due_time(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """A message that arrives 1 s before its due time runs no earlier than that."""
        runs: list[int] = []

        class Stamp(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                runs.append(current_millis())

        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        broker = scheduler.broker
        assert isinstance(broker, StubBroker)
        due = current_millis() + 1_000
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=scheduler.queue,
            actor_name=RUN_JOB_ACTOR,
            args=(make_envelope(Stamp(), registry).to_wire(),),
            kwargs={},
            options={"due_ms": due},
        )
        with tracked_worker(broker, registry, memory_settings) as tracker:
            raw_put(broker, scheduler.queue, message)
            wait(tracker, lambda t: len(t.succeeded(RUN_JOB_ACTOR)) == 1)
        assert runs[0] >= due

    def test_early_message_that_cannot_be_delayed_again_is_rejected(
        self, registry: JobRegistry, memory_settings: Settings, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """If the broker refuses the re-delay, the early message is rejected (dead-lettered), not run or slept on."""
        runs: list[str] = []

        class Note(jobflow.Job, registry=registry):
            text: str

            def execute(self, ctx: jobflow.JobContext) -> None:
                runs.append(self.text)

        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        broker = scheduler.broker
        assert isinstance(broker, StubBroker)
        early: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=scheduler.queue,
            actor_name=RUN_JOB_ACTOR,
            args=(make_envelope(Note(text="early"), registry).to_wire(),),
            kwargs={},
            options={"due_ms": current_millis() + 10 * 365 * 86_400_000},
        )
        real_enqueue = broker.enqueue

        def refuse_delays(message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
            if delay:
                raise dramatiq.errors.ConnectionClosed(RuntimeError("broker gone"))
            return real_enqueue(message)

        monkeypatch.setattr(broker, "enqueue", refuse_delays)
        with tracked_worker(broker, registry, memory_settings, threads=1) as tracker:
            started = time.monotonic()
            raw_put(broker, scheduler.queue, early)
            scheduler.schedule_now(Note(text="after"))
            wait(tracker, lambda t: len(t.succeeded(RUN_JOB_ACTOR)) == 1, timeout=10)
        assert runs == ["after"]
        assert time.monotonic() - started < 10
        assert [m.message_id for m in broker.dead_letters] == [early.message_id]
