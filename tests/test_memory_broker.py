"""BrokerJobScheduler and the actors on the in-memory broker (Dramatiq's stub broker)."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta
from typing import Any

import pytest

import jobflow
from jobflow import JobRegistry, Settings
from jobflow.broker.names import DISPATCH_COMMAND_ACTOR, RUN_JOB_ACTOR

from .helpers import tracked_worker, wait


def define(registry: JobRegistry, seen: list[Any]) -> dict[str, Any]:
    class Record(jobflow.Job, registry=registry):
        value: int

        def execute(self, ctx: jobflow.JobContext) -> None:
            seen.append(("job", self.value, ctx.job_id, ctx.attempt, time.time(), threading.get_ident()))

    class AsyncRecord(jobflow.Job, registry=registry):
        value: int

        async def execute(self, ctx: jobflow.JobContext) -> None:
            await asyncio.sleep(0.01)
            seen.append(("async-job", self.value, asyncio.get_running_loop() is not None))

    class Note(jobflow.Command, registry=registry):
        text: str
        fail_times: int = 0

    @jobflow.command_handler(Note)
    def note(command: Note, ctx: jobflow.CommandContext) -> None:
        if ctx.attempt <= command.fail_times:
            raise RuntimeError(f"handler failed on attempt {ctx.attempt}")
        seen.append(("command", command.text, ctx.job_id, ctx.attempt))

    class AsyncNote(jobflow.Command, registry=registry):
        text: str

    @jobflow.command_handler(AsyncNote)
    async def async_note(command: AsyncNote, ctx: jobflow.CommandContext) -> None:
        await asyncio.sleep(0.01)
        seen.append(("async-command", command.text))

    return {"Record": Record, "AsyncRecord": AsyncRecord, "Note": Note, "AsyncNote": AsyncNote}


class TestInMemory:
    def test_job_runs_on_worker(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """A scheduled job runs on the worker with the id schedule returned, on attempt 1."""
        seen: list[Any] = []
        types = define(registry, seen)
        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        with tracked_worker(scheduler.broker, registry, memory_settings) as tracker:
            job_id = scheduler.schedule_now(types["Record"](value=7))
            wait(tracker, lambda t: len(t.succeeded(RUN_JOB_ACTOR)) == 1)
        assert seen[0][:4] == ("job", 7, job_id, 1)
        assert seen[0][5] != threading.get_ident()

    def test_memory_url_is_shared_in_process(self, memory_settings: Settings) -> None:
        """Two schedulers on the same memory:// URL share one broker; another URL is another broker."""
        a = jobflow.BrokerJobScheduler(settings=memory_settings)
        b = jobflow.BrokerJobScheduler(memory_settings.broker_url)
        c = jobflow.BrokerJobScheduler("memory://another-one")
        assert a.broker is b.broker
        assert a.broker is not c.broker

    def test_publish_command_job_goes_through_command_bus_actor(
        self, registry: JobRegistry, memory_settings: Settings
    ) -> None:
        """PublishCommandJob forwards its command to the command-bus actor, which calls the handler."""
        seen: list[Any] = []
        types = define(registry, seen)
        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        with tracked_worker(scheduler.broker, registry, memory_settings) as tracker:
            job_id = scheduler.schedule_now(jobflow.PublishCommandJob.create(types["Note"](text="hi")))
            wait(tracker, lambda t: len(t.succeeded(DISPATCH_COMMAND_ACTOR)) == 1)
        assert seen == [("command", "hi", job_id, 1)]
        command_msg = tracker.succeeded(DISPATCH_COMMAND_ACTOR)[0]
        assert command_msg.message_id != job_id
        assert command_msg.args[0]["job_id"] == job_id

    def test_failing_handler_fails_the_command_message(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """A handler's failure is a failed command-bus message, retried there; the job itself succeeded."""
        seen: list[Any] = []
        types = define(registry, seen)
        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        with tracked_worker(scheduler.broker, registry, memory_settings) as tracker:
            scheduler.schedule_now(jobflow.PublishCommandJob.create(types["Note"](text="retry me", fail_times=1)))
            wait(tracker, lambda t: len(t.succeeded(DISPATCH_COMMAND_ACTOR)) == 1)
        commands = [o for o in tracker.outcomes if o.actor_name == DISPATCH_COMMAND_ACTOR]
        assert [o.error is None for o in commands] == [False, True]
        assert "handler failed on attempt 1" in (commands[0].error or "")
        assert [o.error for o in tracker.outcomes if o.actor_name == RUN_JOB_ACTOR] == [None]
        assert seen[-1][3] == 2

    def test_async_job_and_handler(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """Async execute and async handlers run on the worker's event loop."""
        seen: list[Any] = []
        types = define(registry, seen)
        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        with tracked_worker(scheduler.broker, registry, memory_settings) as tracker:
            scheduler.schedule_now(types["AsyncRecord"](value=1))
            scheduler.schedule_now(jobflow.PublishCommandJob.create(types["AsyncNote"](text="a")))
            wait(tracker, lambda t: len(t.succeeded()) == 3)
        assert ("async-job", 1, True) in seen
        assert ("async-command", "a") in seen

    def test_schedule_async(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """schedule_async publishes from a running event loop and returns the job's id."""
        seen: list[Any] = []
        types = define(registry, seen)
        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        with tracked_worker(scheduler.broker, registry, memory_settings) as tracker:
            job_id = asyncio.run(scheduler.schedule_async(types["Record"](value=3)))
            wait(tracker, lambda t: len(t.succeeded()) == 1)
        assert seen[0][2] == job_id

    def test_delay_is_honoured(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """A delayed job does not run before its delay has passed (EventFlow issue 1104)."""
        seen: list[Any] = []
        types = define(registry, seen)
        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        with tracked_worker(scheduler.broker, registry, memory_settings) as tracker:
            t0 = time.time()
            scheduler.schedule(types["Record"](value=1), delay=timedelta(seconds=1.5))
            scheduler.schedule_now(types["Record"](value=2))
            wait(tracker, lambda t: len(t.succeeded()) == 2)
        ran = {entry[1]: entry[4] for entry in seen}
        assert ran[1] - t0 >= 1.5
        assert ran[2] < ran[1]

    def test_unknown_job_fails_without_stopping_the_worker(
        self, registry: JobRegistry, memory_settings: Settings
    ) -> None:
        """A message for a job the worker does not know fails with UnknownJobError; later jobs still run."""
        seen: list[Any] = []
        types = define(registry, seen)
        other = JobRegistry()

        class OnlyElsewhere(jobflow.Job, registry=other):
            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        producer = jobflow.BrokerJobScheduler(settings=memory_settings, registry=other)
        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=registry)
        with tracked_worker(scheduler.broker, registry, memory_settings) as tracker:
            producer.schedule_now(OnlyElsewhere())
            scheduler.schedule_now(types["Record"](value=9))
            wait(tracker, lambda t: len(t.succeeded()) == 1 and len(t.outcomes) >= 2)
        failures = [o.error for o in tracker.outcomes if o.error]
        assert failures
        assert failures[0].startswith("UnknownJobError")
        assert seen[0][1] == 9


class TestDeclareActors:
    def test_declared_once_per_broker(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """declare_actors returns the same actors for the same broker."""
        broker = jobflow.create_broker(memory_settings)
        first = jobflow.declare_actors(broker, registry=registry, settings=memory_settings)
        assert jobflow.declare_actors(broker, settings=memory_settings) is first

    def test_conflicting_declaration(self, registry: JobRegistry, memory_settings: Settings) -> None:
        """Another registry or prefix on the same broker is a ConfigurationError."""
        broker = jobflow.create_broker(memory_settings)
        jobflow.declare_actors(broker, registry=registry, settings=memory_settings)
        with pytest.raises(jobflow.ConfigurationError, match="already declared"):
            jobflow.declare_actors(broker, registry=JobRegistry(), settings=memory_settings)
