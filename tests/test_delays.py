"""The broker-side delay topology: routing by the delay's bits, never early, nothing held by workers."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import dramatiq
import pika
import pika.exceptions
import pytest

import jobflow
from jobflow import JobRegistry, Settings
from jobflow.broker.ladder import MAX_DELAY_MS, DelayTopology, entry_level, levels_visited, routing_key
from jobflow.broker.names import (
    DELAY_LEVELS,
    delay_exchange,
    delay_queue,
    delay_queues,
    jobs_queue,
    next_exchange,
    unroutable_queue,
)

from .conftest import delete_declared, have_rabbitmqctl, rabbitmqctl
from .helpers import tracked_worker, wait

BOUNDARIES = [1, 2, 3, *[d for k in (5, 12, 20, 37) for d in (2**k - 1, 2**k, 2**k + 1)], MAX_DELAY_MS]
BOUNDARIES = [d for d in BOUNDARIES if d <= MAX_DELAY_MS]


class TestLadderArithmetic:
    @pytest.mark.parametrize("delay", BOUNDARIES)
    def test_levels_sum_to_the_delay(self, delay: int) -> None:
        """The TTLs of the levels a message visits add up to its delay exactly."""
        assert sum(2**k for k in levels_visited(delay)) == delay

    @pytest.mark.parametrize("delay", BOUNDARIES)
    def test_enters_at_highest_set_bit(self, delay: int) -> None:
        """A message enters at the level of its delay's highest set bit, the first level it visits."""
        assert entry_level(delay) == levels_visited(delay)[0] == delay.bit_length() - 1

    def test_routing_key_carries_bits_then_destination(self) -> None:
        """The routing key is the 38 bits, most significant first, then the queue's name."""
        key = routing_key(5, "app.jobs")
        words = key.split(".")
        assert len(words) == DELAY_LEVELS + 2
        assert words[-5:] == ["1", "0", "1", "app", "jobs"]
        assert set(words[: DELAY_LEVELS - 3]) == {"0"}

    @pytest.mark.parametrize("delay", [0, -1, MAX_DELAY_MS + 1])
    def test_out_of_range(self, delay: int) -> None:
        """Zero, negative and too-long delays have no entry level."""
        with pytest.raises(ValueError, match="between 1 and"):
            entry_level(delay)

    def test_ladder_covers_eight_years(self) -> None:
        """The ladder holds at least 8 years, and the schedulers' maximum fits in it."""
        assert timedelta(milliseconds=MAX_DELAY_MS) >= timedelta(days=8 * 365.25)
        assert timedelta(milliseconds=MAX_DELAY_MS) >= jobflow.MAX_DELAY


@pytest.fixture
def channel(rabbitmq_url: str) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        # Confirmed publishes: a count read right after them (on another connection) sees them all.
        # Unconfirmed, a quorum queue may not have them yet (RabbitMQ 4.0 showed it).
        channel = connection.channel()
        channel.confirm_delivery()
        yield channel
    finally:
        connection.close()


def count(url: str, queue: str) -> int | None:
    """Messages ready in ``queue``; None when it does not exist."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count or 0)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return None
        raise
    finally:
        if connection.is_open:
            connection.close()


def counts(url: str, queues: list[str]) -> dict[str, int]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        return {q: int(channel.queue_declare(q, passive=True).method.message_count or 0) for q in queues}
    finally:
        connection.close()


def drain(url: str, queue: str, expected: int, timeout: float = 20.0) -> list[bytes]:
    """Take ``expected`` messages from ``queue`` (acking them), waiting up to ``timeout`` seconds."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        while len(got) < expected and time.monotonic() < deadline:
            method, _, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                connection.sleep(0.02)
            else:
                got.append(cast(bytes, body))  # the pika stub says str; bodies are bytes
    finally:
        connection.close()
    return got


class TestRouting:
    """Each binding of the ladder, checked on the real broker."""

    @pytest.fixture
    def topology(
        self, amqp_settings: Settings, channel: pika.adapters.blocking_connection.BlockingChannel
    ) -> DelayTopology:
        topology = DelayTopology(amqp_settings.queue_prefix)
        topology.declare(channel)
        channel.queue_declare(jobs_queue(amqp_settings.queue_prefix), durable=True)
        topology.bind_destination(channel, jobs_queue(amqp_settings.queue_prefix))
        return topology

    def test_entering_message_waits_in_its_entry_level(
        self,
        amqp_settings: Settings,
        topology: DelayTopology,
        channel: pika.adapters.blocking_connection.BlockingChannel,
    ) -> None:
        """A message published at its entry level sits in that level's queue (levels 12 to 37, long TTLs)."""
        dest = jobs_queue(amqp_settings.queue_prefix)
        for delay in (2**12, 2**12 + 1, 2**20 - 1, 2**20 + 1, 2**37 - 1, MAX_DELAY_MS):
            level = entry_level(delay)
            channel.basic_publish(delay_exchange(topology.prefix, level), routing_key(delay, dest), b"x")
        found = counts(amqp_settings.broker_url, delay_queues(topology.prefix))
        assert {q: n for q, n in found.items() if n} == {
            delay_queue(topology.prefix, 12): 2,
            delay_queue(topology.prefix, 19): 1,
            delay_queue(topology.prefix, 20): 1,
            delay_queue(topology.prefix, 36): 1,
            delay_queue(topology.prefix, 37): 1,
        }

    @pytest.mark.parametrize("level", [1, 2, 5, 13, 20, 30, 37])
    def test_expired_message_falls_through_zero_bits_to_destination(
        self,
        amqp_settings: Settings,
        topology: DelayTopology,
        channel: pika.adapters.blocking_connection.BlockingChannel,
        level: int,
    ) -> None:
        """Leaving level k for the exchange below, a delay of 2**k + 1 passes every zero bit into level 0, then out."""
        dest = jobs_queue(amqp_settings.queue_prefix)
        body = uuid.uuid4().bytes
        # As if the message had just expired from level `level`: it arrives at that level's next exchange.
        channel.basic_publish(next_exchange(topology.prefix, level), routing_key(2**level + 1, dest), body)
        assert drain(amqp_settings.broker_url, dest, 1) == [body]

    def test_expired_message_goes_straight_to_its_next_set_bit(
        self,
        amqp_settings: Settings,
        topology: DelayTopology,
        channel: pika.adapters.blocking_connection.BlockingChannel,
    ) -> None:
        """Leaving level k, one routing step puts a message into the level of its next set bit (12 to 36)."""
        dest = jobs_queue(amqp_settings.queue_prefix)
        pairs = [(37, 36), (37, 12), (30, 29), (20, 13), (13, 12)]
        for expired, below in pairs:
            delay = 2**expired + 2**below
            channel.basic_publish(next_exchange(topology.prefix, expired), routing_key(delay, dest), b"x")
        found = counts(amqp_settings.broker_url, delay_queues(topology.prefix))
        assert {q: n for q, n in found.items() if n} == {
            delay_queue(topology.prefix, 36): 1,
            delay_queue(topology.prefix, 29): 1,
            delay_queue(topology.prefix, 13): 1,
            delay_queue(topology.prefix, 12): 2,
        }

    @pytest.mark.parametrize("level", [0, 1, 12, 37])
    def test_expired_message_with_no_bit_below_is_delivered(
        self,
        amqp_settings: Settings,
        topology: DelayTopology,
        channel: pika.adapters.blocking_connection.BlockingChannel,
        level: int,
    ) -> None:
        """Leaving level k with no set bit below it, a message goes straight to its destination."""
        dest = jobs_queue(amqp_settings.queue_prefix)
        body = uuid.uuid4().bytes
        channel.basic_publish(next_exchange(topology.prefix, level), routing_key(2**level, dest), body)
        assert drain(amqp_settings.broker_url, dest, 1) == [body]

    def test_unroutable_delivery_is_kept(
        self,
        amqp_settings: Settings,
        topology: DelayTopology,
        channel: pika.adapters.blocking_connection.BlockingChannel,
    ) -> None:
        """A delayed message whose destination queue is gone lands in the unroutable queue, not nowhere."""
        channel.basic_publish(next_exchange(topology.prefix, 0), routing_key(1, "no.such.queue"), b"lost?")
        assert drain(amqp_settings.broker_url, unroutable_queue(topology.prefix), 1) == [b"lost?"]

    def test_declare_is_idempotent(
        self, topology: DelayTopology, channel: pika.adapters.blocking_connection.BlockingChannel
    ) -> None:
        """Declaring the ladder again changes nothing and raises nothing."""
        topology.declare(channel)
        assert channel.queue_declare(delay_queue(topology.prefix, 3), passive=True).method.message_count == 0


def define_jobs(registry: JobRegistry, runs: list[dict[str, Any]]) -> dict[str, Any]:
    class Stamp(jobflow.Job, registry=registry):
        n: int

        def execute(self, ctx: jobflow.JobContext) -> None:
            runs.append({"n": self.n, "at": datetime.now(UTC), "due": ctx.due_at, "attempt": ctx.attempt})

    class RetryLater(jobflow.Job, registry=registry):
        def execute(self, ctx: jobflow.JobContext) -> None:
            runs.append({"n": -1, "at": datetime.now(UTC), "due": ctx.due_at, "attempt": ctx.attempt})
            if ctx.attempt == 1:
                raise jobflow.TransientError("later", retry_after=timedelta(seconds=3))

    return {"Stamp": Stamp, "RetryLater": RetryLater}


class TestDelayedJobs:
    @pytest.mark.parametrize("delay_ms", [1, 2**5 - 1, 2**5, 2**5 + 1, 2**10 - 1, 2**10, 2**10 + 1])
    def test_boundary_delays_run_and_never_early(
        self, registry: JobRegistry, amqp_settings: Settings, delay_ms: int
    ) -> None:
        """Delays at level boundaries reach the worker, none before its due time."""
        runs: list[dict[str, Any]] = []
        jobs = define_jobs(registry, runs)
        with (
            jobflow.BrokerJobScheduler(settings=amqp_settings, registry=registry) as scheduler,
            tracked_worker(scheduler.broker, registry, amqp_settings) as tracker,
        ):
            for n in range(3):
                scheduler.schedule(jobs["Stamp"](n=n), delay=timedelta(milliseconds=delay_ms))
            wait(tracker, lambda t: len(t.succeeded()) == 3)
        assert len(runs) == 3
        for run in runs:
            assert run["at"] >= run["due"]
            assert run["at"] - run["due"] < timedelta(seconds=10)

    def test_worker_holds_nothing_while_jobs_wait(self, registry: JobRegistry, amqp_settings: Settings) -> None:
        """With a worker running, delayed jobs wait in the broker's delay queues, not unacked in the worker."""
        jobs = define_jobs(registry, [])
        with (
            jobflow.BrokerJobScheduler(settings=amqp_settings, registry=registry) as scheduler,
            tracked_worker(scheduler.broker, registry, amqp_settings),
        ):
            for n in range(40):
                scheduler.schedule(jobs["Stamp"](n=n), delay=timedelta(minutes=10, seconds=n))
            time.sleep(0.5)
            waiting = counts(amqp_settings.broker_url, delay_queues(amqp_settings.queue_prefix))
            dq = count(amqp_settings.broker_url, jobs_queue(amqp_settings.queue_prefix) + ".DQ")
        assert sum(waiting.values()) == 40
        assert dq == 0  # nothing in Dramatiq's .DQ: nothing waits in worker memory

    def test_delayed_jobs_survive_a_worker_restart(self, registry: JobRegistry, amqp_settings: Settings) -> None:
        """Jobs scheduled while one worker runs, due after it stopped, all run on the next worker."""
        runs: list[dict[str, Any]] = []
        jobs = define_jobs(registry, runs)
        with jobflow.BrokerJobScheduler(settings=amqp_settings, registry=registry) as scheduler:
            first = jobflow.InProcessWorker(scheduler.broker, registry=registry, settings=amqp_settings)
            with first:
                for n in range(20):
                    scheduler.schedule(jobs["Stamp"](n=n), delay=timedelta(seconds=2, milliseconds=50 * n))
                time.sleep(0.3)
            assert runs == []
            scheduler.broker.close()
            broker = jobflow.create_broker(amqp_settings)
            with tracked_worker(broker, registry, amqp_settings) as tracker:
                wait(tracker, lambda t: len(t.succeeded()) == 20, timeout=30)
            broker.close()
        assert sorted(r["n"] for r in runs) == list(range(20))
        assert all(r["at"] >= r["due"] for r in runs)

    def test_retry_backoff_goes_through_the_topology(self, registry: JobRegistry, amqp_settings: Settings) -> None:
        """A retry's backoff waits in the delay queues (not Dramatiq's .DQ), and the retry is not early."""
        runs: list[dict[str, Any]] = []
        jobs = define_jobs(registry, runs)
        with (
            jobflow.BrokerJobScheduler(settings=amqp_settings, registry=registry) as scheduler,
            tracked_worker(scheduler.broker, registry, amqp_settings) as tracker,
        ):
            scheduler.schedule_now(jobs["RetryLater"]())
            wait(tracker, lambda t: len(t.outcomes) == 1)
            time.sleep(0.3)
            waiting = sum(counts(amqp_settings.broker_url, delay_queues(amqp_settings.queue_prefix)).values())
            dq = count(amqp_settings.broker_url, jobs_queue(amqp_settings.queue_prefix) + ".DQ")
            wait(tracker, lambda t: len(t.succeeded()) == 1)
        assert (waiting, dq) == (1, 0)
        assert [r["attempt"] for r in runs] == [1, 2]
        assert runs[1]["at"] - runs[0]["at"] >= timedelta(seconds=3)

    def test_send_with_options_delay_uses_the_topology(self, amqp_settings: Settings) -> None:
        """A plain Dramatiq actor's send_with_options(delay=...) on jobflow's broker waits in the ladder."""
        broker = jobflow.create_broker(amqp_settings)
        queue = jobs_queue(amqp_settings.queue_prefix)

        def plain(x: int) -> None:
            pass

        actor = dramatiq.Actor(plain, broker=broker, actor_name="plain", queue_name=queue, priority=0, options={})
        actor.send_with_options(args=(1,), delay=600_000)
        broker.close()
        waiting = counts(amqp_settings.broker_url, delay_queues(amqp_settings.queue_prefix))
        assert {q: n for q, n in waiting.items() if n} == {delay_queue(amqp_settings.queue_prefix, 19): 1}

    def test_too_long_delay_is_refused_by_the_broker(self, amqp_settings: Settings) -> None:
        """Past the ladder's reach, a delayed enqueue is a clear SchedulingError."""
        broker = jobflow.create_broker(amqp_settings)
        message: dramatiq.Message[None] = dramatiq.Message(
            queue_name=jobs_queue(amqp_settings.queue_prefix), actor_name="x", args=(), kwargs={}, options={}
        )
        with pytest.raises(jobflow.SchedulingError, match="at most"):
            broker.enqueue(message, delay=MAX_DELAY_MS + 1)
        broker.close()

    def test_fraction_of_a_millisecond_rounds_up(self, amqp_settings: Settings) -> None:
        """A delay under 1 ms waits 1 ms in level 0 rather than failing."""
        broker = jobflow.create_broker(amqp_settings)
        queue = jobs_queue(amqp_settings.queue_prefix)
        message: dramatiq.Message[None] = dramatiq.Message(
            queue_name=queue, actor_name="x", args=(), kwargs={}, options={}
        )
        broker.enqueue(message, delay=0.5)  # type: ignore[arg-type]
        broker.close()
        assert len(drain(amqp_settings.broker_url, queue, 1, timeout=5)) == 1

    def test_ladder_of_another_type_is_a_clear_error(self, amqp_settings: Settings) -> None:
        """A ladder declared with another queue type than the setting asks for is a ConfigurationError."""
        connection = pika.BlockingConnection(pika.URLParameters(amqp_settings.broker_url))
        try:
            DelayTopology(amqp_settings.queue_prefix, "classic").declare(connection.channel())
        finally:
            connection.close()
        broker = jobflow.create_broker(amqp_settings)  # quorum ladder by default
        with pytest.raises(jobflow.ConfigurationError, match="JOBFLOW_DELAY_QUEUE_TYPE='quorum'"):
            broker.declare_queue(jobs_queue(amqp_settings.queue_prefix), ensure=True)  # type: ignore[call-arg]
        broker.close()

    def test_message_carries_its_due_time(self, registry: JobRegistry, amqp_settings: Settings) -> None:
        """A delayed message's options carry due_ms, its due time in epoch milliseconds."""
        jobs = define_jobs(registry, [])
        with jobflow.BrokerJobScheduler(settings=amqp_settings, registry=registry) as scheduler:
            before = int(time.time() * 1000)
            scheduler.schedule(jobs["Stamp"](n=1), delay=timedelta(milliseconds=5))
        [body] = drain(amqp_settings.broker_url, jobs_queue(amqp_settings.queue_prefix), 1)
        due = json.loads(body)["options"]["due_ms"]
        assert before + 5 <= due <= int(time.time() * 1000) + 5


def queue_types(url: str) -> dict[str, str]:
    """Each queue's type in the URL's vhost, as rabbitmqctl reports it."""
    if not have_rabbitmqctl():
        pytest.skip("!!! needs rabbitmqctl to read queue types")
    vhost = unquote(urlsplit(url).path[1:]) or "/"
    out = rabbitmqctl("list_queues", "-p", vhost, "name", "type", "--formatter", "json").stdout
    return {row["name"]: row["type"] for row in json.loads(out)}


class TestQuorum:
    def test_quorum_mode_runs_delayed_jobs(self, registry: JobRegistry, rabbitmq_url: str) -> None:
        """With JOBFLOW_QUEUE_TYPE=quorum the work and delay queues are quorum queues and delays still run."""
        settings = Settings(broker_url=rabbitmq_url, queue_prefix=f"q-{uuid.uuid4().hex[:10]}", queue_type="quorum")
        runs: list[dict[str, Any]] = []
        jobs = define_jobs(registry, runs)
        try:
            with (
                jobflow.BrokerJobScheduler(settings=settings, registry=registry) as scheduler,
                tracked_worker(scheduler.broker, registry, settings) as tracker,
            ):
                for n in range(5):
                    scheduler.schedule(jobs["Stamp"](n=n), delay=timedelta(milliseconds=300 + 200 * n))
                wait(tracker, lambda t: len(t.succeeded()) == 5, timeout=30)
            assert all(r["at"] >= r["due"] for r in runs)
            types = queue_types(rabbitmq_url)
            ours = {q: t for q, t in types.items() if q.startswith(settings.queue_prefix + ".")}
            assert ours[jobs_queue(settings.queue_prefix)] == "quorum"
            assert ours[jobs_queue(settings.queue_prefix) + ".XQ"] == "quorum"
            assert {ours[q] for q in delay_queues(settings.queue_prefix)} == {"quorum"}
        finally:
            delete_declared(rabbitmq_url, settings)


class TestTopologyCommand:
    @pytest.mark.parametrize(
        ("extra", "work", "ladder"),
        [
            ([], "quorum", "quorum"),
            (["--queue-type", "classic"], "classic", "quorum"),
            (["--queue-type", "classic", "--delay-queue-type", "classic"], "classic", "classic"),
        ],
    )
    def test_queue_types(self, amqp_settings: Settings, extra: list[str], work: str, ladder: str) -> None:
        """Quorum work queues and ladder by default, as workers declare them; either can be classic."""
        from click.testing import CliRunner

        from jobflow.cli import main

        args = ["topology", "declare", "--broker", amqp_settings.broker_url, "--prefix", amqp_settings.queue_prefix]
        result = CliRunner().invoke(main, [*args, *extra])
        assert result.exit_code == 0, result.output
        types = queue_types(amqp_settings.broker_url)
        assert types[jobs_queue(amqp_settings.queue_prefix)] == work
        assert {types[q] for q in delay_queues(amqp_settings.queue_prefix)} == {ladder}

    def test_declare_creates_queues_and_ladder(self, amqp_settings: Settings) -> None:
        """`jobflow topology declare` declares the work queues and every delay level, and can run twice."""
        from click.testing import CliRunner

        from jobflow.cli import main

        args = ["topology", "declare", "--broker", amqp_settings.broker_url, "--prefix", amqp_settings.queue_prefix]
        for _ in range(2):
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, result.output
        assert "guest:guest@" not in result.output
        queues = [jobs_queue(amqp_settings.queue_prefix), *delay_queues(amqp_settings.queue_prefix)]
        assert set(counts(amqp_settings.broker_url, queues).values()) == {0}

    def test_unreachable_broker(self) -> None:
        """An unreachable broker exits with the broker-error code and a message without the password."""
        from click.testing import CliRunner

        from jobflow.cli import main

        url = "amqp://guest:hunter2@127.0.0.1:1/?connection_attempts=1&socket_timeout=1"
        result = CliRunner().invoke(
            main, ["topology", "declare", "--broker", url], env={"JOBFLOW_PUBLISH_TIMEOUT": "1"}
        )
        assert result.exit_code == 4
        assert "hunter2" not in result.output
        assert "127.0.0.1:1" in result.output
