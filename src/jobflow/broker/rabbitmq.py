"""Building the Dramatiq broker a URL names: the in-memory one, or RabbitMQ with confirms.

All pika connection tuning lives here.
"""

from __future__ import annotations

import math
import threading
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import dramatiq
import pika
import pika.exceptions
from dramatiq.broker import Consumer
from dramatiq.brokers.rabbitmq import MAX_ENQUEUE_ATTEMPTS, RabbitmqBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import q_name
from dramatiq.errors import ConnectionClosed
from dramatiq.middleware import AsyncIO, CurrentMessage, Middleware, Retries, TimeLimit, default_middleware

from jobflow.broker.consumer import JobflowConsumer, declare_dead_letter_queue, publish_dead_letter
from jobflow.broker.ladder import MAX_DELAY_MS, DelayTopology, entry_level, queue_type_arguments, routing_key
from jobflow.broker.names import delay_exchange
from jobflow.broker.retimer import LadderRetimer
from jobflow.dead_letter import DeadLetter
from jobflow.errors import ConfigurationError, SchedulingError
from jobflow.middleware.due_time import DueTime
from jobflow.middleware.failures import Failures
from jobflow.middleware.time_limit import JobTimeLimit
from jobflow.settings import Settings

# Connection tuning that keeps a worker healthy, unless the URL sets it.
_CONNECTION_DEFAULTS: dict[str, Any] = {
    "heartbeat": 30,
    "connection_attempts": 5,
    "retry_delay": 2.0,
    "blocked_connection_timeout": 60.0,
    "socket_timeout": 10.0,
}

_memory_brokers: dict[str, StubBroker] = {}
_memory_lock = threading.Lock()


def redact_url(url: str) -> str:
    """The URL with its password masked: the only form of a URL jobflow logs or prints."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}" if parts.username is not None else f":***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def _middleware() -> list[Middleware]:
    # Failures replaces Retries; JobTimeLimit replaces TimeLimit and comes last, so its deadline is
    # disarmed (after_* hooks run in reverse) before Failures publishes a retry or a dead letter.
    stack: list[Middleware] = []
    for m in default_middleware:
        if m is Retries:
            stack.append(Failures())
        elif m is not TimeLimit:
            stack.append(m())
    return [*stack, AsyncIO(), CurrentMessage(), DueTime(), JobTimeLimit()]


class JobflowRabbitmqBroker(RabbitmqBroker):
    """RabbitMQ with publisher confirms always on, connection parameters that survive trouble, and
    every delayed enqueue (schedules, ``send_with_options(delay=...)``, retry backoffs) held in the
    broker's delay topology instead of Dramatiq's ``.DQ`` queue in worker memory.
    """

    def __init__(self, url: str, *, settings: Settings) -> None:
        params = pika.URLParameters(url)
        given = parse_qs(urlsplit(url).query)
        for key, value in _CONNECTION_DEFAULTS.items():
            if key not in given:
                setattr(params, key, value)
        super().__init__(confirm_delivery=True, parameters=None, middleware=_middleware())
        self.parameters = [params]
        self.url = url
        self.settings = settings
        self.topology = DelayTopology(settings.queue_prefix, settings.delay_queue_type)
        self._ladder_declared = False
        self.retimer = LadderRetimer(self.parameters, settings.queue_prefix)
        self._consumed: set[str] = set()

    def __repr__(self) -> str:
        return f"JobflowRabbitmqBroker({redact_url(self.url)!r})"

    @property
    def consumer_class(self) -> type[JobflowConsumer]:
        return JobflowConsumer  # screens poison and keeps each delivery's body for its dead letter

    def _declare_xq_queue(self, queue_name: str) -> Any:
        # Without Dramatiq's 7-day TTL; a quorum queue in quorum mode, so dead letters are replicated too.
        return declare_dead_letter_queue(self, queue_name, queue_type_arguments(self.settings.queue_type))

    def publish_dead_letter(
        self, source_queue: str, body: bytes, record: DeadLetter, headers: dict[str, Any] | None = None
    ) -> None:
        """Publish a dead letter to ``<source_queue>.XQ``, confirmed; raises if it was not."""
        publish_dead_letter(self, source_queue, body, record, headers)

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        consumer = super().consume(queue_name, prefetch, timeout)
        # Dramatiq consumes a queue again only after a connection error; RabbitMQ may have been down,
        # and whatever expired in the ladder meanwhile would run late by the outage: re-time it.
        if queue_name in self._consumed:
            self.retimer.trigger()
        self._consumed.add(queue_name)
        return consumer

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        arguments: dict[str, Any] = super()._build_queue_arguments(queue_name)  # type: ignore[no-untyped-call]
        return arguments | queue_type_arguments(self.settings.queue_type)

    def _declare_queue(self, queue_name: str) -> Any:
        # Runs whenever Dramatiq (re)declares a work queue: the ladder comes with it, idempotently,
        # once per broker until a publish fails (the ladder may be gone: declare it again).
        result = super()._declare_queue(queue_name)  # type: ignore[no-untyped-call]
        if not self._ladder_declared:
            try:
                self.topology.declare(self.channel)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 406:  # PRECONDITION_FAILED: the ladder exists with other arguments
                    raise
                del self.channel
                raise ConfigurationError(
                    f"the delay ladder of prefix {self.settings.queue_prefix!r} exists with other arguments"
                    f" than JOBFLOW_DELAY_QUEUE_TYPE={self.settings.delay_queue_type!r} asks for ({exc.reply_text});"
                    " set the type it was declared with, or move its messages and delete it"
                ) from exc
            self._ladder_declared = True
        self.topology.bind_destination(self.channel, queue_name)
        return result

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        if not delay or delay <= 0:
            return super().enqueue(message)
        delay = math.ceil(delay)  # never shorter than asked: 0.5 ms waits 1 ms
        if delay > MAX_DELAY_MS:
            raise SchedulingError(f"a delay can be at most {MAX_DELAY_MS} ms (about 8.7 years), got {delay} ms")
        queue_name = q_name(message.queue_name)
        attempts = 0
        while True:
            try:
                self.declare_queue(queue_name, ensure=True)
                self.emit_before("enqueue", message, delay)
                self.channel.basic_publish(
                    exchange=delay_exchange(self.settings.queue_prefix, entry_level(delay)),
                    routing_key=routing_key(delay, queue_name),
                    body=message.encode(),
                    properties=pika.BasicProperties(delivery_mode=2),
                    mandatory=True,
                )
                self.emit_after("enqueue", message, delay)
                return message
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as exc:
                # As Dramatiq does for direct publishes: a fresh connection, the queue declared again.
                del self.connection
                self.queues_pending.add(queue_name)
                self._ladder_declared = False
                attempts += 1
                if attempts >= MAX_ENQUEUE_ATTEMPTS:
                    raise ConnectionClosed(exc) from None


def memory_broker(url: str = "memory://") -> StubBroker:
    """The process-wide in-memory broker for this URL: schedulers and in-process workers share it.

    Like Hangfire's in-memory storage, it is for development, tests and the demo; its messages
    die with the process.
    """
    with _memory_lock:
        broker = _memory_brokers.get(url)
        if broker is None:
            broker = _memory_brokers[url] = StubBroker(middleware=_middleware())
        return broker


def create_broker(settings: Settings | None = None) -> dramatiq.Broker:
    """The broker ``settings.broker_url`` names (``JOBFLOW_BROKER_URL`` by default)."""
    settings = settings or Settings()
    url = settings.broker_url
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return memory_broker(url)
    if scheme in ("amqp", "amqps"):
        return JobflowRabbitmqBroker(url, settings=settings)
    raise ConfigurationError(f"unsupported broker URL {redact_url(url)!r}: use memory://, amqp:// or amqps://")
