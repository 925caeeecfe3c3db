"""Broker URLs: one per RabbitMQ node, their pika parameters, and the only way a URL is ever shown.

``JOBFLOW_BROKER_URL`` may list several nodes of one cluster, comma-separated; every connection
tries them in turn, so losing one node stops neither producers nor workers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import pika

from jobflow.errors import ConfigurationError

#: How a worker's consumers connect, unless the URL says otherwise: heartbeats find a dead peer,
#: one attempt per node (Dramatiq's consumer thread retries with a backoff of its own), short
#: socket and handshake timeouts so that a frozen node costs seconds, not minutes.
CONSUMER_DEFAULTS: dict[str, Any] = {
    "heartbeat": 30,
    "connection_attempts": 1,
    "retry_delay": 1.0,
    "socket_timeout": 5.0,
    "stack_timeout": 10.0,
    "blocked_connection_timeout": 60.0,
}

#: The publisher's connection: it retries nodes itself within each call's deadline.
PUBLISHER_DEFAULTS: dict[str, Any] = {**CONSUMER_DEFAULTS, "socket_timeout": 3.0, "stack_timeout": 5.0}


def split_urls(value: str) -> list[str]:
    """The node URLs of ``JOBFLOW_BROKER_URL`` (comma-separated), in the order given."""
    urls = [part.strip() for part in value.split(",") if part.strip()]
    if not urls:
        raise ConfigurationError("the broker URL is empty: give amqp://user:password@host:5672/vhost")
    return urls


def redact_url(url: str) -> str:
    """The URL (or comma-separated URLs) with each password masked: the only form jobflow shows."""
    if "," in url:
        return ",".join(redact_url(part.strip()) for part in url.split(","))
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<an unparsable URL>"
    if password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}" if parts.username is not None else f":***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def vhost_of(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def describe_broker(urls: str | Sequence[str]) -> str:
    """Where a broker is, for people: its node URLs (passwords masked) and the vhost."""
    nodes = split_urls(urls) if isinstance(urls, str) else list(urls)
    shown = ", ".join(redact_url(u) for u in nodes)
    return f"{shown} (vhost {vhost_of(nodes[0])!r})" if nodes and nodes[0].startswith("amqp") else shown


def node_parameters(url: str, defaults: Mapping[str, Any]) -> pika.URLParameters:
    """pika's parameters for one node: the URL's own settings, else ``defaults``."""
    try:
        params = pika.URLParameters(url)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"invalid broker URL {redact_url(url)!r}: {_masked(str(exc), url)}") from None
    given = parse_qs(urlsplit(url).query)
    for key, value in defaults.items():
        if key not in given:
            setattr(params, key, value)
    return params


def cluster_parameters(urls: str | Sequence[str], defaults: Mapping[str, Any]) -> list[pika.URLParameters]:
    """Parameters of every node, checked now: a bad URL is a configuration error, not a hang later."""
    nodes = split_urls(urls) if isinstance(urls, str) else list(urls)
    for url in nodes:
        if urlsplit(url).scheme not in ("amqp", "amqps"):
            raise ConfigurationError(f"unsupported broker URL {redact_url(url)!r}: use amqp:// or amqps://")
    return [node_parameters(url, defaults) for url in nodes]


def _masked(text: str, url: str) -> str:
    try:
        password = urlsplit(url).password
    except ValueError:
        return text
    return text.replace(password, "***") if password else text
