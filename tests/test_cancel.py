"""Cancelling jobs without RabbitMQ: ids that carry due times, what a worker remembers, the in-memory path."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from structlog.testing import capture_logs

import jobflow
from jobflow import JobRegistry, Settings
from jobflow.broker.names import RUN_JOB_ACTOR
from jobflow.cancel import (
    AFTER_SKIP,
    FOREIGN_HOLD,
    RETRY_MARGIN,
    CancelSet,
    check_job_id,
    decode_record,
    encode_record,
    hold_until_ms,
)
from jobflow.job_ids import due_ms_of, new_job_id, occurrence_job_id
from jobflow.metrics import instruments

from .helpers import eventually, tracked_worker

DAY_MS = 86_400_000


class TestJobIds:
    def test_a_job_id_carries_its_due_time_to_the_millisecond(self) -> None:
        due = datetime(2031, 5, 17, 3, 4, 5, 678000, tzinfo=UTC)
        job_id = new_job_id(due)
        assert uuid.UUID(job_id).version == 8
        assert due_ms_of(job_id) == round(due.timestamp() * 1000)

    def test_ids_of_one_due_time_differ_in_their_first_characters(self) -> None:
        """The random part comes first, so the CLI's shortest unique prefixes stay short."""
        due = datetime.now(UTC)
        ids = {new_job_id(due) for _ in range(200)}
        assert len(ids) == 200
        assert len({i[:8] for i in ids}) == 200

    def test_an_occurrence_id_is_the_same_for_the_same_schedule_and_time(self) -> None:
        at = datetime(2027, 1, 1, tzinfo=UTC)
        assert occurrence_job_id("nightly", at) == occurrence_job_id("nightly", at)
        assert occurrence_job_id("nightly", at) != occurrence_job_id("hourly", at)
        assert occurrence_job_id("nightly", at) != occurrence_job_id("nightly", at + timedelta(milliseconds=1))
        assert due_ms_of(occurrence_job_id("nightly", at)) == round(at.timestamp() * 1000)

    @pytest.mark.parametrize("other", [str(uuid.uuid4()), "not-a-uuid", "", str(uuid.UUID(int=8 << 76))])
    def test_ids_of_other_forms_carry_no_due_time(self, other: str) -> None:
        assert due_ms_of(other) is None

    def test_scheduled_jobs_get_ids_with_their_due_time(self, registry: JobRegistry, memory_settings: Settings) -> None:
        class Later(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        before = int(time.time() * 1000)
        job_id = scheduler.schedule(Later(), delay=timedelta(hours=2))
        due = due_ms_of(job_id)
        assert due is not None
        assert before + 7_200_000 <= due <= int(time.time() * 1000) + 7_200_000


class TestCancelSet:
    def test_a_cancel_is_held_until_its_due_time_plus_the_retry_margin(self) -> None:
        now = 1_800_000_000_000
        due = datetime.fromtimestamp((now + 5 * DAY_MS) / 1000, UTC)
        margin = int(RETRY_MARGIN.total_seconds() * 1000)
        assert hold_until_ms(new_job_id(due), now) == now + 5 * DAY_MS + margin
        past = datetime.fromtimestamp((now - DAY_MS) / 1000, UTC)
        assert hold_until_ms(new_job_id(past), now) == now + margin  # already due: retries may come
        assert hold_until_ms(str(uuid.uuid4()), now) == now + int(FOREIGN_HOLD.total_seconds() * 1000)

    def test_expired_cancels_are_forgotten(self) -> None:
        cancels = CancelSet()
        now = int(time.time() * 1000)
        assert cancels.add("a", now + 60_000, now)
        assert not cancels.add("b", now - 1, now)  # expired already: not kept
        assert cancels.add("c", now + 100, now)
        assert len(cancels) == 2
        cancels.add("d", now + 60_000, now + 200)  # a later insert drops what expired by then
        assert "c" not in cancels
        assert "a" in cancels
        assert len(cancels) == 2

    def test_memory_stays_bounded_by_the_cancels_not_yet_expired(self) -> None:
        cancels = CancelSet()
        now = 1_000_000
        for i in range(10_000):
            cancels.add(f"job-{i}", now + i + 10, now + i)  # each expires 10 ms after it came
        assert len(cancels) <= 11
        assert len(cancels._expiry) <= 2 * 11 + 64 + 1

    def test_a_skipped_job_keeps_its_cancel_only_for_redeliveries(self) -> None:
        cancels = CancelSet()
        now = int(time.time() * 1000)
        cancels.add("a", now + 30 * DAY_MS, now)
        assert cancels.take("a")
        assert cancels.take("a")  # a redelivered copy is skipped too
        assert cancels._until["a"] <= int(time.time() * 1000) + int(AFTER_SKIP.total_seconds() * 1000)
        assert not cancels.take("unknown")

    def test_records_round_trip_and_anything_else_is_ignored(self) -> None:
        assert decode_record(encode_record("job-1", 5, 10)) == ("job-1", 10)
        for body in (b"", b"not json", b"[]", b'{"job_id": 3, "until_ms": 1}', b'{"job_id": "x", "until_ms": true}'):
            assert decode_record(body) is None

    @pytest.mark.parametrize("bad", ["", "   ", "x" * 256, None, 42])
    def test_a_bad_job_id_is_refused_by_name(self, bad: Any) -> None:
        with pytest.raises(jobflow.SchedulingError, match="job id to cancel"):
            check_job_id(bad)


def _define(registry: JobRegistry, ran: list[str]) -> Any:
    class Tracked(jobflow.Job, registry=registry):
        n: int

        def execute(self, ctx: jobflow.JobContext) -> None:
            ran.append(ctx.job_id)

    return Tracked


class TestCancelInMemory:
    def test_a_cancelled_delayed_job_never_runs_and_the_others_do(
        self, registry: JobRegistry, memory_settings: Settings
    ) -> None:
        ran: list[str] = []
        tracked = _define(registry, ran)
        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        before = instruments().cancelled.labels("job", tracked.job_name, "1", "jobflow.jobs")._value.get()
        with capture_logs() as logs, tracked_worker(scheduler.broker, registry, memory_settings) as tracker:
            ids = scheduler.schedule_many([tracked(n=i) for i in range(20)], delay=timedelta(milliseconds=600))
            results = scheduler.cancel_many(ids[::2])
            eventually(lambda: len(tracker.succeeded(RUN_JOB_ACTOR)) == 10, timeout=10, what="the other ten jobs")
            time.sleep(0.3)
        assert sorted(ran) == sorted(ids[1::2])
        assert [r.job_id for r in results] == ids[::2]
        assert all(r.recorded for r in results)
        cancelled = [e for e in logs if e["event"] == "job.cancelled"]
        assert sorted(e["job_id"] for e in cancelled) == sorted(ids[::2])
        assert {e["job_name"] for e in cancelled} == {tracked.job_name}
        after = instruments().cancelled.labels("job", tracked.job_name, "1", "jobflow.jobs")._value.get()
        assert after - before == 10

    def test_cancel_async(self, registry: JobRegistry, memory_settings: Settings) -> None:
        ran: list[str] = []
        tracked = _define(registry, ran)
        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        job_id = scheduler.schedule(tracked(n=1), delay=timedelta(milliseconds=300))
        result = asyncio.run(scheduler.cancel_async(job_id))
        assert result.recorded
        assert result.pending is None
        assert result.until_ms is not None
        assert job_id in scheduler.broker.cancellations  # type: ignore[attr-defined]

    def test_the_instant_scheduler_says_cancel_is_a_no_op(self, registry: JobRegistry) -> None:
        ran: list[str] = []
        tracked = _define(registry, ran)
        scheduler = jobflow.InstantJobScheduler(registry)
        job_id = scheduler.schedule(tracked(n=1))
        with capture_logs() as logs:
            result = scheduler.cancel(job_id)
        assert result == jobflow.CancelResult(job_id, recorded=False, pending=False)
        assert ran == [job_id]
        assert [e["event"] for e in logs] == ["job.cancel_ignored"]

    def test_cancel_is_part_of_the_scheduler_protocol(self, memory_settings: Settings) -> None:
        assert isinstance(jobflow.InstantJobScheduler(), jobflow.JobScheduler)
        assert isinstance(jobflow.BrokerJobScheduler(settings=memory_settings), jobflow.JobScheduler)

    def test_concurrent_takes_are_safe(self) -> None:
        cancels = CancelSet()
        now = int(time.time() * 1000)
        for i in range(1000):
            cancels.add(str(i), now + 60_000, now)
        hits: list[bool] = []
        threads = [
            threading.Thread(target=lambda: hits.extend(cancels.take(str(i)) for i in range(1000))) for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert hits.count(True) == 4000  # every copy of a cancelled job is skipped, whichever thread sees it
