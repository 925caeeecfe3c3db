"""How much a process declares: the ladder once in full, and a fresh producer only checks for it."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta
from typing import Any

import pika
import pika.channel
import pytest

import jobflow
from jobflow import JobRegistry, Settings
from jobflow.broker.names import delay_queue

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
