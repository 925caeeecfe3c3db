"""InstantJobScheduler: runs now, in the caller, after a JSON round trip."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from structlog.testing import capture_logs

import jobflow
from jobflow import JobRegistry


def make_jobs(registry: JobRegistry, seen: list[Any]) -> tuple[Any, Any]:
    class Record(jobflow.Job, registry=registry):
        value: int

        def execute(self, ctx: jobflow.JobContext) -> None:
            seen.append((self.value, ctx.job_id, ctx.attempt, ctx.job_name))

    class AsyncRecord(jobflow.Job, registry=registry):
        value: int

        async def execute(self, ctx: jobflow.JobContext) -> None:
            await asyncio.sleep(0)
            seen.append(("async", self.value))

    return Record, AsyncRecord


class TestRunsNow:
    def test_runs_in_caller_and_returns_id(self, registry: JobRegistry) -> None:
        """schedule runs the job before returning, and returns the id the job saw."""
        seen: list[Any] = []
        Record, _ = make_jobs(registry, seen)
        job_id = jobflow.InstantJobScheduler(registry).schedule_now(Record(value=5))
        assert seen == [(5, job_id, 1, "Record")]

    def test_job_sees_a_copy_made_through_json(self, registry: JobRegistry) -> None:
        """The job runs on a JSON round trip of itself, so data that cannot cross the wire fails here."""
        seen: list[Any] = []

        class Holder(jobflow.Job, registry=registry):
            payload: Any

            def execute(self, ctx: jobflow.JobContext) -> None:
                seen.append(self)

        original = Holder(payload={"n": 1})
        jobflow.InstantJobScheduler(registry).schedule(original)
        assert seen == [original]
        assert seen[0] is not original
        with pytest.raises(Exception, match="serialize"):
            jobflow.InstantJobScheduler(registry).schedule(Holder(payload=object()))

    def test_delay_is_ignored_with_a_warning(self, registry: JobRegistry) -> None:
        """A delay runs the job now and logs a warning that it was ignored."""
        seen: list[Any] = []
        Record, _ = make_jobs(registry, seen)
        with capture_logs() as logs:
            job_id = jobflow.InstantJobScheduler(registry).schedule(Record(value=1), delay=timedelta(hours=1))
        assert len(seen) == 1
        warnings = [e for e in logs if e["event"] == "job.delay_ignored"]
        assert len(warnings) == 1
        assert warnings[0]["log_level"] == "warning"
        assert warnings[0]["job_id"] == job_id

    def test_no_warning_without_delay(self, registry: JobRegistry) -> None:
        """Scheduling now logs no delay warning."""
        Record, _ = make_jobs(registry, [])
        with capture_logs() as logs:
            jobflow.InstantJobScheduler(registry).schedule(Record(value=1), delay=timedelta(seconds=-5))
        assert not [e for e in logs if e["event"] == "job.delay_ignored"]

    def test_exception_propagates(self, registry: JobRegistry) -> None:
        """The job's exception reaches the caller."""

        class Boom(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            jobflow.InstantJobScheduler(registry).schedule(Boom())


class TestAsync:
    def test_async_job_from_sync_code(self, registry: JobRegistry) -> None:
        """An async job scheduled from synchronous code runs to completion."""
        seen: list[Any] = []
        _, AsyncRecord = make_jobs(registry, seen)
        jobflow.InstantJobScheduler(registry).schedule(AsyncRecord(value=2))
        assert seen == [("async", 2)]

    def test_async_job_inside_running_loop(self, registry: JobRegistry) -> None:
        """schedule_async runs async and sync jobs inside a running event loop."""
        seen: list[Any] = []
        Record, AsyncRecord = make_jobs(registry, seen)
        scheduler = jobflow.InstantJobScheduler(registry)

        async def main() -> None:
            await scheduler.schedule_async(AsyncRecord(value=3))
            await scheduler.schedule_async(Record(value=4))

        asyncio.run(main())
        assert seen[0] == ("async", 3)
        assert seen[1][0] == 4

    def test_sync_schedule_of_async_job_inside_loop_says_what_to_do(self, registry: JobRegistry) -> None:
        """Blocking on an async job inside a running loop is refused with a pointer to schedule_async."""
        _, AsyncRecord = make_jobs(registry, [])
        scheduler = jobflow.InstantJobScheduler(registry)

        async def main() -> None:
            scheduler.schedule(AsyncRecord(value=1))

        with pytest.raises(jobflow.SchedulingError, match="schedule_async"):
            asyncio.run(main())


class TestPublishCommandJob:
    def test_dispatches_to_handler_in_process(self, registry: JobRegistry) -> None:
        """A PublishCommandJob run instantly hands its command to the handler, after a JSON round trip."""
        handled: list[Any] = []

        class SendEmail(jobflow.Command, registry=registry):
            to: str

        @jobflow.command_handler(SendEmail)
        def send(command: SendEmail, ctx: jobflow.CommandContext) -> None:
            handled.append((command, ctx.job_id, ctx.command_name))

        job_id = jobflow.InstantJobScheduler(registry).schedule(jobflow.PublishCommandJob.create(SendEmail(to="a@b")))
        assert handled == [(SendEmail(to="a@b"), job_id, "SendEmail")]

    def test_async_handler_inside_loop(self, registry: JobRegistry) -> None:
        """An async handler runs through schedule_async."""
        handled: list[str] = []

        class Notify(jobflow.Command, registry=registry):
            text: str

        @jobflow.command_handler(Notify)
        async def notify(command: Notify, ctx: jobflow.CommandContext) -> None:
            await asyncio.sleep(0)
            handled.append(command.text)

        scheduler = jobflow.InstantJobScheduler(registry)
        asyncio.run(scheduler.schedule_async(jobflow.PublishCommandJob.create(Notify(text="hi"))))
        assert handled == ["hi"]

    def test_failing_handler_propagates(self, registry: JobRegistry) -> None:
        """A handler's failure is not swallowed."""

        class Fails(jobflow.Command, registry=registry):
            pass

        @jobflow.command_handler(Fails)
        def fails(command: Fails, ctx: jobflow.CommandContext) -> None:
            raise ValueError("handler failed")

        with pytest.raises(ValueError, match="handler failed"):
            jobflow.InstantJobScheduler(registry).schedule(jobflow.PublishCommandJob.create(Fails()))

    def test_create_refuses_non_commands(self) -> None:
        """PublishCommandJob.create takes a Command."""
        with pytest.raises(TypeError, match=r"takes a jobflow\.Command"):
            jobflow.PublishCommandJob.create("not a command")  # type: ignore[arg-type]

    def test_unknown_command_fails(self, registry: JobRegistry) -> None:
        """A command nobody registered is an UnknownCommandError when dispatched."""
        job = jobflow.PublishCommandJob(command_name="Ghost", command_version=1, command_data={})
        with pytest.raises(jobflow.UnknownCommandError, match="Ghost"):
            jobflow.InstantJobScheduler(registry).schedule(job)


class TestMisuse:
    def test_delay_and_run_at_together(self, registry: JobRegistry) -> None:
        """delay and run_at together are refused."""
        Record, _ = make_jobs(registry, [])
        with pytest.raises(jobflow.SchedulingError, match="not both"):
            jobflow.InstantJobScheduler(registry).schedule(
                Record(value=1), delay=timedelta(seconds=1), run_at=datetime.now(UTC)
            )

    def test_naive_run_at(self, registry: JobRegistry) -> None:
        """A naive run_at is refused, saying it must be timezone-aware."""
        Record, _ = make_jobs(registry, [])
        with pytest.raises(jobflow.SchedulingError, match="timezone-aware"):
            jobflow.InstantJobScheduler(registry).schedule(Record(value=1), run_at=datetime(2030, 1, 1))

    def test_past_run_at_runs_now(self, registry: JobRegistry) -> None:
        """A run_at in the past means now."""
        seen: list[Any] = []
        Record, _ = make_jobs(registry, seen)
        with capture_logs() as logs:
            jobflow.InstantJobScheduler(registry).schedule(Record(value=1), run_at=datetime(2000, 1, 1, tzinfo=UTC))
        assert len(seen) == 1
        assert not [e for e in logs if e["event"] == "job.delay_ignored"]

    def test_delay_must_be_timedelta(self, registry: JobRegistry) -> None:
        """A number is not a delay: the error names the type expected."""
        Record, _ = make_jobs(registry, [])
        with pytest.raises(jobflow.SchedulingError, match="timedelta"):
            jobflow.InstantJobScheduler(registry).schedule(Record(value=1), delay=5)  # type: ignore[arg-type]

    def test_delay_beyond_maximum(self, registry: JobRegistry) -> None:
        """A delay past MAX_DELAY is refused at schedule time."""
        Record, _ = make_jobs(registry, [])
        with pytest.raises(jobflow.SchedulingError, match=r"at most \d+ days"):
            jobflow.InstantJobScheduler(registry).schedule(Record(value=1), delay=jobflow.MAX_DELAY + timedelta(days=1))

    def test_not_a_job(self, registry: JobRegistry) -> None:
        """Scheduling something that is not a Job names what was given."""
        with pytest.raises(jobflow.SchedulingError, match="not dict"):
            jobflow.InstantJobScheduler(registry).schedule({"name": "x"})  # type: ignore[arg-type]

    def test_job_from_another_registry(self, registry: JobRegistry) -> None:
        """A job the scheduler's registry does not know is an UnknownJobError."""
        other = JobRegistry()

        class Elsewhere(jobflow.Job, registry=other):
            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        with pytest.raises(jobflow.UnknownJobError, match="Elsewhere"):
            jobflow.InstantJobScheduler(registry).schedule(Elsewhere())

    def test_schedulers_satisfy_the_protocol(self, registry: JobRegistry, memory_settings: jobflow.Settings) -> None:
        """Both schedulers are JobSchedulers."""
        assert isinstance(jobflow.InstantJobScheduler(registry), jobflow.JobScheduler)
        assert isinstance(jobflow.BrokerJobScheduler(settings=memory_settings), jobflow.JobScheduler)
