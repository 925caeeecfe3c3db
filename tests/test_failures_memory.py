"""Retries, dead letters, time limits and the size limit on the in-memory broker."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import CurrentMessage

import jobflow
from jobflow import JobRegistry, RetryPolicy, Settings
from jobflow.broker.names import DISPATCH_COMMAND_ACTOR, RUN_JOB_ACTOR
from jobflow.dead_letter import FIRST_FAILURE_OPTION, REPLAY_OPTION, DeadLetter, dead_letter_record
from jobflow.envelope import make_envelope
from jobflow.testing import OutcomeTracker

from .helpers import tracked_worker, wait

FAST = RetryPolicy(max_attempts=4, backoff=timedelta(milliseconds=10), max_backoff=timedelta(milliseconds=50))


def dead_letters(broker: dramatiq.Broker, count: int, timeout: float = 20.0) -> list[DeadLetter]:
    """The records of the in-memory broker's dead letters, once there are ``count`` of them."""
    assert isinstance(broker, StubBroker)
    deadline = time.monotonic() + timeout
    while len(broker.dead_letters) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    records = [dead_letter_record(m) for m in broker.dead_letters]
    assert len(records) == count, records
    assert all(r is not None for r in records)
    return [r for r in records if r is not None]


def failures(tracker: OutcomeTracker, n: int) -> bool:
    return len([o for o in tracker.outcomes if o.error]) >= n


class TestRetriesInMemory:
    def test_transient_failures_then_success(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """A job failing transiently twice runs three times, then succeeds; nothing is dead-lettered."""
        attempts: list[int] = []

        class Flaky(jobflow.Job, registry=registry, retry=FAST):
            failures: int

            def execute(self, ctx: jobflow.JobContext) -> None:
                attempts.append(ctx.attempt)
                if ctx.attempt <= self.failures:
                    raise jobflow.TransientError(f"attempt {ctx.attempt}")

        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        with tracked_worker(scheduler.broker, registry, memory_settings) as tracker:
            job_id = scheduler.schedule_now(Flaky(failures=2))
            wait(tracker, lambda t: len(t.succeeded(RUN_JOB_ACTOR)) == 1)
        assert attempts == [1, 2, 3]
        assert {o.message_id for o in tracker.outcomes} == {job_id}
        assert not scheduler.broker.dead_letters  # type: ignore[attr-defined]

    def test_async_job_retries(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """An async job's failure is retried like a sync one's."""
        attempts: list[int] = []

        class AsyncFlaky(jobflow.Job, registry=registry, retry=FAST):
            async def execute(self, ctx: jobflow.JobContext) -> None:
                await asyncio.sleep(0)
                attempts.append(ctx.attempt)
                if ctx.attempt == 1:
                    raise ConnectionError("reset by peer")

        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        with tracked_worker(scheduler.broker, registry, memory_settings) as tracker:
            scheduler.schedule_now(AsyncFlaky())
            wait(tracker, lambda t: len(t.succeeded(RUN_JOB_ACTOR)) == 1)
        assert attempts == [1, 2]

    def test_exhausted_retries_dead_letter_the_final_failure(
        self, registry: JobRegistry, memory_settings: Settings
    ) -> None:
        """After max_attempts transient failures the job is dead-lettered with the last attempt's error."""

        class Hopeless(jobflow.Job, registry=registry, retry=FAST):
            def execute(self, ctx: jobflow.JobContext) -> None:
                raise jobflow.TransientError(f"still down on attempt {ctx.attempt}")

        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        with tracked_worker(scheduler.broker, registry, memory_settings) as tracker:
            job_id = scheduler.schedule_now(Hopeless())
            [record] = dead_letters(scheduler.broker, 1)
        assert len(tracker.outcomes) == 4
        assert (record.reason, record.attempts, record.message_id) == ("retries_exhausted", 4, job_id)
        assert record.error_message == "still down on attempt 4"
        assert record.traceback is not None
        assert "still down on attempt 4" in record.traceback
        assert "in execute" in record.traceback
        assert (record.kind, record.name, record.version) == ("job", "Hopeless", 1)
        assert record.first_failed_at < record.last_failed_at

    def test_permanent_error_makes_one_attempt(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """PermanentError is dead-lettered after its one attempt."""

        class Doomed(jobflow.Job, registry=registry, retry=FAST):
            def execute(self, ctx: jobflow.JobContext) -> None:
                raise jobflow.PermanentError("the account is closed")

        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        with tracked_worker(scheduler.broker, registry, memory_settings) as tracker:
            scheduler.schedule_now(Doomed())
            [record] = dead_letters(scheduler.broker, 1)
        assert len(tracker.outcomes) == 1
        assert (record.reason, record.attempts, record.error_type) == (
            "permanent_error",
            1,
            "jobflow.errors.PermanentError",
        )

    def test_policy_decides_what_is_transient(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """An exception the policy does not list as transient is dead-lettered at once."""
        policy = RetryPolicy(max_attempts=5, backoff=timedelta(milliseconds=10), transient=(ConnectionError,))

        class Picky(jobflow.Job, registry=registry, retry=policy):
            def execute(self, ctx: jobflow.JobContext) -> None:
                raise ValueError("a bug, not an outage")

        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        with tracked_worker(scheduler.broker, registry, memory_settings) as tracker:
            scheduler.schedule_now(Picky())
            [record] = dead_letters(scheduler.broker, 1)
        assert len(tracker.outcomes) == 1
        assert (record.reason, record.error_type) == ("permanent_error", "ValueError")

    def test_registry_default_policy_applies(self, memory_settings: Settings) -> None:
        """A type without a policy of its own follows its registry's default."""
        registry = JobRegistry(retry_policy=RetryPolicy(max_attempts=2, backoff=timedelta(milliseconds=10)))

        class Plain(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                raise RuntimeError("boom")

        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        with tracked_worker(scheduler.broker, registry, memory_settings) as tracker:
            scheduler.schedule_now(Plain())
            [record] = dead_letters(scheduler.broker, 1)
        assert len(tracker.outcomes) == 2
        assert record.attempts == 2

    def test_retry_after_replaces_the_backoff(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """TransientError(retry_after=...) makes the next attempt due no sooner than asked."""
        failed_at_ms: list[int] = []
        due_ms: list[int] = []

        class RateLimited(jobflow.Job, registry=registry, retry=FAST):
            def execute(self, ctx: jobflow.JobContext) -> None:
                if ctx.attempt == 1:
                    failed_at_ms.append(int(time.time() * 1000))
                    raise jobflow.TransientError("429", retry_after=timedelta(milliseconds=700))
                message = CurrentMessage.get_current_message()
                assert message is not None
                due_ms.append(message.options["due_ms"])

        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        with tracked_worker(scheduler.broker, registry, memory_settings) as tracker:
            scheduler.schedule_now(RateLimited())
            wait(tracker, lambda t: len(t.succeeded(RUN_JOB_ACTOR)) == 1)
        assert due_ms[0] - failed_at_ms[0] >= 700

    def test_failing_command_handler_follows_the_command_policy(
        self, registry: JobRegistry, memory_settings: Settings
    ) -> None:
        """A command's handler is retried per the command type's policy, then dead-lettered."""

        class Notify(jobflow.Command, registry=registry, retry=RetryPolicy(max_attempts=2, backoff=timedelta(0))):
            pass

        @jobflow.command_handler(Notify)
        def notify(command: Notify, ctx: jobflow.CommandContext) -> None:
            raise jobflow.TransientError(f"smtp down, attempt {ctx.attempt}")

        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        with tracked_worker(scheduler.broker, registry, memory_settings) as tracker:
            job_id = scheduler.schedule_now(jobflow.PublishCommandJob.create(Notify()))
            [record] = dead_letters(scheduler.broker, 1)
        assert [o.error is None for o in tracker.outcomes if o.actor_name == DISPATCH_COMMAND_ACTOR] == [False, False]
        assert (record.kind, record.name, record.reason, record.attempts) == (
            "command",
            "Notify",
            "retries_exhausted",
            2,
        )
        assert record.source_queue.endswith(".commands")
        assert tracker.succeeded(RUN_JOB_ACTOR)[0].message_id == job_id


class TestPermanentInMemory:
    def test_unknown_type_window_from_the_environment(
        self, registry: JobRegistry, memory_settings: Settings, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A registry that sets no window takes the worker's JOBFLOW_UNKNOWN_TYPE_RETRY (here: none)."""
        assert registry.unknown_type_retry is None
        monkeypatch.setenv("JOBFLOW_UNKNOWN_TYPE_RETRY", "0")
        settings = Settings(broker_url=memory_settings.broker_url)
        assert settings.unknown_type_retry == 0
        other = JobRegistry()

        class Elsewhere(jobflow.Job, registry=other):
            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        producer = jobflow.BrokerJobScheduler(settings=settings, registry=other)
        with tracked_worker(producer.broker, registry, settings) as tracker:
            producer.schedule_now(Elsewhere())
            [record] = dead_letters(producer.broker, 1)
        assert len(tracker.outcomes) == 1
        assert record.reason == "unknown_job"

    def test_unknown_job(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """Once its unknown-type window is over, a job no worker type answers to is dead-lettered as unknown_job."""
        registry.unknown_type_retry = timedelta(0)
        other = JobRegistry()

        class Elsewhere(jobflow.Job, registry=other):
            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        producer = jobflow.BrokerJobScheduler(settings=memory_settings, registry=other)
        with tracked_worker(producer.broker, registry, memory_settings) as tracker:
            producer.schedule_now(Elsewhere())
            [record] = dead_letters(producer.broker, 1)
        assert len(tracker.outcomes) == 1
        assert (record.reason, record.name, record.error_type) == (
            "unknown_job",
            "Elsewhere",
            "jobflow.errors.UnknownJobError",
        )

    def test_unknown_job_is_retried_until_a_worker_knows_it(
        self, registry: JobRegistry, memory_settings: Settings
    ) -> None:
        """In a rolling deploy a job of a type this worker lacks is retried, and runs once the type is there."""
        registry.retry_policy = jobflow.RetryPolicy(backoff=timedelta(milliseconds=20), jitter=0)
        other = JobRegistry()
        ran: list[int] = []

        class Shipped(jobflow.Job, name="Shipped", version=2, registry=other):
            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        producer = jobflow.BrokerJobScheduler(settings=memory_settings, registry=other)
        with tracked_worker(producer.broker, registry, memory_settings) as tracker:
            job_id = producer.schedule_now(Shipped())
            wait(tracker, lambda t: len(t.outcomes) >= 2)  # two attempts failed: still retried

            class Arrived(jobflow.Job, name="Shipped", version=2, registry=registry):
                def execute(self, ctx: jobflow.JobContext) -> None:
                    ran.append(ctx.attempt)

            wait(tracker, lambda t: any(o.message_id == job_id and o.error is None for o in t.outcomes))
        assert ran
        assert ran[0] >= 3
        assert producer.broker.dead_letters == []  # type: ignore[attr-defined]
        failures = [o.error for o in tracker.outcomes if o.error is not None]
        assert failures
        assert all("UnknownJobError" in f for f in failures)

    def test_invalid_payload_and_envelope(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """Data the type rejects is invalid_payload; an argument that is no envelope is invalid_envelope."""
        other = JobRegistry()

        class Typed(jobflow.Job, registry=registry):
            n: int

            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        class Loose(jobflow.Job, name="Typed", registry=other):
            n: str

            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        producer = jobflow.BrokerJobScheduler(settings=memory_settings, registry=other)
        broker = producer.broker
        with tracked_worker(broker, registry, memory_settings):
            producer.schedule_now(Loose(n="not a number"))
            broker.enqueue(
                dramatiq.Message(
                    queue_name=producer.queue,
                    actor_name=RUN_JOB_ACTOR,
                    args=({"no": "envelope"},),
                    kwargs={},
                    options={},
                )
            )
            records = dead_letters(broker, 2)
        assert sorted(r.reason for r in records) == ["invalid_envelope", "invalid_payload"]
        assert all(r.attempts == 1 for r in records)

    def test_unknown_command(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """A forwarded command no handler answers to is dead-lettered from the commands queue after its window."""
        registry.unknown_type_retry = timedelta(0)
        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        with tracked_worker(scheduler.broker, registry, memory_settings):
            scheduler.schedule_now(jobflow.PublishCommandJob(command_name="Nope", command_version=3, command_data={}))
            [record] = dead_letters(scheduler.broker, 1)
        assert (record.reason, record.kind, record.name, record.version) == ("unknown_command", "command", "Nope", 3)

    def test_replayed_message_starts_a_new_failure_story(
        self, registry: JobRegistry, memory_settings: Settings
    ) -> None:
        """A first attempt ignores a first-failure time left in its options by an earlier life."""

        class Doomed(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                raise jobflow.PermanentError("still no")

        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        broker = scheduler.broker
        envelope = make_envelope(Doomed(), registry)
        with tracked_worker(broker, registry, memory_settings):
            broker.enqueue(
                dramatiq.Message(
                    queue_name=scheduler.queue,
                    actor_name=RUN_JOB_ACTOR,
                    args=(envelope.to_wire(),),
                    kwargs={},
                    options={"retries": 0, FIRST_FAILURE_OPTION: 1_000},  # as a replay leaves it
                )
            )
            [record] = dead_letters(broker, 1)
        assert record.first_failed_at.year >= 2024
        assert record.attempts == 1

    def test_replay_count_from_the_body_reaches_the_new_record(
        self, registry: JobRegistry, memory_settings: Settings
    ) -> None:
        """A replayed message that dies again carries the replay count and time the CLI put in its options."""

        class DoomedAgain(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                raise jobflow.PermanentError("still no")

        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        broker = scheduler.broker
        envelope = make_envelope(DoomedAgain(), registry)
        replayed_at = "2026-01-02T03:04:05+00:00"
        with tracked_worker(broker, registry, memory_settings):
            broker.enqueue(
                dramatiq.Message(
                    queue_name=scheduler.queue,
                    actor_name=RUN_JOB_ACTOR,
                    args=(envelope.to_wire(),),
                    kwargs={},
                    options={REPLAY_OPTION: {"count": 2, "at": replayed_at}},
                )
            )
            [record] = dead_letters(broker, 1)
        assert record.replay_count == 2
        assert record.last_replayed_at == datetime.fromisoformat(replayed_at)


class TestTimeLimit:
    def test_time_limit_is_transient_then_dead_letters(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """A job past its type's time limit is interrupted, retried, and finally dead-lettered as time_limit."""
        policy = RetryPolicy(max_attempts=2, backoff=timedelta(milliseconds=10))

        class Stuck(jobflow.Job, registry=registry, retry=policy, time_limit=timedelta(milliseconds=200)):
            def execute(self, ctx: jobflow.JobContext) -> None:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    time.sleep(0.01)

        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        with tracked_worker(scheduler.broker, registry, memory_settings) as tracker:
            scheduler.schedule_now(Stuck())
            [record] = dead_letters(scheduler.broker, 1, timeout=30)
        assert [o.error is not None for o in tracker.outcomes] == [True, True]
        assert (record.reason, record.attempts) == ("time_limit", 2)
        assert record.error_type == "dramatiq.middleware.time_limit.TimeLimitExceeded"

    def test_async_job_time_limit(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """An async job past its time limit is cancelled and counts as a transient failure."""
        attempts: list[int] = []

        class SlowAsync(jobflow.Job, registry=registry, retry=FAST, time_limit=timedelta(milliseconds=200)):
            async def execute(self, ctx: jobflow.JobContext) -> None:
                attempts.append(ctx.attempt)
                if ctx.attempt == 1:
                    await asyncio.sleep(60)

        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        with tracked_worker(scheduler.broker, registry, memory_settings) as tracker:
            scheduler.schedule_now(SlowAsync())
            wait(tracker, lambda t: len(t.succeeded(RUN_JOB_ACTOR)) == 1, timeout=30)
        assert attempts == [1, 2]
        assert (tracker.outcomes[0].error or "").startswith("TimeLimitExceeded")


class TestPayloadLimit:
    def test_scheduler_refuses_oversized_jobs(self, registry: JobRegistry) -> None:
        """A job over JOBFLOW_MAX_PAYLOAD_BYTES is refused at schedule time with a clear error."""
        settings = Settings(broker_url="memory://size-limit", max_payload_bytes=4096)

        class Blob(jobflow.Job, registry=registry):
            data: str

            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        scheduler = jobflow.BrokerJobScheduler(settings=settings, registry=registry)
        scheduler.schedule_now(Blob(data="x" * 1000))
        with pytest.raises(jobflow.SchedulingError, match="over the limit of 4096 bytes") as info:
            scheduler.schedule_now(Blob(data="x" * 5000))
        assert "JOBFLOW_MAX_PAYLOAD_BYTES" in str(info.value)
        assert (info.value.name, info.value.version) == ("Blob", 1)
        assert scheduler.broker.queues[scheduler.queue].qsize() == 1

    def test_default_limit_is_one_mebibyte(self) -> None:
        """The default limit is 1 MiB, and JOBFLOW_MAX_PAYLOAD_BYTES sets it."""
        assert Settings().max_payload_bytes == 1024 * 1024

    def test_environment_sets_the_limit(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """JOBFLOW_MAX_PAYLOAD_BYTES is read from the environment."""
        monkeypatch.setenv("JOBFLOW_MAX_PAYLOAD_BYTES", "2048")
        assert Settings().max_payload_bytes == 2048
