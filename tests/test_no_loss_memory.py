"""The no-loss branches, on the in-memory broker's publish seam (``broker.faults``): no RabbitMQ needed.

Each test makes a publish fail (refused, or its confirm lost) and checks that the message is kept:
rejected (so RabbitMQ would dead-letter it) or delivered twice, never acked and gone.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import dramatiq
import pytest
from dramatiq.common import current_millis

import jobflow
from jobflow import JobRegistry, RetryPolicy, Settings
from jobflow.broker import MemoryBroker
from jobflow.broker.names import DISPATCH_COMMAND_ACTOR, RUN_JOB_ACTOR
from jobflow.dead_letter import dead_letter_record
from jobflow.envelope import make_envelope
from jobflow.middleware import DueTime, Failures, JobTimeLimit, stack
from jobflow.middleware import due_time as due_time_module
from jobflow.testing import is_retry, to_actor

from .helpers import tracked_worker, wait

FAST = RetryPolicy(max_attempts=3, backoff=timedelta(milliseconds=10), max_backoff=timedelta(milliseconds=20), jitter=0)


def memory(scheduler: jobflow.BrokerJobScheduler) -> MemoryBroker:
    broker = scheduler.broker
    assert isinstance(broker, MemoryBroker)
    return broker


class TestRetryPublishFails:
    def test_refused_retry_rejects_the_message(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """A retry the broker refuses leaves the original rejected (dead-lettered by the broker), not acked."""

        class Fails(jobflow.Job, registry=registry, retry=FAST):
            def execute(self, ctx: jobflow.JobContext) -> None:
                raise jobflow.TransientError("try again")

        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        broker = memory(scheduler)
        broker.faults.refuse(when=is_retry)
        with tracked_worker(broker, registry, memory_settings) as tracker:
            job_id = scheduler.schedule_now(Fails())
            wait(tracker, lambda t: len(t.outcomes) == 1)
            wait(tracker, lambda t: len(broker.dead_letters) == 1)
        assert [m.message_id for m in broker.dead_letters] == [job_id]
        # Rejected as RabbitMQ would see it: no jobflow record, the broker dead-letters it by itself.
        assert dead_letter_record(broker.dead_letters[0]) is None
        assert [m.message_id for m in broker.faults.refused] == [job_id]

    def test_lost_retry_confirm_keeps_both_copies(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """A retry whose confirm was lost still runs, and the original is rejected too: at least once."""
        attempts: list[int] = []

        class FailsOnce(jobflow.Job, registry=registry, retry=FAST):
            def execute(self, ctx: jobflow.JobContext) -> None:
                attempts.append(ctx.attempt)
                if ctx.attempt == 1:
                    raise jobflow.TransientError("once")

        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        broker = memory(scheduler)
        broker.faults.lose_confirm(when=is_retry)
        with tracked_worker(broker, registry, memory_settings) as tracker:
            job_id = scheduler.schedule_now(FailsOnce())
            wait(tracker, lambda t: len(t.succeeded(RUN_JOB_ACTOR)) == 1)
        assert attempts == [1, 2]
        assert [m.message_id for m in broker.dead_letters] == [job_id]

    def test_refused_first_schedule_raises(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """A schedule the broker refuses raises BrokerUnavailableError with the job's identity: nothing reported."""

        class Quiet(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        memory(scheduler).faults.refuse()
        with pytest.raises(jobflow.BrokerUnavailableError) as info:
            scheduler.schedule_now(Quiet())
        assert info.value.job_id is not None
        assert memory(scheduler).queues[scheduler.queue].qsize() == 0


class TestCommandsAreHeld:
    def _app(self, registry: JobRegistry, handled: list[str]) -> Any:
        class Notify(jobflow.Command, registry=registry):
            text: str

        @jobflow.command_handler(Notify, registry=registry)
        def notify(command: Notify, ctx: jobflow.CommandContext) -> None:
            handled.append(command.text)

        return Notify

    def test_a_failing_job_sends_no_command(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """Commands a job published go out only after it succeeds: three failures send nothing, the success one."""
        handled: list[str] = []
        notify = self._app(registry, handled)

        class Publishes(jobflow.Job, registry=registry, retry=RetryPolicy(max_attempts=4, backoff=timedelta(0))):
            def execute(self, ctx: jobflow.JobContext) -> None:
                jobflow.PublishCommandJob.create(notify(text=f"attempt {ctx.attempt}")).execute(ctx)
                if ctx.attempt <= 3:
                    raise jobflow.TransientError("not yet")

        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        with tracked_worker(scheduler.broker, registry, memory_settings) as tracker:
            scheduler.schedule_now(Publishes())
            wait(tracker, lambda t: len(t.succeeded(DISPATCH_COMMAND_ACTOR)) == 1)
        assert handled == ["attempt 4"]
        assert len(tracker.outcomes) == 5  # four attempts of the job, one command

    def test_command_publish_failing_fails_the_attempt(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """If a held command cannot be published, the job's attempt failed and is retried: the command arrives."""
        handled: list[str] = []
        notify = self._app(registry, handled)
        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        registry.retry_policy = FAST
        memory(scheduler).faults.refuse(when=to_actor(DISPATCH_COMMAND_ACTOR))
        with tracked_worker(scheduler.broker, registry, memory_settings) as tracker:
            scheduler.schedule_now(jobflow.PublishCommandJob.create(notify(text="hello")))
            wait(tracker, lambda t: len(t.succeeded(DISPATCH_COMMAND_ACTOR)) == 1)
        jobs = [o for o in tracker.outcomes if o.actor_name == RUN_JOB_ACTOR]
        assert [o.error is None for o in jobs] == [False, True]
        assert jobs[0].error is not None
        assert "BrokerUnavailableError" in jobs[0].error
        assert handled == ["hello"]


class TestMiddlewareOrder:
    def test_time_limit_comes_after_failures(self) -> None:
        """JobTimeLimit is last, after Failures: its deadline is disarmed before a retry is published."""
        names = [type(m) for m in stack()]
        assert names[-1] is JobTimeLimit
        assert names.index(Failures) < names.index(JobTimeLimit)
        assert names.index(DueTime) < names.index(JobTimeLimit)

    def test_dramatiq_retries_and_time_limit_are_replaced(self) -> None:
        """A Dramatiq middleware list keeps its options: Retries becomes Failures, TimeLimit JobTimeLimit."""
        given = [dramatiq.middleware.Retries(max_retries=3), dramatiq.middleware.TimeLimit(time_limit=1234)]
        built = stack(given)
        failures = next(m for m in built if isinstance(m, Failures))
        limit = built[-1]
        assert failures.max_retries == 3
        assert isinstance(limit, JobTimeLimit)
        assert limit.time_limit == 1234
        assert not any(type(m) in (dramatiq.middleware.Retries, dramatiq.middleware.TimeLimit) for m in built)

    def test_brokers_use_the_stack(self, memory_settings: Settings) -> None:
        """The brokers jobflow builds carry that order."""
        broker = jobflow.create_broker(memory_settings)
        assert [type(m) for m in broker.middleware] == [type(m) for m in stack()]


class TestEarlyMessageNeverPinsAThread:
    def test_refused_re_delay_rejects_without_sleeping(
        self, registry: JobRegistry, memory_settings: Settings, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A message 5 s early whose re-delay the broker refuses is rejected at once: no thread sleeps it out."""
        slept: list[float] = []
        real_sleep = time.sleep

        def short_sleep(seconds: float) -> None:
            slept.append(seconds)
            real_sleep(min(seconds, 0.05))

        monkeypatch.setattr("jobflow.middleware.due_time.time.sleep", short_sleep)

        class Note(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        broker = memory(scheduler)
        early: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=scheduler.queue,
            actor_name=RUN_JOB_ACTOR,
            args=(make_envelope(Note(), registry).to_wire(),),
            kwargs={},
            options={"due_ms": current_millis() + 5_000},
        )
        broker.faults.refuse(when=lambda _m, delay: bool(delay))
        with tracked_worker(broker, registry, memory_settings, threads=1) as tracker:
            broker.queues[scheduler.queue].put(early.encode())  # as a producer whose clock runs ahead
            wait(tracker, lambda t: len(broker.dead_letters) == 1, timeout=4)
        assert [m.message_id for m in broker.dead_letters] == [early.message_id]
        assert tracker.succeeded(RUN_JOB_ACTOR) == []
        assert all(s <= due_time_module.MAX_EARLY_SLEEP_MS / 1000 for s in slept), slept
