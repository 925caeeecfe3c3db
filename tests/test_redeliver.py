"""What the ladder could not deliver (its queue was missing) is delivered once the queue exists."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from dramatiq.common import current_millis

import jobflow
from jobflow import Settings
from jobflow.broker.ladder import DelayTopology, routing_key
from jobflow.broker.names import delay_queues, delivery_exchange, unroutable_queue
from jobflow.broker.retimer import redeliver_unroutable

from .cli_helpers import run_cli
from .faults import message_count, wait_for_messages
from .helpers import eventually

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def ghost(amqp_settings: Settings) -> Iterator[tuple[Any, str]]:
    """A declared ladder and the name of a queue that does not exist yet (deleted afterwards)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_settings.broker_url))
    channel = connection.channel()
    DelayTopology(amqp_settings.queue_prefix).declare(channel)
    name = f"{amqp_settings.queue_prefix}.ghost"
    try:
        yield channel, name
    finally:
        channel.queue_delete(name)
        connection.close()


def deliver_to(channel: Any, prefix: str, queue: str, *, due_ms: int, text: str) -> bytes:
    """What the ladder's last hop does with a message that is due: publish it for ``queue``."""
    body = json.dumps({"message_id": text, "options": {"due_ms": due_ms}}).encode()
    channel.basic_publish(delivery_exchange(prefix), routing_key(0, queue), body)
    return body


def unroutable(settings: Settings) -> int:
    return message_count(settings.broker_url, unroutable_queue(settings.queue_prefix))


class TestRedeliver:
    def test_kept_while_the_queue_is_missing_then_delivered(self, amqp_settings: Settings, ghost: Any) -> None:
        """Nothing is delivered to a queue that does not exist; once it does, `topology redeliver` moves it."""
        channel, queue = ghost
        prefix = amqp_settings.queue_prefix
        body = deliver_to(channel, prefix, queue, due_ms=current_millis() - 1000, text="a")
        eventually(lambda: unroutable(amqp_settings) == 1, timeout=10, what="the unroutable delivery")
        params = pika.URLParameters(amqp_settings.broker_url)
        assert (redeliver_unroutable(params, prefix).left, unroutable(amqp_settings)) == (1, 1)

        channel.queue_declare(queue, durable=True)
        result = run_cli("topology", "redeliver", settings=amqp_settings)
        assert result.exit_code == 0, result.output
        assert "delivered 1," in result.output
        assert [d.body for d in wait_for_messages(amqp_settings.broker_url, queue, 1)] == [body]
        assert unroutable(amqp_settings) == 0

    def test_not_yet_due_goes_back_into_the_ladder(self, amqp_settings: Settings, ghost: Any) -> None:
        """One that still has time to wait waits it in the ladder, not in its queue."""
        channel, queue = ghost
        prefix = amqp_settings.queue_prefix
        deliver_to(channel, prefix, queue, due_ms=current_millis() + 60_000, text="b")
        eventually(lambda: unroutable(amqp_settings) == 1, timeout=10, what="the unroutable delivery")
        channel.queue_declare(queue, durable=True)
        result = redeliver_unroutable(pika.URLParameters(amqp_settings.broker_url), prefix)
        assert (result.delivered, result.retimed, result.left) == (0, 1, 0)
        in_ladder = sum(message_count(amqp_settings.broker_url, q) for q in delay_queues(prefix))
        assert (in_ladder, message_count(amqp_settings.broker_url, queue), unroutable(amqp_settings)) == (1, 0, 0)

    def test_a_worker_redelivers_when_it_declares_its_topology(self, amqp_settings: Settings, ghost: Any) -> None:
        """A job that reached the ladder's end before its queue existed runs once a worker declares that queue."""
        channel, _ = ghost
        prefix = amqp_settings.queue_prefix
        jobs = f"{prefix}.jobs"
        body = deliver_to(channel, prefix, jobs, due_ms=current_millis(), text="c")
        eventually(lambda: unroutable(amqp_settings) == 1, timeout=10, what="the unroutable delivery")
        with jobflow.BrokerJobScheduler(settings=amqp_settings) as scheduler:
            scheduler.broker.declare_queue(jobs)
            scheduler.broker.declare_topology()  # type: ignore[attr-defined]
            [delivery] = wait_for_messages(amqp_settings.broker_url, jobs, 1)
        assert delivery.body == body
        assert unroutable(amqp_settings) == 0
