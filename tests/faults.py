"""Real broker faults for the tests: connections closed by RabbitMQ itself, and raw reads of queues.

``rabbitmqctl close_connection`` closes a connection from the server side, exactly as a broker
restart or a failover would; nothing about RabbitMQ is simulated.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
import pika.channel
import pika.exceptions
import pytest

from jobflow.dead_letter import DeadLetter

from .conftest import rabbitmqctl

Predicate = Callable[[str, bytes], bool]


def vhost_of(url: str) -> str:
    return unquote(urlsplit(url).path[1:]) or "/"


def _rabbitmqctl(*args: str) -> str:
    return rabbitmqctl("--no-table-headers", *args).stdout


def connections(vhost: str) -> list[tuple[str, int]]:
    """(pid, client port) of every connection RabbitMQ holds in ``vhost``."""
    rows = [line.split("\t") for line in _rabbitmqctl("list_connections", "pid", "vhost", "peer_port").splitlines()]
    return [(row[0], int(row[2])) for row in rows if len(row) == 3 and row[1] == vhost]


def close_connections(vhost: str, port: int | None = None) -> int:
    """Close, from the server side, the connections of ``vhost`` (only the one from ``port`` if given)."""
    closed = 0
    for pid, peer_port in connections(vhost):
        if port is None or peer_port == port:
            # A connection may already be gone when the command runs: that is not an error here.
            rabbitmqctl("close_connection", pid, "closed by a jobflow fault test", check=False)
            closed += 1
    return closed


def local_port(channel: pika.channel.Channel) -> int:
    """The client port of a channel's connection (pika keeps its socket private)."""
    connection: Any = channel.connection
    return int(connection._transport._sock.getsockname()[1])


@contextmanager
def connection_closed_before_publish(
    monkeypatch: pytest.MonkeyPatch, vhost: str, predicate: Predicate, *, times: int
) -> Iterator[list[str]]:
    """Close the publishing connection from the server side right before each matching publish.

    Matching is on (routing key, body); at most ``times`` publishes are hit. Yields the routing
    keys of the publishes that were hit. Patched at pika's own channel, under every adapter: the
    worker's publisher (a SelectConnection) and blocking channels alike.
    """
    original = pika.channel.Channel.basic_publish
    hits: list[str] = []
    lock = threading.Lock()

    def publish(
        self: pika.channel.Channel, exchange: str, routing_key: str, body: bytes, *args: Any, **kwargs: Any
    ) -> Any:
        with lock:
            hit = len(hits) < times and predicate(routing_key, body)
            if hit:
                hits.append(routing_key)
        if hit:
            port = local_port(self)
            assert close_connections(vhost, port) == 1, f"no connection from port {port} in {vhost}"
        return original(self, exchange, routing_key, body, *args, **kwargs)

    monkeypatch.setattr(pika.channel.Channel, "basic_publish", publish)
    try:
        yield hits
    finally:
        monkeypatch.setattr(pika.channel.Channel, "basic_publish", original)


def is_retry_of(message_id: str | None) -> Predicate:
    """Matches the publish of a retry (an attempt after the first) of one message, or of any if None."""

    def match(routing_key: str, body: bytes) -> bool:
        try:
            fields = json.loads(body)
        except ValueError:
            return False
        same = message_id is None or fields.get("message_id") == message_id
        return bool(same and fields.get("options", {}).get("retries", 0) >= 1)

    return match


def to_dead_letter_queue(routing_key: str, body: bytes) -> bool:
    return routing_key.endswith(".XQ")


class Delivery:
    """One message read back from a queue."""

    def __init__(self, properties: pika.BasicProperties, body: bytes) -> None:
        self.headers: dict[str, Any] = dict(properties.headers or {})
        self.body = body
        self.delivery_mode = properties.delivery_mode
        self.record = DeadLetter.from_headers(self.headers)

    @property
    def message(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


def drain(url: str, queue: str) -> list[Delivery]:
    """Every message in ``queue``, removed from it."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        out: list[Delivery] = []
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            assert properties is not None
            assert isinstance(body, bytes)
            out.append(Delivery(properties, body))
    finally:
        connection.close()


def message_count(url: str, queue: str) -> int:
    """How many messages wait in ``queue``; 0 while it does not exist."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count or 0)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return 0
        raise
    finally:
        connection.close()


def wait_for_messages(url: str, queue: str, count: int, timeout: float = 30.0) -> list[Delivery]:
    """Wait until ``queue`` holds at least ``count`` messages, then drain it."""
    deadline = time.monotonic() + timeout
    while message_count(url, queue) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{queue} holds {message_count(url, queue)} messages, expected {count}")
        time.sleep(0.1)
    return drain(url, queue)


def publish_raw(url: str, queue: str, bodies: list[bytes], *, headers: dict[str, Any] | None = None) -> None:
    """Publish bodies as they are, persistent and confirmed, straight to ``queue``."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish(
                "", queue, body, pika.BasicProperties(delivery_mode=2, headers=headers), mandatory=True
            )
    finally:
        connection.close()


def consumer_count(url: str, queue: str) -> int:
    """How many consumers ``queue`` has; 0 while it does not exist."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.consumer_count or 0)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return 0
        raise
    finally:
        connection.close()


def wait_for_consumer(url: str, queue: str, timeout: float = 60.0) -> None:
    """Wait until a worker consumes ``queue``: a worker process declares its topology first."""
    deadline = time.monotonic() + timeout
    while consumer_count(url, queue) < 1:
        if time.monotonic() > deadline:
            raise AssertionError(f"no worker consumes {queue} after {timeout:.0f} s")
        time.sleep(0.1)
