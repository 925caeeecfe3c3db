"""Every pika call of the runtime: the brokers, the consumer, the ladder and confirmed publishing.

:func:`create_broker` builds the broker a URL names: ``memory://`` (in-process) or RabbitMQ
(``amqp://`` / ``amqps://``, one URL per node of a cluster, comma-separated).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import dramatiq

from jobflow.broker.connection import redact_url, split_urls
from jobflow.broker.memory import MemoryBroker, PublishFaults, memory_broker
from jobflow.broker.rabbitmq import JobflowRabbitmqBroker
from jobflow.errors import ConfigurationError
from jobflow.settings import Settings


def create_broker(settings: Settings | None = None) -> dramatiq.Broker:
    """The broker ``settings.broker_url`` names (``JOBFLOW_BROKER_URL`` by default)."""
    settings = settings or Settings()
    urls = split_urls(settings.broker_url)
    schemes = {urlsplit(u).scheme for u in urls}
    if schemes == {"memory"} and len(urls) == 1:
        return memory_broker(urls[0], settings)
    if schemes <= {"amqp", "amqps"}:
        return JobflowRabbitmqBroker(settings=settings)
    raise ConfigurationError(
        f"unsupported broker URL {redact_url(settings.broker_url)!r}: use memory://, or amqp:// / amqps://"
        " (several RabbitMQ nodes comma-separated)"
    )


__all__ = ["JobflowRabbitmqBroker", "MemoryBroker", "PublishFaults", "create_broker", "memory_broker", "redact_url"]
