"""The pipeline against the real RabbitMQ: publishing, the actors, a worker process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pika
import pytest

import jobflow
from jobflow import JobRegistry, Settings
from jobflow.broker.names import DISPATCH_COMMAND_ACTOR, jobs_queue

from .faults import wait_for_consumer
from .helpers import tracked_worker, wait
from .worker_app import TouchFile, WriteFileCommand

ROOT = Path(__file__).resolve().parent.parent


def wait_for_file(path: Path, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return dict(json.loads(path.read_text()))
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written within {timeout} s")


@pytest.fixture
def worker_process(amqp_settings: Settings, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """`dramatiq jobflow.actors tests.worker_app` as a separate process on this test's queues."""
    env = {
        **os.environ,
        "JOBFLOW_BROKER_URL": amqp_settings.broker_url,
        "JOBFLOW_QUEUE_PREFIX": amqp_settings.queue_prefix,
        "JOBFLOW_LOG_FORMAT": "json",
    }
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "jobflow.actors", "tests.worker_app", "-p", "1", "-t", "2"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_consumer(amqp_settings.broker_url, jobs_queue(amqp_settings.queue_prefix))
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


class TestPublishing:
    def test_message_is_persistent_dramatiq_json(self, amqp_settings: Settings) -> None:
        """BrokerJobScheduler publishes a persistent Dramatiq message whose argument is the job envelope."""
        with jobflow.BrokerJobScheduler(settings=amqp_settings) as scheduler:
            assert scheduler.broker.confirm_delivery  # type: ignore[attr-defined]
            job_id = scheduler.schedule_now(TouchFile(path="/nonexistent", text="x"))
        connection = pika.BlockingConnection(pika.URLParameters(amqp_settings.broker_url))
        try:
            method, properties, body = connection.channel().basic_get(jobs_queue(amqp_settings.queue_prefix))
        finally:
            connection.close()
        assert method is not None
        assert properties is not None
        assert body is not None
        assert properties.delivery_mode == 2
        message = json.loads(body)
        assert message["message_id"] == job_id
        assert message["actor_name"] == "jobflow.run_job"
        envelope = message["args"][0]
        assert (envelope["name"], envelope["version"], envelope["data"]) == (
            "TouchFile",
            1,
            {"path": "/nonexistent", "text": "x"},
        )
        assert envelope["job_id"] == job_id

    def test_queue_deleted_behind_the_scheduler(self, amqp_settings: Settings) -> None:
        """With confirms and mandatory publishing, a queue deleted behind the scheduler is declared again."""
        queue = jobs_queue(amqp_settings.queue_prefix)
        with jobflow.BrokerJobScheduler(settings=amqp_settings) as scheduler:
            scheduler.schedule_now(TouchFile(path="/a", text="1"))
            connection = pika.BlockingConnection(pika.URLParameters(amqp_settings.broker_url))
            try:
                connection.channel().queue_delete(queue)
                scheduler.schedule_now(TouchFile(path="/b", text="2"))
                declared = connection.channel().queue_declare(queue, passive=True)
            finally:
                connection.close()
        assert declared.method.message_count == 1

    def test_unreachable_broker_hides_password(self) -> None:
        """Publishing to a broker that is not there fails without showing the password."""
        settings = Settings(broker_url="amqp://guest:topsecret@127.0.0.1:1/", publish_timeout=1)
        with pytest.raises(Exception) as info:  # noqa: PT011  (pika or dramatiq's connection error)
            jobflow.BrokerJobScheduler(settings=settings).schedule_now(TouchFile(path="/x", text="x"))
        assert "topsecret" not in str(info.value)
        assert "topsecret" not in repr(jobflow.create_broker(settings))


class TestInProcessOnRabbitmq:
    def test_publish_command_job_forwards_through_command_bus(
        self, registry: JobRegistry, amqp_settings: Settings
    ) -> None:
        """On RabbitMQ, PublishCommandJob forwards its command to the command-bus actor's queue and handler."""
        handled: list[Any] = []

        class Greet(jobflow.Command, registry=registry):
            who: str

        @jobflow.command_handler(Greet)
        def greet(command: Greet, ctx: jobflow.CommandContext) -> None:
            handled.append((command.who, ctx.job_id, ctx.queue))

        with jobflow.BrokerJobScheduler(settings=amqp_settings, registry=registry) as scheduler:
            with tracked_worker(scheduler.broker, registry, amqp_settings) as tracker:
                job_id = scheduler.schedule_now(jobflow.PublishCommandJob.create(Greet(who="rabbit")))
                wait(tracker, lambda t: len(t.succeeded(DISPATCH_COMMAND_ACTOR)) == 1, timeout=30)
            scheduler.broker.close()
        assert handled == [("rabbit", job_id, f"{amqp_settings.queue_prefix}.commands")]


class TestWorkerProcess:
    def test_worker_runs_published_jobs(
        self, amqp_settings: Settings, worker_process: subprocess.Popen[str], tmp_path: Path
    ) -> None:
        """`dramatiq jobflow.actors` runs a job BrokerJobScheduler published, and a command it forwards."""
        done, command_done = tmp_path / "done.json", tmp_path / "command.json"
        with jobflow.BrokerJobScheduler(settings=amqp_settings) as scheduler:
            job_id = scheduler.schedule_now(TouchFile(path=str(done), text="hello"))
            publish_id = scheduler.schedule_now(
                jobflow.PublishCommandJob.create(WriteFileCommand(path=str(command_done), text="cmd"))
            )
        record = wait_for_file(done)
        assert (record["text"], record["job_id"], record["attempt"]) == ("hello", job_id, 1)
        command = wait_for_file(command_done)
        assert (command["text"], command["job_id"]) == ("cmd", publish_id)

    def test_delay_is_honoured(
        self, amqp_settings: Settings, worker_process: subprocess.Popen[str], tmp_path: Path
    ) -> None:
        """A job delayed by 2 s runs no earlier than 2 s after it was scheduled (EventFlow issue 1104)."""
        delayed, now = tmp_path / "delayed.json", tmp_path / "now.json"
        with jobflow.BrokerJobScheduler(settings=amqp_settings) as scheduler:
            t0 = time.time()
            scheduler.schedule(TouchFile(path=str(delayed), text="late"), delay=timedelta(seconds=2))
            scheduler.schedule_now(TouchFile(path=str(now), text="now"))
        first = wait_for_file(now)
        late = wait_for_file(delayed)
        assert late["at"] - t0 >= 2.0
        assert first["at"] < late["at"]

    def test_worker_log_is_json_with_identity_and_no_password(
        self, amqp_settings: Settings, worker_process: subprocess.Popen[str], tmp_path: Path
    ) -> None:
        """The worker logs job events as JSON with the job's fields, and never the broker password."""
        done = tmp_path / "async.json"
        with jobflow.BrokerJobScheduler(settings=amqp_settings) as scheduler:
            from .worker_app import AsyncTouchFile

            job_id = scheduler.schedule_now(AsyncTouchFile(path=str(done)))
        wait_for_file(done)
        time.sleep(0.5)
        text = (tmp_path / "worker.log").read_text()
        events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        succeeded = [e for e in events if e.get("event") == "job.succeeded" and e.get("job_id") == job_id]
        assert succeeded, text[-2000:]
        assert succeeded[0]["job_name"] == "AsyncTouchFile"
        assert "worker.started" in {e.get("event") for e in events}
        password = amqp_settings.broker_url.split("@")[0].rsplit(":", 1)[1]
        assert f":{password}@" not in text
