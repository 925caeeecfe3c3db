"""How much a process declares: the ladder once in full, and a fresh producer only checks for it."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta
from typing import Any

import pika
import pika.channel
import pytest
from structlog.testing import capture_logs

import jobflow
from jobflow import JobRegistry, Settings
from jobflow.broker.names import delay_queue, jobs_queue, next_exchange, unroutable_queue
from jobflow.broker.queues import delay_queue_arguments, parse_version, plain_queue_arguments
from jobflow.broker.rabbitmq import JobflowRabbitmqBroker

from .faults import message_count

pytestmark = pytest.mark.rabbitmq

METHODS = ("exchange_declare", "queue_declare", "queue_bind", "exchange_bind")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every declaration RPC any pika channel of this process makes, by method."""
    seen: Counter[str] = Counter()
    lock = threading.Lock()
    for name in METHODS:
        original = getattr(pika.channel.Channel, name)

        def counted(self: Any, *args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            with lock:
                seen[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(pika.channel.Channel, name, counted)
    return seen


def test_a_fresh_producer_checks_the_ladder_instead_of_declaring_it(
    amqp_settings: Settings, registry: JobRegistry, calls: Counter[str]
) -> None:
    class Later(jobflow.Job, registry=registry):
        def execute(self, ctx: jobflow.JobContext) -> None:
            pass

    with jobflow.BrokerJobScheduler(settings=amqp_settings, registry=registry) as first:
        first.schedule(Later(), delay=timedelta(hours=1))
    assert calls["queue_bind"] > 700  # the first process on a broker declares the ladder in full
    calls.clear()
    with jobflow.BrokerJobScheduler(settings=amqp_settings, registry=registry) as second:
        second.schedule(Later(), delay=timedelta(hours=1))
    assert sum(calls.values()) < 10, calls  # one passive check, and its own queue's few steps
    assert calls["queue_bind"] <= 2
    level = delay_queue(amqp_settings.queue_prefix, 21)  # 1 h is 3,600,000 ms: bit 21 is its highest
    assert message_count(amqp_settings.broker_url, level) == 2


def test_a_missing_level_is_declared_again_in_full(
    amqp_settings: Settings, registry: JobRegistry, calls: Counter[str]
) -> None:
    """The marker says the ladder exists; RabbitMQ returning a publish as unroutable says otherwise."""

    class Later(jobflow.Job, registry=registry):
        def execute(self, ctx: jobflow.JobContext) -> None:
            pass

    with jobflow.BrokerJobScheduler(settings=amqp_settings, registry=registry) as first:
        first.schedule(Later(), delay=timedelta(hours=1))
    level = delay_queue(amqp_settings.queue_prefix, 21)
    connection = pika.BlockingConnection(pika.URLParameters(amqp_settings.broker_url))
    try:
        connection.channel().queue_delete(level)
    finally:
        connection.close()
    calls.clear()
    with jobflow.BrokerJobScheduler(settings=amqp_settings, registry=registry) as second:
        second.schedule(Later(), delay=timedelta(hours=1))
    assert calls["queue_bind"] > 700
    assert message_count(amqp_settings.broker_url, level) == 1


def test_a_ladder_declared_by_rabbitmq_3_is_used_after_an_upgrade_to_4(
    amqp_settings: Settings, registry: JobRegistry
) -> None:
    """RabbitMQ 3.x queues have no ``x-delivery-limit``; on 4.x jobflow declares ``-1``, which an
    upgraded broker refuses as inequivalent. The worker must keep them, not refuse to start."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_settings.broker_url))
    try:
        impl: Any = connection._impl  # type: ignore[attr-defined]  # the handshake's server properties
        version = parse_version((impl.server_properties or {}).get("version", ""))
        if version < (4, 0):
            pytest.skip(f"RabbitMQ {version}: only RabbitMQ 4 declares x-delivery-limit -1")
        p = amqp_settings.queue_prefix
        channel = connection.channel()
        as_on_3 = delay_queue_arguments(1, next_exchange(p, 0), "quorum", (3, 10))
        channel.queue_declare(delay_queue(p, 0), durable=True, arguments=as_on_3)
        channel.queue_declare(unroutable_queue(p), durable=True, arguments=plain_queue_arguments("quorum", (3, 10)))
    finally:
        connection.close()

    class Soon(jobflow.Job, registry=registry):
        def execute(self, ctx: jobflow.JobContext) -> None:
            pass

    broker = JobflowRabbitmqBroker(settings=amqp_settings.model_copy(update={"queue_type": "quorum"}))
    try:
        with capture_logs() as logs:
            broker.declare_queue(jobs_queue(p))
            broker.declare_topology(redeliver=False)  # a worker's boot: the ladder in full
        with jobflow.BrokerJobScheduler(broker=broker, registry=registry) as scheduler:
            scheduler.schedule(Soon(), delay=timedelta(milliseconds=1))  # publishing is not refused either
    finally:
        broker.close()
    kept = [e for e in logs if e["event"] == "topology.kept_as_is"]
    assert {e["step"] for e in kept} >= {f"queue_declare {delay_queue(p, 0)}", f"queue_declare {unroutable_queue(p)}"}
    assert all("delivery-limit" in e["hint"] for e in kept)
