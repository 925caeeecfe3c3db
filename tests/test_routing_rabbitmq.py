"""Queues per type on RabbitMQ: where routed jobs land, which worker runs them, and their failure path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pika
import pytest

import jobflow
from jobflow import JobRegistry, Settings
from jobflow.broker.names import jobs_queue, routed_queue
from jobflow.dead_letter import dead_letter_queue

from .cli_helpers import ROOT, run_cli, run_json
from .faults import consumer_count, message_count, wait_for_consumer
from .helpers import eventually, tracked_worker, wait
from .worker_app import RoutedTouchFile, TouchFile

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def emails_worker(amqp_settings: Settings, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """`dramatiq jobflow.actors tests.worker_app --queues <prefix>.emails`: a worker for one queue."""
    env = {
        **os.environ,
        "JOBFLOW_BROKER_URL": amqp_settings.broker_url,
        "JOBFLOW_QUEUE_PREFIX": amqp_settings.queue_prefix,
        "JOBFLOW_LOG_FORMAT": "json",
    }
    emails = routed_queue(amqp_settings.queue_prefix, "emails")
    log = (tmp_path / "worker.log").open("w")
    command = [sys.executable, "-m", "dramatiq", "jobflow.actors", "tests.worker_app", "--queues", emails]
    proc = subprocess.Popen([*command, "-p", "1", "-t", "2"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_consumer(amqp_settings.broker_url, emails)
        yield proc  # type: ignore[misc]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_a_routed_job_lands_in_its_queue_and_waits_for_a_worker_of_it(amqp_settings: Settings) -> None:
    """Nothing is lost while a queue has no worker: it waits, and `jobflow status` shows it so."""
    p = amqp_settings.queue_prefix
    with jobflow.BrokerJobScheduler(settings=amqp_settings) as scheduler:
        scheduler.schedule(RoutedTouchFile(path="/a", text="1"))
        scheduler.schedule(TouchFile(path="/b", text="2"), queue="emails")
        scheduler.schedule_now(TouchFile(path="/c", text="3"))
    emails = routed_queue(p, "emails")
    url = amqp_settings.broker_url
    assert (message_count(url, emails), message_count(url, jobs_queue(p))) == (2, 1)
    doc = run_json("status", "-m", "tests.worker_app", settings=amqp_settings)
    rows = {row["queue"]: row for row in doc["queues"]}
    assert (rows[emails]["ready"], rows[emails]["consumers"]) == (2, 0)
    without_modules = run_json("status", "--queue", "emails", settings=amqp_settings)
    assert {row["queue"]: row["ready"] for row in without_modules["queues"]}[emails] == 2


def test_a_worker_given_queues_runs_those_and_leaves_the_rest(
    amqp_settings: Settings, emails_worker: subprocess.Popen[str], tmp_path: Path
) -> None:
    p = amqp_settings.queue_prefix
    routed, plain = tmp_path / "routed.json", tmp_path / "plain.json"
    with jobflow.BrokerJobScheduler(settings=amqp_settings) as scheduler:
        scheduler.schedule_now(TouchFile(path=str(plain), text="default queue"))
        scheduler.schedule_now(RoutedTouchFile(path=str(routed), text="emails"))
    eventually(routed.exists, timeout=30, what="the routed job to run")
    time.sleep(1.0)  # the default-queue job had every chance to run too
    assert not plain.exists()
    assert message_count(amqp_settings.broker_url, jobs_queue(p)) == 1
    assert consumer_count(amqp_settings.broker_url, jobs_queue(p)) == 0


class TestFailurePath:
    def test_delayed_retried_dead_lettered_and_replayed_within_its_queue(
        self, registry: JobRegistry, amqp_settings: Settings
    ) -> None:
        """The ladder delivers a routed job to its queue, a retry returns to it, its dead letter goes to
        its .XQ, and a replay puts it back there."""
        attempts: list[int] = []

        class Bounce(
            jobflow.Job,
            registry=registry,
            queue="reports",
            retry=jobflow.RetryPolicy(max_attempts=2, backoff=timedelta(milliseconds=100)),
        ):
            def execute(self, ctx: jobflow.JobContext) -> None:
                attempts.append(ctx.attempt)
                raise jobflow.TransientError("not yet")

        reports = routed_queue(amqp_settings.queue_prefix, "reports")
        with (
            jobflow.BrokerJobScheduler(settings=amqp_settings, registry=registry) as scheduler,
            tracked_worker(scheduler.broker, registry, amqp_settings) as tracker,
        ):
            job_id = scheduler.schedule(Bounce(), delay=timedelta(milliseconds=300))
            wait(tracker, lambda t: len(t.outcomes) == 2)
            eventually(lambda: message_count(amqp_settings.broker_url, dead_letter_queue(reports)) == 1, 10, "the .XQ")
        assert attempts == [1, 2]
        assert {o.queue_name for o in tracker.outcomes} == {reports}
        assert message_count(amqp_settings.broker_url, dead_letter_queue(jobs_queue(amqp_settings.queue_prefix))) == 0
        listed = run_json("dead-letters", "list", "--queue", "reports", settings=amqp_settings)["dead_letters"]
        assert [row["id"] for row in listed] == [job_id]
        replayed = run_cli("dead-letters", "replay", job_id[:8], "--queue", "reports", settings=amqp_settings)
        assert replayed.exit_code == 0, replayed.output
        assert message_count(amqp_settings.broker_url, reports) == 1
        assert message_count(amqp_settings.broker_url, dead_letter_queue(reports)) == 0

    def test_moving_a_type_loses_nothing_waiting_in_its_old_queue(
        self, registry: JobRegistry, amqp_settings: Settings
    ) -> None:
        """A release moved the type to `emails`: what waited in `jobs` (always served) still runs, and
        an old routed queue is served while JOBFLOW_EXTRA_QUEUES names it."""

        class Moved(jobflow.Job, registry=registry, queue="emails"):
            n: int

            def execute(self, ctx: jobflow.JobContext) -> None: ...

        settings = amqp_settings.model_copy(update={"extra_queues": "billing"})
        with jobflow.BrokerJobScheduler(settings=settings, registry=registry) as scheduler:
            before = {  # as the previous release published them
                scheduler.schedule(Moved(n=1), queue="jobs"): jobs_queue(settings.queue_prefix),
                scheduler.schedule(Moved(n=2), queue="billing"): routed_queue(settings.queue_prefix, "billing"),
            }
            after = scheduler.schedule(Moved(n=3))
            with tracked_worker(scheduler.broker, registry, settings) as tracker:
                wait(tracker, lambda t: len(t.succeeded()) == 3)
        ran = {o.message_id: o.queue_name for o in tracker.succeeded()}
        assert ran == {**before, after: routed_queue(settings.queue_prefix, "emails")}


def test_topology_declare_declares_routed_queues(amqp_settings: Settings) -> None:
    result = run_cli("topology", "declare", "-m", "tests.worker_app", "--queue", "billing", settings=amqp_settings)
    assert result.exit_code == 0, result.output
    p = amqp_settings.queue_prefix
    connection = pika.BlockingConnection(pika.URLParameters(amqp_settings.broker_url))
    try:
        for queue in (routed_queue(p, "emails"), routed_queue(p, "billing")):
            assert queue in result.output
            for name in (queue, dead_letter_queue(queue)):
                connection.channel().queue_declare(name, passive=True)  # a 404 here would fail the test
    finally:
        connection.close()


def test_a_job_scheduling_to_a_routed_queue_does_not_make_its_worker_consume_it(
    registry: JobRegistry, amqp_settings: Settings
) -> None:
    """The worker lacks the routed type: consuming its queue would only bounce its messages."""

    class Elsewhere(jobflow.Job, registry=JobRegistry(), queue="billing"):  # another application's type
        def execute(self, ctx: jobflow.JobContext) -> None: ...

    class Fanout(jobflow.Job, registry=registry):
        def execute(self, ctx: jobflow.JobContext) -> None:
            inner = jobflow.BrokerJobScheduler(broker=scheduler.broker, settings=amqp_settings, registry=other)
            inner.schedule_now(Elsewhere())

    other = Elsewhere.registry
    billing = routed_queue(amqp_settings.queue_prefix, "billing")
    with (
        jobflow.BrokerJobScheduler(settings=amqp_settings, registry=registry) as scheduler,
        tracked_worker(scheduler.broker, registry, amqp_settings) as tracker,
    ):
        scheduler.schedule_now(Fanout())
        wait(tracker, lambda t: len(t.succeeded()) == 1)
        time.sleep(0.5)
        assert message_count(amqp_settings.broker_url, billing) == 1
        assert consumer_count(amqp_settings.broker_url, billing) == 0
        assert billing not in scheduler.broker.get_declared_queues()
