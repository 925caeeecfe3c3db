"""Re-timing the ladder after an outage: waiting messages get the delay they have left."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
import pytest
from dramatiq.common import current_millis

import jobflow
from jobflow import JobRegistry, Settings
from jobflow.broker.ladder import DelayTopology, entry_level, routing_key
from jobflow.broker.names import delay_exchange, delay_queue, jobs_queue
from jobflow.broker.retimer import retime_ladder

from .faults import close_connections
from .helpers import tracked_worker, wait
from .test_delays import count, drain


@pytest.fixture
def ladder(amqp_settings: Settings) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_settings.broker_url))
    channel = connection.channel()
    DelayTopology(amqp_settings.queue_prefix).declare(channel)
    dest = jobs_queue(amqp_settings.queue_prefix)
    channel.queue_declare(dest, durable=True)
    DelayTopology(amqp_settings.queue_prefix).bind_destination(channel, dest)
    try:
        yield channel
    finally:
        connection.close()


def park(channel: Any, prefix: str, *, parked_ms: int, due_ms: int | None, text: str) -> bytes:
    """Put a message into the ladder as if it had ``parked_ms`` to wait, carrying ``due_ms``."""
    options = {} if due_ms is None else {"due_ms": due_ms}
    body = json.dumps({"message_id": text, "options": options}).encode()
    dest = jobs_queue(prefix)
    channel.basic_publish(delay_exchange(prefix, entry_level(parked_ms)), routing_key(parked_ms, dest), body)
    return body


class TestRetimeLadder:
    def test_waiting_message_gets_its_remaining_delay(self, amqp_settings: Settings, ladder: Any) -> None:
        """A message parked for 8 s but due in 0.3 s arrives after 0.3 s, not 8 s, and not early."""
        prefix = amqp_settings.queue_prefix
        due = current_millis() + 300
        body = park(ladder, prefix, parked_ms=2**13, due_ms=due, text="a")
        result = retime_ladder(pika.URLParameters(amqp_settings.broker_url), prefix)
        assert (result.retimed, result.delivered, result.left) == (1, 0, 0)
        assert drain(amqp_settings.broker_url, jobs_queue(prefix), 1, timeout=4) == [body]
        assert current_millis() >= due

    def test_due_message_is_delivered_at_once(self, amqp_settings: Settings, ladder: Any) -> None:
        """A waiting message already past its due time goes straight to its queue."""
        prefix = amqp_settings.queue_prefix
        body = park(ladder, prefix, parked_ms=2**20, due_ms=current_millis() - 5_000, text="b")
        result = retime_ladder(pika.URLParameters(amqp_settings.broker_url), prefix)
        assert (result.retimed, result.delivered) == (0, 1)
        assert drain(amqp_settings.broker_url, jobs_queue(prefix), 1, timeout=2) == [body]
        assert count(amqp_settings.broker_url, delay_queue(prefix, 20)) == 0

    def test_message_without_due_time_stays(self, amqp_settings: Settings, ladder: Any) -> None:
        """A message that carries no due time (not jobflow's) is left where it waits."""
        prefix = amqp_settings.queue_prefix
        park(ladder, prefix, parked_ms=2**20, due_ms=None, text="c")
        result = retime_ladder(pika.URLParameters(amqp_settings.broker_url), prefix)
        assert (result.retimed, result.delivered, result.left) == (0, 0, 1)
        assert count(amqp_settings.broker_url, delay_queue(prefix, 20)) == 1

    def test_message_without_due_time_does_not_hide_the_others(self, amqp_settings: Settings, ladder: Any) -> None:
        """A message left alone stays unacked until its level is done, so those behind it are re-timed."""
        prefix = amqp_settings.queue_prefix
        park(ladder, prefix, parked_ms=2**20, due_ms=None, text="first")
        park(ladder, prefix, parked_ms=2**20, due_ms=current_millis() - 1, text="second")
        result = retime_ladder(pika.URLParameters(amqp_settings.broker_url), prefix)
        assert (result.delivered, result.left) == (1, 1)
        assert count(amqp_settings.broker_url, delay_queue(prefix, 20)) == 1

    def test_far_message_keeps_its_place_in_time(self, amqp_settings: Settings, ladder: Any) -> None:
        """A message due in an hour is re-timed to about an hour: the level of its remaining delay."""
        prefix = amqp_settings.queue_prefix
        park(ladder, prefix, parked_ms=2**22, due_ms=current_millis() + 3_600_000, text="d")
        retime_ladder(pika.URLParameters(amqp_settings.broker_url), prefix)
        assert count(amqp_settings.broker_url, delay_queue(prefix, entry_level(3_600_000))) == 1


class TestRetimeOnReconnect:
    def test_worker_reconnect_retimes_the_ladder(self, registry: JobRegistry, amqp_settings: Settings) -> None:
        """When the broker drops a worker's connections, the worker re-times the ladder as it reconnects."""
        runs: list[int] = []

        class Tick(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                runs.append(current_millis())

        with jobflow.BrokerJobScheduler(settings=amqp_settings, registry=registry) as scheduler:
            scheduler.broker.declare_queue(scheduler.queue, ensure=True)  # type: ignore[call-arg]
            # As an outage leaves it: due in 0.5 s, but parked in a level that holds it 16 s.
            envelope = jobflow.envelope.make_envelope(Tick(), registry)
            due = current_millis() + 500
            body = json.dumps(
                {
                    "queue_name": scheduler.queue,
                    "actor_name": "jobflow.run_job",
                    "args": [envelope.to_wire()],
                    "kwargs": {},
                    "options": {"due_ms": due},
                    "message_id": envelope.job_id,
                    "message_timestamp": current_millis(),
                }
            ).encode()
            scheduler.broker.channel.basic_publish(  # type: ignore[attr-defined]
                delay_exchange(amqp_settings.queue_prefix, 14), routing_key(2**14, scheduler.queue), body
            )
            with tracked_worker(scheduler.broker, registry, amqp_settings) as tracker:
                time.sleep(1.0)
                assert runs == []
                closing = current_millis()
                assert close_connections(unquote(urlsplit(amqp_settings.broker_url).path[1:]) or "/") >= 1
                closed = current_millis()
                wait(tracker, lambda t: len(t.succeeded()) == 1, timeout=15)
        print(f"closing took {closed - closing} ms; ran {runs[0] - due} ms after due, {runs[0] - closed} ms after")
        assert runs[0] >= due
        # Held by its level it would run about 15.9 s late. Each of the connections is closed by one
        # `rabbitmqctl` call (about 1 s each on a loaded machine), so the worker may reconnect and
        # be cut again before the last: the re-timing's sweeps (every second) go on meanwhile.
        assert timedelta(milliseconds=runs[0] - due) < timedelta(seconds=12)
        assert runs[0] - closed < 6000


class TestLadderWatchdog:
    def test_the_elected_worker_retimes_what_is_behind_before_and_after_a_reconnect(
        self, registry: JobRegistry, amqp_settings: Settings
    ) -> None:
        """With the (experimental, opt-in) watchdog, a message an outage left parked (due in 0.5 s, in
        a level that holds it 16 s) runs on time, never early: the elected worker finds the level
        behind, at start and after the broker dropped the worker's connections."""
        amqp_settings = amqp_settings.model_copy(update={"ladder_watchdog": True})
        runs: dict[str, int] = {}

        class Tick(jobflow.Job, registry=registry):
            label: str

            def execute(self, ctx: jobflow.JobContext) -> None:
                runs[self.label] = current_millis()

        with jobflow.BrokerJobScheduler(settings=amqp_settings, registry=registry) as scheduler:
            scheduler.broker.declare_queue(scheduler.queue, ensure=True)  # type: ignore[call-arg]

            def park(label: str) -> int:
                envelope = jobflow.envelope.make_envelope(Tick(label=label), registry)
                due = current_millis() + 500
                body = json.dumps(
                    {
                        "queue_name": scheduler.queue,
                        "actor_name": "jobflow.run_job",
                        "args": [envelope.to_wire()],
                        "kwargs": {},
                        "options": {"due_ms": due},
                        "message_id": envelope.job_id,
                        "message_timestamp": current_millis(),
                    }
                ).encode()
                connection = pika.BlockingConnection(pika.URLParameters(amqp_settings.broker_url))
                try:  # a connection of its own: the test closes every connection of the vhost midway
                    connection.channel().basic_publish(
                        delay_exchange(amqp_settings.queue_prefix, 14), routing_key(2**14, scheduler.queue), body
                    )
                finally:
                    connection.close()
                return due

            due = {"before": park("before")}
            with tracked_worker(scheduler.broker, registry, amqp_settings) as tracker:
                wait(tracker, lambda t: len(t.succeeded()) == 1, timeout=10)
                assert close_connections(unquote(urlsplit(amqp_settings.broker_url).path[1:]) or "/") >= 1
                due["after"] = park("after")
                wait(tracker, lambda t: len(t.succeeded()) == 2, timeout=12)
        for label, when in due.items():
            assert runs[label] >= when, label
            assert timedelta(milliseconds=runs[label] - when) < timedelta(seconds=8), label  # not 16 s


class TestRetimeCommand:
    def test_command_retimes(self, amqp_settings: Settings, ladder: Any) -> None:
        """`jobflow topology retime` re-times the ladder and says how many it moved."""
        from click.testing import CliRunner

        from jobflow.cli import main

        prefix = amqp_settings.queue_prefix
        park(ladder, prefix, parked_ms=2**20, due_ms=current_millis() + 60_000, text="e")
        result = CliRunner().invoke(
            main, ["topology", "retime", "--broker", amqp_settings.broker_url, "--prefix", prefix]
        )
        assert result.exit_code == 0, result.output
        assert "re-timed 1" in result.output
        assert count(amqp_settings.broker_url, delay_queue(prefix, entry_level(60_000))) == 1
