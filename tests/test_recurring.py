"""Recurring schedules without RabbitMQ: their occurrences, their validation, what a driver plans."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import jobflow
from jobflow import JobRegistry, RegistrationError
from jobflow.broker.schedules import FORGET_AFTER_MS, forget_undeclared, plan_occurrences
from jobflow.job_ids import due_ms_of, occurrence_job_id
from jobflow.recurring import RecurringSchedule

from .helpers import eventually, tracked_worker


def ms(*fields: int) -> int:
    """Epoch ms of a UTC time given as year, month, day[, hour, minute, second]."""
    year, month, day, hour, minute, second = (*fields, 0, 0, 0)[:6]
    return round(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp() * 1000)


def utc(at_ms: int) -> datetime:
    return datetime.fromtimestamp(at_ms / 1000, UTC)


@pytest.fixture
def probe(registry: JobRegistry) -> type[jobflow.Job]:
    class Probe(jobflow.Job, name="Probe", registry=registry):
        n: int = 0

        def execute(self, ctx: jobflow.JobContext) -> None:
            pass

    return Probe


def every(registry: JobRegistry, probe: type[jobflow.Job], seconds: float, **kw: Any) -> RecurringSchedule:
    return jobflow.recurring(
        kw.pop("name", f"every-{seconds}"), probe(), every=timedelta(seconds=seconds), registry=registry, **kw
    )


class TestOccurrences:
    def test_an_interval_counts_from_the_epoch(self, registry: JobRegistry, probe: type[jobflow.Job]) -> None:
        hourly = every(registry, probe, 3600)
        assert hourly.next_after(ms(2026, 12, 3, 6, 59, 59)) == ms(2026, 12, 3, 7)
        assert hourly.next_after(ms(2026, 12, 3, 7)) == ms(2026, 12, 3, 8)  # strictly after
        assert hourly.occurrences(ms(2026, 12, 3, 7), ms(2026, 12, 3, 10)) == [
            ms(2026, 12, 3, 8),
            ms(2026, 12, 3, 9),
            ms(2026, 12, 3, 10),
        ]
        assert hourly.occurrences(0, 10**13, limit=3) == [3_600_000, 7_200_000, 10_800_000]

    def test_cron_is_read_in_its_timezone_across_dst(self, registry: JobRegistry, probe: type[jobflow.Job]) -> None:
        berlin = jobflow.recurring("nine", probe(), cron="0 9 * * *", timezone="Europe/Berlin", registry=registry)
        # 2026-03-29 02:00 CET the clocks go to 03:00 CEST: 09:00 local moves from 08:00 to 07:00 UTC.
        days = [utc(at) for at in berlin.occurrences(ms(2026, 3, 27), ms(2026, 3, 31))]
        assert days == [
            datetime(2026, 3, 27, 8, tzinfo=UTC),
            datetime(2026, 3, 28, 8, tzinfo=UTC),
            datetime(2026, 3, 29, 7, tzinfo=UTC),
            datetime(2026, 3, 30, 7, tzinfo=UTC),
        ]

    def test_a_fixed_time_runs_once_in_the_night_the_clocks_go_back(
        self, registry: JobRegistry, probe: type[jobflow.Job]
    ) -> None:
        """2026-10-25 03:00 CEST the clocks go back to 02:00 CET: 02:30 happens twice, as cron runs it once."""
        daily = jobflow.recurring("d", probe(), cron="30 2 * * *", timezone="Europe/Berlin", registry=registry)
        assert [utc(a) for a in daily.occurrences(ms(2026, 10, 24), ms(2026, 10, 26, 12))] == [
            datetime(2026, 10, 24, 0, 30, tzinfo=UTC),
            datetime(2026, 10, 25, 0, 30, tzinfo=UTC),  # 02:30 CEST, not 02:30 CET an hour later
            datetime(2026, 10, 26, 1, 30, tzinfo=UTC),
        ]
        hourly = jobflow.recurring("h", probe(), cron="0 * * * *", timezone="Europe/Berlin", registry=registry)
        night = hourly.occurrences(ms(2026, 10, 24, 23, 30), ms(2026, 10, 25, 2, 30))
        assert [utc(a).hour for a in night] == [0, 1, 2]  # hourly: both passes of 02:00, an hour apart
        # In the second pass, the latest occurrence is that pass's, not the first's.
        assert hourly.last_at_or_before(ms(2026, 10, 25, 1, 0, 30), ms(2026, 10, 25)) == ms(2026, 10, 25, 1)
        assert daily.last_at_or_before(ms(2026, 10, 25, 1, 45), ms(2026, 10, 20)) == ms(2026, 10, 25, 0, 30)

    def test_cron_weekdays_and_steps(self, registry: JobRegistry, probe: type[jobflow.Job]) -> None:
        weekdays = jobflow.recurring("q", probe(), cron="*/15 8 * * 1-5", registry=registry)
        # 2026-12-04 is a Friday: the next after its last 08:45 is Monday's 08:00.
        assert utc(weekdays.next_after(ms(2026, 12, 4, 8, 45))) == datetime(2026, 12, 7, 8, tzinfo=UTC)
        assert [utc(a).minute for a in weekdays.occurrences(ms(2026, 12, 7), ms(2026, 12, 7, 9))] == [0, 15, 30, 45]

    def test_the_latest_missed_occurrence(self, registry: JobRegistry, probe: type[jobflow.Job]) -> None:
        minutely = every(registry, probe, 60)
        cron = jobflow.recurring("daily", probe(), cron="30 4 * * *", registry=registry)
        now = ms(2026, 12, 3, 10, 0, 30)
        assert minutely.last_at_or_before(now, ms(2026, 12, 3, 9)) == ms(2026, 12, 3, 10)
        assert minutely.last_at_or_before(now, ms(2026, 12, 3, 10)) is None  # nothing after `since`
        assert cron.last_at_or_before(now, ms(2026, 12, 1)) == ms(2026, 12, 3, 4, 30)
        assert cron.last_at_or_before(ms(2026, 12, 3, 4, 30), ms(2026, 12, 1)) == ms(2026, 12, 3, 4, 30)  # inclusive
        assert cron.last_at_or_before(now, ms(2026, 12, 3, 4, 30)) is None

    def test_describe(self, registry: JobRegistry, probe: type[jobflow.Job]) -> None:
        assert every(registry, probe, 90).describe() == "every 90 s"
        cron = jobflow.recurring("c", probe(), cron="0 * * * *", timezone="Asia/Tokyo", registry=registry)
        assert cron.describe() == "cron '0 * * * *' (Asia/Tokyo)"


class TestDeclaring:
    @pytest.mark.parametrize(
        ("kwargs", "says"),
        [
            ({}, "exactly one"),
            ({"cron": "* * * * *", "every": timedelta(seconds=5)}, "exactly one"),
            ({"every": timedelta(milliseconds=500)}, "at least 1 second"),
            ({"every": 5}, "timedelta"),
            ({"every": timedelta(seconds=1, microseconds=1)}, "whole milliseconds"),
            ({"cron": "61 * * * *"}, "five-field cron"),
            ({"cron": "* * * * * *"}, "five-field cron"),
            ({"cron": "0 9 * * *", "timezone": "Mars/Olympus"}, "unknown timezone"),
            ({"cron": "R * * * *"}, "R and H differ per process"),
            ({"cron": "*/5 R * * *"}, "R and H differ per process"),
            ({"cron": "0 0 31 2 *"}, "never comes due"),
            ({"every": timedelta(days=1), "timezone": "Europe/Berlin"}, "timezone= goes with cron="),
            ({"cron": "0 9 * * *", "missed": "all"}, "'once' or 'skip'"),
            ({"cron": "0 9 * * *", "queue": "has spaces"}, "queue"),
        ],
    )
    def test_misuse_names_what_was_wrong(
        self, registry: JobRegistry, probe: type[jobflow.Job], kwargs: dict[str, Any], says: str
    ) -> None:
        with pytest.raises(RegistrationError, match=says) as raised:
            jobflow.recurring("nightly", probe(), registry=registry, **kwargs)
        assert "nightly" in str(raised.value)
        assert registry.schedules() == []

    def test_bad_names_and_jobs(self, registry: JobRegistry, probe: type[jobflow.Job]) -> None:
        with pytest.raises(RegistrationError, match="schedule name"):
            jobflow.recurring("has space", probe(), every=timedelta(seconds=1), registry=registry)
        with pytest.raises(RegistrationError, match=r"jobflow\.Job instance or class, not 'probe'"):
            jobflow.recurring("x", "probe", every=timedelta(seconds=1), registry=registry)  # type: ignore[arg-type]
        with pytest.raises(RegistrationError, match="not a valid Probe"):
            jobflow.recurring("x", probe, data={"n": "many"}, every=timedelta(seconds=1), registry=registry)
        with pytest.raises(RegistrationError, match="data= goes with a job class"):
            jobflow.recurring("x", probe(), data={"n": 1}, every=timedelta(seconds=1), registry=registry)
        with pytest.raises(RegistrationError, match="not registered"):
            jobflow.recurring("x", probe(), every=timedelta(seconds=1), registry=JobRegistry())

    def test_a_class_and_its_data(self, registry: JobRegistry, probe: type[jobflow.Job]) -> None:
        s = jobflow.recurring("c", probe, data={"n": 3}, every=timedelta(seconds=1), registry=registry)
        assert s.job == probe.model_validate({"n": 3})

    def test_day_and_month_names(self, registry: JobRegistry, probe: type[jobflow.Job]) -> None:
        s = jobflow.recurring("names", probe(), cron="0 9 * MAR,APR THU,FRI", registry=registry)
        assert utc(s.next_after(ms(2026, 3, 1))) == datetime(2026, 3, 5, 9, tzinfo=UTC)  # a Thursday

    def test_the_same_definition_twice_is_one_schedule(self, registry: JobRegistry, probe: type[jobflow.Job]) -> None:
        """A module imported twice (``__main__`` and by name) declares its schedules again."""
        first = every(registry, probe, 5, name="five")
        every(registry, probe, 5, name="five")
        assert registry.schedules() == [first]

    def test_another_definition_under_a_taken_name_is_refused(
        self, registry: JobRegistry, probe: type[jobflow.Job]
    ) -> None:
        every(registry, probe, 5, name="five")
        with pytest.raises(RegistrationError, match=r"'five' is already declared \(every 5 s of Probe\)"):
            every(registry, probe, 6, name="five")
        other_data = probe.model_validate({"n": 1})
        with pytest.raises(RegistrationError, match="already declared"):
            jobflow.recurring("five", other_data, every=timedelta(seconds=5), registry=registry)
        assert [s.every for s in registry.schedules()] == [timedelta(seconds=5)]


class TestDriverPlan:
    """What one step of the elected driver publishes, given the state the last driver left."""

    NOW = ms(2026, 12, 3, 12, 0, 0) + 400

    def test_a_new_schedule_starts_after_now(self, registry: JobRegistry, probe: type[jobflow.Job]) -> None:
        s = every(registry, probe, 1)
        plan = plan_occurrences({s.name: s}, {}, self.NOW, 3000)
        assert [at - self.NOW for _, at in plan] == [600, 1600, 2600]

    def test_published_occurrences_are_not_published_again(
        self, registry: JobRegistry, probe: type[jobflow.Job]
    ) -> None:
        s = every(registry, probe, 1)
        entries = {s.name: {"last_ms": self.NOW + 1600}}  # a driver already published up to here
        assert [at - self.NOW for _, at in plan_occurrences({s.name: s}, entries, self.NOW, 3000)] == [2600]
        assert plan_occurrences({s.name: s}, entries, self.NOW, 1000) == []

    @pytest.mark.parametrize(("missed", "extra"), [("once", [-400]), ("skip", [])])
    def test_occurrences_missed_while_no_worker_ran(
        self, registry: JobRegistry, probe: type[jobflow.Job], missed: Any, extra: list[int]
    ) -> None:
        s = every(registry, probe, 1, missed=missed)
        entries = {s.name: {"last_ms": self.NOW - 3_600_400}}  # an hour of occurrences came and went
        plan = plan_occurrences({s.name: s}, entries, self.NOW, 2000)
        assert [at - self.NOW for _, at in plan] == [*extra, 600, 1600]

    def test_a_takeover_publishes_every_occurrence_since_late(
        self, registry: JobRegistry, probe: type[jobflow.Job]
    ) -> None:
        """The last driver wrote 40 s ago (a crashed host, noticed after heartbeats): not "missed"."""
        s = every(registry, probe, 1, missed="skip")
        entries = {s.name: {"last_ms": self.NOW - 30_400, "describe": s.describe()}}
        plan = plan_occurrences({s.name: s}, entries, self.NOW, 1000, driven_at_ms=self.NOW - 40_000)
        assert [at - self.NOW for _, at in plan] == [-29_400 + 1000 * k for k in range(31)]
        # A state written long ago: no driver ran, so the schedule's missed= applies.
        stale = plan_occurrences({s.name: s}, entries, self.NOW, 1000, driven_at_ms=self.NOW - 3_600_000)
        assert [at - self.NOW for _, at in stale] == [600]

    def test_missed_applies_before_the_first_occurrence_too(
        self, registry: JobRegistry, probe: type[jobflow.Job]
    ) -> None:
        daily = jobflow.recurring("daily", probe(), cron="30 2 * * *", registry=registry)
        seen = {"daily": {"since_ms": ms(2026, 12, 2, 23), "describe": daily.describe()}}  # never published
        assert [utc(at) for _, at in plan_occurrences({"daily": daily}, seen, self.NOW, 1000)] == [
            datetime(2026, 12, 3, 2, 30, tzinfo=UTC)
        ]

    def test_a_redefined_schedule_starts_from_now(self, registry: JobRegistry, probe: type[jobflow.Job]) -> None:
        s = jobflow.recurring("daily", probe(), cron="0 4 * * *", registry=registry)
        old = {"daily": {"last_ms": ms(2026, 12, 3, 3), "describe": "cron '0 3 * * *' (UTC)"}}
        assert plan_occurrences({"daily": s}, old, self.NOW, 1000) == []  # no 04:00 catch-up at noon

    def test_a_failing_schedule_leaves_the_others_running(
        self, registry: JobRegistry, probe: type[jobflow.Job]
    ) -> None:
        class Broken(RecurringSchedule):
            def next_after(self, after_ms: int) -> int:
                raise ValueError("no date")

        fine = every(registry, probe, 1, name="fine")
        broken = Broken("broken", probe(), every=timedelta(seconds=1))
        plan = plan_occurrences({"broken": broken, "fine": fine}, {}, self.NOW, 1000)
        assert [(s.name, at - self.NOW) for s, at in plan] == [("fine", 600)]

    def test_only_due_schedules_publish(self, registry: JobRegistry, probe: type[jobflow.Job]) -> None:
        fast = every(registry, probe, 1, name="fast")
        daily = jobflow.recurring("daily", probe(), cron="0 3 * * *", registry=registry)
        plan = plan_occurrences({"fast": fast, "daily": daily}, {}, self.NOW, 1000)
        assert [(s.name, at - self.NOW) for s, at in plan] == [("fast", 600)]

    def test_an_occurrence_has_one_id_wherever_it_is_computed(
        self, registry: JobRegistry, probe: type[jobflow.Job]
    ) -> None:
        due = utc(self.NOW + 600)
        assert occurrence_job_id("fast", due) == occurrence_job_id("fast", due)
        assert occurrence_job_id("fast", due) != occurrence_job_id("other", due)
        assert occurrence_job_id("fast", due) != occurrence_job_id("fast", due + timedelta(seconds=1))
        assert due_ms_of(occurrence_job_id("fast", due)) == self.NOW + 600

    def test_one_occurrence_can_be_named_to_cancel_it(self, registry: JobRegistry, probe: type[jobflow.Job]) -> None:
        s = jobflow.recurring("daily", probe(), cron="30 4 * * *", registry=registry)
        due = datetime(2026, 12, 24, 4, 30, tzinfo=UTC)
        assert s.occurrence_id(due) == occurrence_job_id("daily", due)
        with pytest.raises(jobflow.SchedulingError, match="has no occurrence at 2026-12-24T04:31"):
            s.occurrence_id(due + timedelta(minutes=1))
        with pytest.raises(jobflow.SchedulingError, match="timezone-aware"):
            s.occurrence_id(due.replace(tzinfo=None))

    def test_removed_schedules_are_forgotten_once_old(self, registry: JobRegistry, probe: type[jobflow.Job]) -> None:
        s = every(registry, probe, 1, name="kept")
        entries: dict[str, Any] = {
            "kept": {"last_ms": 0},
            "recent": {"last_ms": self.NOW - FORGET_AFTER_MS + 1},
            "old": {"last_ms": self.NOW - FORGET_AFTER_MS - 1},
        }
        forget_undeclared({"kept": s}, entries, self.NOW)
        assert sorted(entries) == ["kept", "recent"]


class TestInMemory:
    def test_an_in_process_worker_runs_the_occurrences(self, registry: JobRegistry, memory_settings: Any) -> None:
        ran: list[tuple[str, datetime | None]] = []

        class Tick(jobflow.Job, name="Tick", registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                ran.append((ctx.job_id, ctx.due_at))

        jobflow.recurring("tick", Tick(), every=timedelta(seconds=1), registry=registry)
        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        with tracked_worker(scheduler.broker, registry, memory_settings):
            eventually(lambda: len(ran) >= 3, timeout=10, what="three occurrences")
        assert getattr(scheduler.broker, "schedule_driver", "missing") is None  # stopped with the worker
        dues = [due for _, due in ran[:3]]
        assert all(d is not None and d.microsecond == 0 for d in dues)  # on the second
        assert [(b - a).total_seconds() for a, b in itertools.pairwise(dues)] == [1.0, 1.0]  # type: ignore[operator]
        assert [job_id for job_id, _ in ran[:3]] == [occurrence_job_id("tick", d) for d in dues]  # type: ignore[arg-type]
