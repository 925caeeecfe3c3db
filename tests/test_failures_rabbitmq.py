"""The failure path against the real RabbitMQ: retries, dead letters, poison, faults, fuzz."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dramatiq
import pika
import pika.exceptions
import pytest

import jobflow
from jobflow import JobRegistry, RetryPolicy, Settings
from jobflow.broker.names import DISPATCH_COMMAND_ACTOR, RUN_JOB_ACTOR, commands_queue, jobs_queue
from jobflow.broker.queues import dead_letter_queue_arguments, parse_version
from jobflow.dead_letter import dead_letter_queue
from jobflow.testing import OutcomeTracker

from .faults import (
    Delivery,
    connection_closed_before_publish,
    drain,
    is_retry_of,
    message_count,
    publish_raw,
    to_dead_letter_queue,
    vhost_of,
    wait_for_messages,
)
from .helpers import eventually, tracked_worker, wait

ROOT = Path(__file__).resolve().parent.parent
FAST = RetryPolicy(max_attempts=3, backoff=timedelta(milliseconds=20), max_backoff=timedelta(milliseconds=100))


def raw_job(name: str, version: int, data: Any, queue: str, *, actor: str = RUN_JOB_ACTOR) -> dict[str, Any]:
    """A Dramatiq message carrying a job envelope, as a foreign producer might publish it."""
    job_id, now = str(uuid.uuid4()), datetime.now(UTC).isoformat()
    envelope = {"job_id": job_id, "name": name, "version": version, "data": data, "scheduled_at": now, "due_at": now}
    return {
        "queue_name": queue,
        "actor_name": actor,
        "args": [envelope],
        "kwargs": {},
        "options": {},
        "message_id": job_id,
        "message_timestamp": int(time.time() * 1000),
    }


def raw_command(name: str, version: int, data: Any, queue: str) -> dict[str, Any]:
    command_id, now = str(uuid.uuid4()), datetime.now(UTC).isoformat()
    envelope = {"command_id": command_id, "name": name, "version": version, "data": data, "sent_at": now}
    return {
        "queue_name": queue,
        "actor_name": DISPATCH_COMMAND_ACTOR,
        "args": [envelope],
        "kwargs": {},
        "options": {},
        "message_id": command_id,
        "message_timestamp": int(time.time() * 1000),
    }


def encode(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields).encode()


class App:
    """A registry with a good job and a good command, so each test can show the queue still flows."""

    def __init__(self, registry: JobRegistry) -> None:
        self.registry = registry
        self.ran: list[str] = []
        ran = self.ran

        class Good(jobflow.Job, registry=registry):
            label: str

            def execute(self, ctx: jobflow.JobContext) -> None:
                ran.append(self.label)

        class Hello(jobflow.Command, registry=registry):
            label: str

        @jobflow.command_handler(Hello)
        def hello(command: Hello, ctx: jobflow.CommandContext) -> None:
            ran.append(f"command:{command.label}")

        self.Good, self.Hello = Good, Hello

    def prime(self, scheduler: jobflow.BrokerJobScheduler, tracker: OutcomeTracker) -> None:
        """Run one job and one command, so both queues exist and the worker consumes them."""
        scheduler.schedule_now(jobflow.PublishCommandJob.create(self.Hello(label="prime")))
        wait(tracker, lambda t: len(t.succeeded(DISPATCH_COMMAND_ACTOR)) >= 1, timeout=30)

    def still_flowing(self, scheduler: jobflow.BrokerJobScheduler, label: str) -> None:
        """A good job and a good command queued now still run."""
        scheduler.schedule_now(self.Good(label=label))
        scheduler.schedule_now(jobflow.PublishCommandJob.create(self.Hello(label=label)))
        eventually(lambda: {label, f"command:{label}"} <= set(self.ran), what=f"the good job and command {label!r}")


@pytest.fixture
def app(registry: JobRegistry) -> App:
    return App(registry)


@pytest.fixture
def scheduler(amqp_settings: Settings, registry: JobRegistry) -> Iterator[jobflow.BrokerJobScheduler]:
    with jobflow.BrokerJobScheduler(settings=amqp_settings, registry=registry) as scheduler:
        yield scheduler
        scheduler.broker.close()


class TestRetriesOnRabbitmq:
    def test_transient_failures_then_success(
        self, registry: JobRegistry, amqp_settings: Settings, scheduler: jobflow.BrokerJobScheduler
    ) -> None:
        """A job failing transiently twice runs three times and succeeds; its dead-letter queue stays empty."""
        attempts: list[int] = []

        class Flaky(jobflow.Job, registry=registry, retry=FAST):
            def execute(self, ctx: jobflow.JobContext) -> None:
                attempts.append(ctx.attempt)
                if ctx.attempt <= 2:
                    raise jobflow.TransientError(f"attempt {ctx.attempt}")

        with tracked_worker(scheduler.broker, registry, amqp_settings) as tracker:
            scheduler.schedule_now(Flaky())
            wait(tracker, lambda t: len(t.succeeded(RUN_JOB_ACTOR)) == 1, timeout=30)
        assert attempts == [1, 2, 3]
        assert message_count(amqp_settings.broker_url, dead_letter_queue(scheduler.queue)) == 0

    def test_permanent_failure_is_one_attempt_and_a_full_dead_letter(
        self, registry: JobRegistry, amqp_settings: Settings, scheduler: jobflow.BrokerJobScheduler
    ) -> None:
        """A permanent failure runs once; its dead letter is the message with the final traceback and context."""
        attempts: list[int] = []

        class Refund(jobflow.Job, registry=registry, version=3, retry=FAST):
            order: str

            def execute(self, ctx: jobflow.JobContext) -> None:
                attempts.append(ctx.attempt)
                raise jobflow.PermanentError(f"order {self.order} was never paid")

        with tracked_worker(scheduler.broker, registry, amqp_settings):
            started = datetime.now(UTC)
            job_id = scheduler.schedule_now(Refund(order="A-17"))
            [letter] = wait_for_messages(amqp_settings.broker_url, dead_letter_queue(scheduler.queue), 1)
        assert attempts == [1]
        record = letter.record
        assert record is not None
        assert (record.reason, record.kind, record.name, record.version, record.message_id) == (
            "permanent_error",
            "job",
            "Refund",
            3,
            job_id,
        )
        assert (record.error_type, record.error_message) == (
            "jobflow.errors.PermanentError",
            "order A-17 was never paid",
        )
        assert record.traceback is not None
        assert "in execute" in record.traceback
        assert "order A-17 was never paid" in record.traceback
        assert (record.attempts, record.source_queue) == (1, scheduler.queue)
        assert started <= record.first_failed_at <= record.last_failed_at
        assert (record.pid, record.host) == (os.getpid(), os.uname().nodename)
        assert letter.delivery_mode == 2
        assert letter.message["message_id"] == job_id
        assert letter.message["args"][0]["data"] == {"order": "A-17"}

    def test_exhausted_retries_keep_the_final_traceback(
        self, registry: JobRegistry, amqp_settings: Settings, scheduler: jobflow.BrokerJobScheduler
    ) -> None:
        """After the last attempt the dead letter holds that attempt's traceback, not an earlier one."""

        class Outage(jobflow.Job, registry=registry, retry=FAST):
            def execute(self, ctx: jobflow.JobContext) -> None:
                raise ConnectionError(f"refused on attempt {ctx.attempt}")

        with tracked_worker(scheduler.broker, registry, amqp_settings) as tracker:
            scheduler.schedule_now(Outage())
            [letter] = wait_for_messages(amqp_settings.broker_url, dead_letter_queue(scheduler.queue), 1)
        assert len(tracker.outcomes) == 3
        record = letter.record
        assert record is not None
        assert (record.reason, record.attempts, record.error_type) == ("retries_exhausted", 3, "ConnectionError")
        assert record.traceback is not None
        assert "refused on attempt 3" in record.traceback
        assert "attempt 2" not in record.traceback
        assert record.first_failed_at < record.last_failed_at
        assert letter.message["options"]["retries"] == 2  # the message as last delivered


class TestDeadLetterQueue:
    def test_dead_letter_queue_has_no_ttl(
        self, app: App, amqp_settings: Settings, scheduler: jobflow.BrokerJobScheduler
    ) -> None:
        """<queue>.XQ is declared without a message TTL, so dead letters never expire."""
        with tracked_worker(scheduler.broker, app.registry, amqp_settings) as tracker:
            app.prime(scheduler, tracker)
        connection = pika.BlockingConnection(pika.URLParameters(amqp_settings.broker_url))
        try:
            xq = dead_letter_queue(scheduler.queue)
            version = parse_version(connection._impl.server_properties.get("version"))  # type: ignore[attr-defined]
            arguments = dead_letter_queue_arguments(amqp_settings.queue_type, version)
            assert "x-message-ttl" not in arguments
            connection.channel().queue_declare(xq, durable=True, arguments=arguments)  # same arguments: accepted
            ttl = {**arguments, "x-message-ttl": 604800000}
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
                connection.channel().queue_declare(xq, durable=True, arguments=ttl)
            assert info.value.reply_code == 406
        finally:
            connection.close()

    def test_dramatiq_dead_letter_queue_with_ttl_still_works(
        self, registry: JobRegistry, amqp_settings: Settings, scheduler: jobflow.BrokerJobScheduler
    ) -> None:
        """An .XQ that plain Dramatiq declared with a TTL is used as it is, rather than stopping the worker."""
        connection = pika.BlockingConnection(pika.URLParameters(amqp_settings.broker_url))
        try:
            connection.channel().queue_declare(
                dead_letter_queue(scheduler.queue), durable=True, arguments={"x-message-ttl": 604800000}
            )
        finally:
            connection.close()

        class Fails(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                raise jobflow.PermanentError("no")

        with tracked_worker(scheduler.broker, registry, amqp_settings):
            scheduler.schedule_now(Fails())
            [letter] = wait_for_messages(amqp_settings.broker_url, dead_letter_queue(scheduler.queue), 1)
        assert letter.record is not None
        assert letter.record.reason == "permanent_error"

    def test_dead_letter_queue_deleted_behind_the_worker(
        self, app: App, amqp_settings: Settings, scheduler: jobflow.BrokerJobScheduler
    ) -> None:
        """A dead-letter queue deleted while the worker runs is declared again by the next dead letter."""

        class Fails(jobflow.Job, registry=app.registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                raise jobflow.PermanentError("no")

        xq = dead_letter_queue(scheduler.queue)
        with tracked_worker(scheduler.broker, app.registry, amqp_settings) as tracker:
            app.prime(scheduler, tracker)
            connection = pika.BlockingConnection(pika.URLParameters(amqp_settings.broker_url))
            try:
                connection.channel().queue_delete(xq)
            finally:
                connection.close()
            scheduler.schedule_now(Fails())
            [letter] = wait_for_messages(amqp_settings.broker_url, xq, 1)
        assert letter.record is not None
        assert letter.record.reason == "permanent_error"


GoodAndBad = tuple[str, dict[str, Any], dict[str, Any]]
#: A registered job's name, data it accepts, and data it rejects: in-process App, and tests.worker_app.
IN_PROCESS: GoodAndBad = ("Good", {"label": "x"}, {"label": 7})
WORKER_APP: GoodAndBad = ("TouchFile", {"path": "/nonexistent/x", "text": "x"}, {"path": 5})


def _poison(kind: str, jobs: str, commands: str, names: GoodAndBad = IN_PROCESS) -> tuple[str, bytes]:
    """(queue, body) of one kind of poison."""
    name, ok, bad = names
    good = raw_job(name, 1, ok, jobs)
    bodies: dict[str, tuple[str, bytes]] = {
        "not utf-8": (jobs, b"\x80\x81\xfe binary"),
        "not json": (jobs, b'{"actor_name": "jobflow.run_job",'),
        "json, not a message": (jobs, b'{"hello": "world"}'),
        "wrong field types": (jobs, encode({**good, "actor_name": ["jobflow.run_job"], "queue_name": 5})),
        "unknown actor": (jobs, encode({**good, "actor_name": "billing.charge"})),
        "no envelope argument": (jobs, encode({**good, "args": []})),
        "argument not an envelope": (jobs, encode({**good, "args": [{"hello": "world"}]})),
        "unknown job": (jobs, encode(raw_job("NoSuchJob", 1, {}, jobs))),
        "unknown job version": (jobs, encode(raw_job(name, 9, ok, jobs))),
        "data the type rejects": (jobs, encode(raw_job(name, 1, bad, jobs))),
        "unknown command": (commands, encode(raw_command("NoSuchCommand", 1, {}, commands))),
        "too large": (jobs, encode(raw_job(name, 1, {**ok, "padding": "x" * 20_000}, jobs))),
    }
    return bodies[kind]


POISON = [
    ("not utf-8", "undecodable"),
    ("not json", "undecodable"),
    ("json, not a message", "not_a_message"),
    ("wrong field types", "not_a_message"),
    ("unknown actor", "not_a_message"),
    ("no envelope argument", "invalid_envelope"),
    ("argument not an envelope", "invalid_envelope"),
    ("unknown job", "unknown_job"),
    ("unknown job version", "unknown_job"),
    ("data the type rejects", "invalid_payload"),
    ("unknown command", "unknown_command"),
    ("too large", "too_large"),
]


class TestPoisonOnRabbitmq:
    @pytest.mark.parametrize(("kind", "reason"), POISON, ids=[kind for kind, _ in POISON])
    def test_poison_is_dead_lettered_and_the_queue_flows(
        self, app: App, amqp_settings: Settings, registry: JobRegistry, kind: str, reason: str
    ) -> None:
        """Each kind of poison, published raw, is dead-lettered once with its reason; good work behind it runs."""
        settings = amqp_settings.model_copy(update={"max_payload_bytes": 4096})
        registry.unknown_type_retry = timedelta(0)  # the rolling-deploy window has its own tests
        app.registry.unknown_type_retry = timedelta(0)
        with jobflow.BrokerJobScheduler(settings=settings, registry=registry) as scheduler:
            with watched_worker(scheduler.broker, registry, settings) as (tracker, dramatiq_worker):
                app.prime(scheduler, tracker)
                queue, body = _poison(kind, scheduler.queue, commands_queue(settings.queue_prefix))
                publish_raw(settings.broker_url, queue, [body])
                app.still_flowing(scheduler, "after")
                [letter] = wait_for_messages(settings.broker_url, dead_letter_queue(queue), 1)
                worker_threads_alive = threads_alive(dramatiq_worker)
            scheduler.broker.close()
        assert letter.body == body  # byte for byte
        assert letter.record is not None
        assert (letter.record.reason, letter.record.attempts, letter.record.source_queue) == (reason, 1, queue)
        assert letter.record.error_message
        assert worker_threads_alive

    def test_worker_process_survives_every_kind(self, amqp_settings: Settings, tmp_path: Path) -> None:
        """`dramatiq jobflow.actors` dead-letters every kind of poison and still runs the job queued behind."""
        from .worker_app import TouchFile, WriteFileCommand

        jobs, commands = jobs_queue(amqp_settings.queue_prefix), commands_queue(amqp_settings.queue_prefix)
        no_window = amqp_settings.model_copy(update={"unknown_type_retry": 0.0})
        with (
            worker_process(no_window, tmp_path) as proc,
            jobflow.BrokerJobScheduler(settings=amqp_settings) as scheduler,
        ):
            first = tmp_path / "first.json"
            scheduler.schedule_now(jobflow.PublishCommandJob.create(WriteFileCommand(path=str(first), text="first")))
            eventually(first.exists, what="the first command: both queues are consumed")
            kinds = [_poison(kind, jobs, commands, WORKER_APP) for kind, _ in POISON if kind != "too large"]
            for queue, body in kinds:
                publish_raw(amqp_settings.broker_url, queue, [body])
            last = tmp_path / "last.json"
            scheduler.schedule_now(TouchFile(path=str(last), text="last"))
            eventually(last.exists, what="the job behind the poison")
            letters = wait_for_messages(amqp_settings.broker_url, dead_letter_queue(jobs), len(kinds) - 1)
            letters += wait_for_messages(amqp_settings.broker_url, dead_letter_queue(commands), 1)
            assert proc.poll() is None
        reasons = sorted(letter.record.reason for letter in letters if letter.record is not None)
        assert reasons == sorted(reason for kind, reason in POISON if kind != "too large")


def threads_alive(worker: dramatiq.Worker) -> bool:
    """Every worker and consumer thread of an in-process worker is alive."""
    threads = [*worker.workers, *worker.consumers.values()]
    return len(worker.workers) == worker.worker_threads and all(t.is_alive() for t in threads)


@contextmanager
def watched_worker(
    broker: dramatiq.Broker, registry: JobRegistry, settings: Settings
) -> Iterator[tuple[OutcomeTracker, dramatiq.Worker]]:
    """An in-process worker, its tracker, and its Dramatiq worker (to check on its threads)."""
    tracker = OutcomeTracker()
    broker.add_middleware(tracker)
    with jobflow.InProcessWorker(broker, registry=registry, settings=settings) as in_process:
        yield tracker, in_process._worker


class worker_process:
    """`dramatiq jobflow.actors tests.worker_app` as a separate process on this test's queues."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.env = {
            **os.environ,
            "JOBFLOW_BROKER_URL": settings.broker_url,
            "JOBFLOW_QUEUE_PREFIX": settings.queue_prefix,
            "JOBFLOW_LOG_FORMAT": "json",
            "JOBFLOW_QUEUE_TYPE": settings.queue_type,
            "JOBFLOW_DELAY_QUEUE_TYPE": settings.delay_queue_type,
            "JOBFLOW_UNKNOWN_TYPE_RETRY": str(settings.unknown_type_retry),
        }
        self.log_path = tmp_path / "worker.log"

    def __enter__(self) -> subprocess.Popen[str]:
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dramatiq", "jobflow.actors", "tests.worker_app", "-p", "1", "-t", "2"],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        return self.proc

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def x_death_reason(letter: Delivery) -> str | None:
    deaths = letter.headers.get("x-death") or []
    reason = deaths[0].get("reason") if deaths else None
    return reason.decode() if isinstance(reason, bytes) else reason


class TestNoLossOnRabbitmq:
    def test_connection_closed_during_retry_publish(
        self,
        registry: JobRegistry,
        amqp_settings: Settings,
        scheduler: jobflow.BrokerJobScheduler,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The publishing connection closed by RabbitMQ during a retry's publish: the retry still happens."""
        attempts: list[int] = []

        class FailsOnce(jobflow.Job, registry=registry, retry=FAST):
            def execute(self, ctx: jobflow.JobContext) -> None:
                attempts.append(ctx.attempt)
                if ctx.attempt == 1:
                    raise jobflow.TransientError("once")

        xq = dead_letter_queue(scheduler.queue)
        vhost = vhost_of(amqp_settings.broker_url)
        with (
            tracked_worker(scheduler.broker, registry, amqp_settings) as tracker,
            connection_closed_before_publish(monkeypatch, vhost, is_retry_of(None), times=1) as hits,
        ):
            scheduler.schedule_now(FailsOnce())
            eventually(
                lambda: bool(tracker.succeeded(RUN_JOB_ACTOR)) or message_count(amqp_settings.broker_url, xq) > 0,
                what="the job to run again or be dead-lettered",
            )
        assert len(hits) == 1
        # Dramatiq's enqueue reconnects and publishes the retry; an enqueue that gave up instead
        # would have left the message with RabbitMQ's dead-lettering. Lost, it is not.
        letters = drain(amqp_settings.broker_url, xq)
        assert attempts == [1, 2] or (attempts == [1] and [x_death_reason(d) for d in letters] == ["rejected"])

    def test_retry_publish_failing_for_good_is_rejected_to_the_dead_letter_queue(
        self,
        registry: JobRegistry,
        amqp_settings: Settings,
        scheduler: jobflow.BrokerJobScheduler,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Every attempt at publishing the retry cut off: the message is rejected and RabbitMQ dead-letters it."""
        attempts: list[int] = []

        class FailsOnce(jobflow.Job, registry=registry, retry=FAST):
            def execute(self, ctx: jobflow.JobContext) -> None:
                attempts.append(ctx.attempt)
                raise jobflow.TransientError("once")

        vhost = vhost_of(amqp_settings.broker_url)
        with (
            tracked_worker(scheduler.broker, registry, amqp_settings),
            connection_closed_before_publish(monkeypatch, vhost, is_retry_of(None), times=1000) as hits,
        ):
            job_id = scheduler.schedule_now(FailsOnce())
            [letter] = wait_for_messages(amqp_settings.broker_url, dead_letter_queue(scheduler.queue), 1, timeout=60)
        assert len(hits) > 1  # the enqueue tried again, and was cut off again
        assert attempts == [1]
        assert letter.record is None  # RabbitMQ dead-lettered it: x-death is all there is
        assert x_death_reason(letter) == "rejected"
        assert letter.message["message_id"] == job_id

    def test_connection_closed_during_dead_letter_publish(
        self,
        registry: JobRegistry,
        amqp_settings: Settings,
        scheduler: jobflow.BrokerJobScheduler,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The connection closed during the dead-letter publish: it is published again on a new connection."""

        class Doomed(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                raise jobflow.PermanentError("never")

        vhost = vhost_of(amqp_settings.broker_url)
        with (
            tracked_worker(scheduler.broker, registry, amqp_settings),
            connection_closed_before_publish(monkeypatch, vhost, to_dead_letter_queue, times=1) as hits,
        ):
            scheduler.schedule_now(Doomed())
            [letter] = wait_for_messages(amqp_settings.broker_url, dead_letter_queue(scheduler.queue), 1)
        assert len(hits) == 1
        assert letter.record is not None
        assert letter.record.reason == "permanent_error"

    def test_dead_letter_publish_failing_for_good_is_rejected(
        self,
        registry: JobRegistry,
        amqp_settings: Settings,
        scheduler: jobflow.BrokerJobScheduler,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Every dead-letter publish cut off: the message is rejected and RabbitMQ dead-letters it instead."""

        class Doomed(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                raise jobflow.PermanentError("never")

        vhost = vhost_of(amqp_settings.broker_url)
        with (
            tracked_worker(scheduler.broker, registry, amqp_settings),
            connection_closed_before_publish(monkeypatch, vhost, to_dead_letter_queue, times=1000) as hits,
        ):
            job_id = scheduler.schedule_now(Doomed())
            [letter] = wait_for_messages(amqp_settings.broker_url, dead_letter_queue(scheduler.queue), 1)
        assert len(hits) >= 2  # published again on a new connection before giving up
        assert letter.record is None
        assert x_death_reason(letter) == "rejected"
        assert letter.message["message_id"] == job_id

    def test_poison_dead_letter_publish_failing_is_rejected(
        self, app: App, amqp_settings: Settings, scheduler: jobflow.BrokerJobScheduler, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Poison whose dead-letter publish keeps failing is rejected to RabbitMQ's dead-lettering; work flows on."""
        vhost = vhost_of(amqp_settings.broker_url)
        with tracked_worker(scheduler.broker, app.registry, amqp_settings) as tracker:
            app.prime(scheduler, tracker)
            with connection_closed_before_publish(monkeypatch, vhost, to_dead_letter_queue, times=1000) as hits:
                publish_raw(amqp_settings.broker_url, scheduler.queue, [b"\x00 poison"])
                [letter] = wait_for_messages(amqp_settings.broker_url, dead_letter_queue(scheduler.queue), 1)
            app.still_flowing(scheduler, "after")
        assert len(hits) >= 2  # published again on a new connection before giving up
        assert (letter.body, letter.record, x_death_reason(letter)) == (b"\x00 poison", None, "rejected")

    def test_all_worker_connections_closed_during_dead_letter_publish(
        self,
        registry: JobRegistry,
        amqp_settings: Settings,
        scheduler: jobflow.BrokerJobScheduler,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Consumer connections closed too: the unacked message is redelivered, runs again, and is dead-lettered."""
        attempts: list[int] = []

        class Doomed(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                attempts.append(ctx.attempt)
                raise jobflow.PermanentError("never")

        vhost = vhost_of(amqp_settings.broker_url)
        closed: list[int] = []

        def close_everything(routing_key: str, body: bytes) -> bool:
            if to_dead_letter_queue(routing_key, body) and not closed:
                from .faults import close_connections

                closed.append(close_connections(vhost))
            return False

        with (
            tracked_worker(scheduler.broker, registry, amqp_settings),
            connection_closed_before_publish(monkeypatch, vhost, close_everything, times=1),
        ):
            scheduler.schedule_now(Doomed())
            eventually(lambda: len(attempts) >= 2, timeout=60, what="the redelivery")
            letters = wait_for_messages(amqp_settings.broker_url, dead_letter_queue(scheduler.queue), 2)
        assert closed[0] >= 3  # consumers and publishers
        assert all(letter.record is not None for letter in letters)
        assert len({letter.message["message_id"] for letter in letters}) == 1


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(8 if depth < 3 else 5)
    scalars: list[Callable[[], Any]] = [
        lambda: None,
        lambda: rng.random() < 0.5,
        lambda: rng.randint(-(2**40), 2**40),
        lambda: rng.choice([rng.random(), float("nan"), float("inf")]),
        lambda: "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(12))),
    ]
    if choice < 5:
        return scalars[choice]()
    if choice == 5:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["queue_name", "actor_name", "args", "kwargs", "options", "message_id", "name", "version", "data", "k"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def _mutated(rng: random.Random, base: dict[str, Any]) -> bytes:
    fields = json.loads(json.dumps(base))
    envelope = fields["args"][0]
    body: bytes
    match rng.randrange(10):
        case 0:
            raw = bytearray(encode(fields))
            for _ in range(rng.randrange(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            return bytes(raw)
        case 1:
            whole = encode(fields)
            return whole[: rng.randrange(len(whole))]
        case 2:
            del fields[rng.choice(list(fields))]
        case 3:
            fields[rng.choice(list(fields))] = _random_json(rng)
        case 4:
            key = rng.choice(["name", "version", "data", "job_id", "due_at", "scheduled_at"])
            envelope[key] = _random_json(rng)
        case 5:
            fields["args"] = [envelope] * rng.choice([0, 2, 3])
        case 6:
            fields["actor_name"] = rng.choice([DISPATCH_COMMAND_ACTOR, "jobflow.nothing", ""])
        case 7:
            envelope["data"] = {"n": rng.choice(["1", 1.5, 2**70, None, [1]])}
        case 8:
            fields[f"k{rng.randrange(100)}"] = _random_json(rng)
        case _:
            pass  # unchanged: it runs
    body = json.dumps(fields, allow_nan=True).encode()
    return body


class TestFuzz:
    def test_random_bodies_are_all_accounted_for(
        self, registry: JobRegistry, amqp_settings: Settings, scheduler: jobflow.BrokerJobScheduler
    ) -> None:
        """Thousands of random bodies: the worker survives, and every one ran or was dead-lettered."""
        registry.retry_policy = RetryPolicy(max_attempts=1)  # every failure is final: one outcome each
        registry.unknown_type_retry = timedelta(0)
        ran: list[int] = []

        class Target(jobflow.Job, registry=registry):
            n: int

            def execute(self, ctx: jobflow.JobContext) -> None:
                ran.append(self.n)

        seed = random.randrange(2**32)
        rng = random.Random(seed)
        queue = scheduler.queue
        bodies: list[bytes] = []
        for i in range(3000):
            kind = i % 3
            if kind == 0:
                bodies.append(bytes(rng.randrange(256) for _ in range(rng.randrange(300))))
            elif kind == 1:
                bodies.append(json.dumps(_random_json(rng), allow_nan=True).encode())
            else:
                bodies.append(_mutated(rng, raw_job("Target", 1, {"n": i}, queue)))
        xq = dead_letter_queue(queue)
        url = amqp_settings.broker_url
        with watched_worker(scheduler.broker, registry, amqp_settings) as (tracker, dramatiq_worker):
            scheduler.schedule_now(Target(n=-1))
            wait(tracker, lambda t: len(t.succeeded(RUN_JOB_ACTOR)) == 1, timeout=30)
            publish_raw(url, queue, bodies)

            def accounted() -> int:
                return len(tracker.succeeded(RUN_JOB_ACTOR)) - 1 + message_count(url, xq)

            eventually(lambda: accounted() >= len(bodies), timeout=100, what=f"every body (seed {seed})")
            time.sleep(0.5)  # anything counted twice would show now
            assert accounted() == len(bodies), f"seed {seed}"
            assert message_count(url, queue) == 0
            alive = threads_alive(dramatiq_worker)
            scheduler.schedule_now(Target(n=-2))
            eventually(lambda: -2 in ran, what="a job after the fuzz")
        assert alive, f"seed {seed}"
        letters = drain(url, xq)
        assert all(letter.record is not None for letter in letters), f"seed {seed}"
        reasons = {letter.record.reason for letter in letters if letter.record is not None}
        assert {"undecodable", "not_a_message"} <= reasons
        assert any(r in reasons for r in ("invalid_envelope", "invalid_payload", "unknown_job"))
