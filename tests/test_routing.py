"""Queues per type: the ``queue=`` class option, the schedulers' override, and workers that serve them."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

import jobflow
from jobflow import JobRegistry, Settings
from jobflow.broker.memory import memory_broker
from jobflow.broker.names import commands_queue, jobs_queue, routed_queue
from jobflow.errors import ConfigurationError, JobflowTypeError
from jobflow.middleware.targets import declare_routed_queues
from jobflow.publish_command import PublishCommandJobV1
from jobflow.worker import declare_actors

from .helpers import tracked_worker, wait


def _memory(**settings: Any) -> tuple[Settings, jobflow.BrokerJobScheduler]:
    given = Settings(broker_url=f"memory://routing-{uuid.uuid4().hex}", queue_prefix="r", **settings)
    return given, jobflow.BrokerJobScheduler(settings=given, broker=memory_broker(given.broker_url, given))


class TestClassOption:
    def test_default_inherited_and_overridden(self, registry: JobRegistry) -> None:
        class Plain(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None: ...

        class Mail(jobflow.Job, registry=registry, queue="emails"):
            def execute(self, ctx: jobflow.JobContext) -> None: ...

        class Reminder(Mail, registry=registry, name="Reminder"): ...

        class Report(Mail, registry=registry, name="Report", queue="reports.slow"): ...

        class Charge(jobflow.Command, registry=registry, queue="billing"):
            amount: int

        class Note(jobflow.Command, registry=registry):
            text: str

        queues = {cls: cls.__jobflow_queue__ for cls in (Plain, Mail, Reminder, Report, Charge, Note)}
        assert list(queues.values()) == ["jobs", "emails", "emails", "reports.slow", "billing", "commands"]

    @pytest.mark.parametrize(
        ("queue", "error", "says"),
        [
            ("", ConfigurationError, "is not a queue name"),
            ("e mails", ConfigurationError, "is not a queue name"),
            ("emails.", ConfigurationError, "is not a queue name"),
            ("delay", ConfigurationError, "is reserved"),
            ("delay.L01", ConfigurationError, "is reserved"),
            ("emails.XQ", ConfigurationError, "is reserved"),
            (7, JobflowTypeError, "queue must be a str"),
        ],
    )
    def test_bad_names_are_refused_naming_the_class(
        self, registry: JobRegistry, queue: object, error: type[Exception], says: str
    ) -> None:
        with pytest.raises(error, match=says) as raised:

            class Bad(jobflow.Job, registry=registry, queue=queue):
                def execute(self, ctx: jobflow.JobContext) -> None: ...

        assert str(raised.value).startswith("TestClassOption.test_bad_names_are_refused_naming_the_class.<locals>.Bad:")


class TestSchedulers:
    def test_a_type_lands_in_its_queue_and_a_call_can_route_elsewhere(self, registry: JobRegistry) -> None:
        class Mail(jobflow.Job, registry=registry, queue="emails"):
            def execute(self, ctx: jobflow.JobContext) -> None: ...

        class Plain(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None: ...

        _, scheduler = _memory()
        scheduler.registry = registry
        scheduler.schedule(Mail())
        scheduler.schedule_now(Plain())
        scheduler.schedule(Plain(), queue="urgent")
        scheduler.schedule_many([Mail(), Mail()], queue="bulk")
        broker = scheduler.broker
        counts = {q: broker.queues[q].qsize() for q in ("r.emails", "r.jobs", "r.urgent", "r.bulk")}
        assert counts == {"r.emails": 1, "r.jobs": 1, "r.urgent": 1, "r.bulk": 2}
        with pytest.raises(ConfigurationError, match="is not a queue name"):
            scheduler.schedule(Plain(), queue="no spaces")
        assert broker.queues["r.jobs"].qsize() == 1

    def test_instant_scheduler_accepts_and_ignores_the_routing(self, registry: JobRegistry) -> None:
        ran: list[str] = []

        class Mail(jobflow.Job, registry=registry, queue="emails"):
            def execute(self, ctx: jobflow.JobContext) -> None:
                ran.append(ctx.job_id)

        scheduler = jobflow.InstantJobScheduler(registry)
        ids = [scheduler.schedule(Mail(), queue="other"), scheduler.schedule_now(Mail())]
        assert ran == ids
        with pytest.raises(ConfigurationError, match="is reserved"):
            scheduler.schedule(Mail(), queue="delay")

    def test_publish_command_job_carries_the_commands_queue(self, registry: JobRegistry) -> None:
        class Charge(jobflow.Command, registry=registry, queue="billing"):
            amount: int

        job = jobflow.PublishCommandJob.create(Charge(amount=3))
        assert (job.job_name, job.job_version, job.command_queue) == ("PublishCommand", 2, "billing")
        old = {"command_name": "Charge", "command_version": 1, "command_data": {"amount": 3}}
        assert isinstance(registry.get("PublishCommand", 1).from_data(old), PublishCommandJobV1)
        with pytest.raises(ValueError, match="is not a queue name"):
            jobflow.PublishCommandJob.from_data({**old, "command_queue": "a b"})


class TestWorkers:
    def test_a_worker_consumes_every_registered_types_queue_and_runs_routed_work(self, registry: JobRegistry) -> None:
        handled: list[int] = []

        class Mail(jobflow.Job, registry=registry, queue="emails"):
            def execute(self, ctx: jobflow.JobContext) -> None: ...

        class Charge(jobflow.Command, registry=registry, queue="billing"):
            amount: int

        @jobflow.command_handler(Charge, registry=registry)
        def charge(command: Charge, ctx: jobflow.CommandContext) -> None:
            handled.append(command.amount)

        settings, scheduler = _memory(extra_queues="retired, old.reports")
        scheduler.registry = registry
        broker = scheduler.broker
        declare_actors(broker, registry=registry, settings=settings)
        assert declare_routed_queues(broker) == [
            routed_queue("r", q) for q in ("billing", "emails", "jobs", "old.reports", "retired")
        ]
        mail = scheduler.schedule(Mail())
        forward = scheduler.schedule(jobflow.PublishCommandJob.create(Charge(amount=9)))
        with tracked_worker(broker, registry, settings) as tracker:
            wait(tracker, lambda t: len(t.succeeded()) == 3)
        queues = {o.message_id: o.queue_name for o in tracker.succeeded()}
        assert queues[mail] == "r.emails"
        assert queues[forward] == jobs_queue("r")
        assert [q for q in queues.values() if q not in ("r.emails", jobs_queue("r"))] == ["r.billing"]
        assert handled == [9]
        assert commands_queue("r") in broker.get_declared_queues()  # the default one is still served

    def test_a_version_1_publish_command_goes_to_the_queue_its_type_names_here(self, registry: JobRegistry) -> None:
        handled: list[int] = []

        class Charge(jobflow.Command, registry=registry, queue="billing"):
            amount: int

        @jobflow.command_handler(Charge, registry=registry)
        def charge(command: Charge, ctx: jobflow.CommandContext) -> None:
            handled.append(command.amount)

        settings, scheduler = _memory()
        scheduler.registry = registry
        data = json.loads(
            PublishCommandJobV1(command_name="Charge", command_version=1, command_data={"amount": 4}).model_dump_json()
        )
        scheduler.schedule(PublishCommandJobV1.from_data(data))
        with tracked_worker(scheduler.broker, registry, settings) as tracker:
            wait(tracker, lambda t: len(t.succeeded()) == 2)
        assert [o.queue_name for o in tracker.succeeded() if o.actor_name == "jobflow.dispatch_command"] == [
            "r.billing"
        ]
        assert handled == [4]
