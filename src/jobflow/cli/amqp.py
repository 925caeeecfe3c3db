"""Every pika call of the operators' commands: connecting, counting queues, reading and acking.

The commands talk AMQP 0-9-1 only, so they work on any RabbitMQ without the management plugin.
Connections carry a ``connection_name`` (``jobflow-cli <command>``) so that an operator, or a test,
can find them with ``rabbitmqctl list_connections name client_properties``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit, urlunsplit

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.connection_workflow import AMQPConnectorException, AMQPConnectorStackTimeout

from jobflow.broker import redact_url
from jobflow.broker.connection import describe_broker, node_parameters, split_urls
from jobflow.cli.errors import BrokerError, UsageProblem
from jobflow.errors import ConfigurationError

#: A person waits for the command line: fail after seconds, not after Dramatiq's minute of retries.
#: One attempt per node: a refused login or vhost fails at once, and a rerun is the operator's call;
#: ``stack_timeout`` bounds a broker that accepts TCP but never answers AMQP.
_CLI_CONNECTION_DEFAULTS = {
    "connection_attempts": "1",
    "retry_delay": "1",
    "socket_timeout": "5",
    "stack_timeout": "6",
    "heartbeat": "60",
}


def cli_url(url: str, purpose: str) -> str:
    """``url`` with short connection timeouts and a connection name, unless the URL sets them."""
    parts = urlsplit(url)
    given = parse_qs(parts.query)
    extra = {k: v for k, v in _CLI_CONNECTION_DEFAULTS.items() if k not in given}
    if "client_properties" not in given:
        extra["client_properties"] = repr({"connection_name": f"jobflow-cli {purpose} pid={os.getpid()}"})
    query = "&".join(q for q in (parts.query, urlencode(extra)) if q)
    return urlunsplit(parts._replace(query=query))


def broker_error(url: str, exc: BaseException, doing: str = "connect to") -> BrokerError:
    """A :class:`BrokerError` that says what failed, on which broker (password masked), and what to check."""
    if "," in url:  # a cluster: the node tried last failed last
        return broker_error(split_urls(url)[-1], exc, doing)
    parts = urlsplit(url)
    where = f"{parts.hostname or 'localhost'}:{parts.port or (5671 if parts.scheme == 'amqps' else 5672)}"
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    if isinstance(exc, pika.exceptions.ProbableAuthenticationError | pika.exceptions.AuthenticationError):
        hint = f"the broker refused the login of user {parts.username or 'guest'!r}: check the user name and password"
    elif isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
        hint = f"the broker refused access to vhost {vhost!r}: check that it exists and the user may use it"
    elif isinstance(exc, socket.gaierror):
        hint = f"the host name {parts.hostname!r} does not resolve: check the URL"
    elif isinstance(exc, pika.exceptions.ConnectionClosedByBroker | pika.exceptions.StreamLostError):
        hint = "the connection was closed midway, by the broker or the network"
    elif isinstance(exc, pika.exceptions.ChannelClosedByBroker):
        hint = "the broker refused an operation (see its reason)"
    elif isinstance(exc, AMQPConnectorStackTimeout):
        hint = (
            f"something at {where} accepted the TCP connection but did not complete the AMQP handshake in time:"
            " is it RabbitMQ (not another service on that port), and is it overloaded or frozen?"
        )
        exc = TimeoutError("AMQP handshake timed out")
    else:
        hint = f"is RabbitMQ running and reachable at {where}? check --broker or JOBFLOW_BROKER_URL"
    detail = str(exc) or repr(exc)
    if parts.password:
        detail = detail.replace(parts.password, "***")
    return BrokerError(f"cannot {doing} the broker at {redact_url(url)}: {hint} ({detail})", broker=redact_url(url))


#: What pika raises when a broker cannot be used: AMQP errors, socket errors, and its connection
#: workflow's own exceptions (a handshake that timed out derives from neither of the others).
BROKER_FAILURES = (pika.exceptions.AMQPError, OSError, AMQPConnectorException)

#: The connection type the commands pass around (so that only this module imports pika).
Connection = pika.BlockingConnection


def cli_parameters(url: str, purpose: str) -> list[pika.URLParameters]:
    """Connection parameters of every node, tried in turn; a URL pika cannot read is a usage problem."""
    try:
        return [node_parameters(cli_url(node, purpose), {}) for node in split_urls(url)]
    except ConfigurationError as exc:
        raise UsageProblem(str(exc)) from None


def describe(url: str) -> str:
    """The broker for people: node URLs with passwords masked, and the vhost."""
    return describe_broker(url)


def connect(url: str, purpose: str) -> pika.BlockingConnection:
    """A blocking connection for one command, or a :class:`BrokerError` saying what to check."""
    parameters = cli_parameters(url, purpose)
    try:
        return pika.BlockingConnection(parameters)
    except BROKER_FAILURES as exc:
        raise broker_error(url, exc) from None


@contextmanager
def connection(url: str, purpose: str) -> Iterator[pika.BlockingConnection]:
    """A connection closed afterwards; any AMQP failure inside becomes a :class:`BrokerError`."""
    conn = connect(url, purpose)
    try:
        yield conn
    except BROKER_FAILURES as exc:
        raise broker_error(url, exc, doing="keep talking to") from None
    finally:
        close_quietly(conn)


def close_quietly(closable: pika.BlockingConnection | BlockingChannel) -> None:
    """Close, ignoring a connection the broker already dropped: what was not acked goes back to its queue."""
    try:
        if closable.is_open:
            closable.close()
    except BROKER_FAILURES:
        pass


@dataclass(frozen=True)
class QueueCount:
    """What a passive declare tells: ready messages and consumers (not unacked ones)."""

    name: str
    exists: bool
    ready: int
    consumers: int


class QueueCounter:
    """Passive declares on one connection, opening a fresh channel after each 404 (which closes the channel)."""

    def __init__(self, conn: pika.BlockingConnection) -> None:
        self._conn = conn
        self._channel: BlockingChannel | None = None

    def count(self, queue: str) -> QueueCount:
        if self._channel is None or not self._channel.is_open:
            self._channel = self._conn.channel()
        try:
            ok = self._channel.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            self._channel = None
            return QueueCount(queue, exists=False, ready=0, consumers=0)
        return QueueCount(
            queue, exists=True, ready=ok.method.message_count or 0, consumers=ok.method.consumer_count or 0
        )

    def close(self) -> None:
        if self._channel is not None:
            close_quietly(self._channel)


@dataclass(frozen=True)
class Delivery:
    """One message taken from a queue and not yet acknowledged."""

    tag: int
    headers: dict[str, Any]
    body: bytes
    redelivered: bool


def take(channel: BlockingChannel, queue: str) -> Delivery | None:
    """The next ready message, unacknowledged (it returns to the queue if the channel closes), or None."""
    method, properties, body = channel.basic_get(queue, auto_ack=False)
    if method is None:
        return None
    assert method.delivery_tag is not None
    return Delivery(
        tag=method.delivery_tag,
        headers=dict((properties.headers if properties is not None else None) or {}),
        body=body if isinstance(body, bytes) else (body or "").encode(),
        redelivered=bool(method.redelivered),
    )


def acknowledge(channel: BlockingChannel, delivery: Delivery) -> None:
    """Remove ``delivery`` from its queue for good."""
    channel.basic_ack(delivery.tag)
