"""Every private name of Dramatiq that jobflow builds on, in one place.

jobflow subclasses Dramatiq's RabbitMQ consumer and its delivery proxy, reads its RabbitMQ broker's
pending-queue set and its worker's consumer threads. None of that is public API: a minor release may
rename it. It was read from Dramatiq ``WRITTEN_FOR``; ``pyproject.toml`` pins that series, and
:func:`check_version` (run at import, and by a test) says at once when another one is installed.
"""

from __future__ import annotations

import warnings
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.rabbitmq import _RabbitmqConsumer as RabbitmqConsumer
from dramatiq.brokers.rabbitmq import _RabbitmqMessage as RabbitmqMessage

#: The Dramatiq series (major.minor) whose private names this module was written against.
WRITTEN_FOR = "2.2"


def check_version(version: str = dramatiq.__version__) -> bool:
    """True for the series this was written for; otherwise a warning naming both, and False."""
    if version == WRITTEN_FOR or version.startswith(WRITTEN_FOR + "."):
        return True
    warnings.warn(
        f"jobflow was written against Dramatiq {WRITTEN_FOR}.x and relies on some of its private names;"
        f" Dramatiq {version} is installed: install dramatiq>={WRITTEN_FOR},<{_next_minor(WRITTEN_FOR)}",
        RuntimeWarning,
        stacklevel=2,
    )
    return False


def _next_minor(series: str) -> str:
    major, minor = series.split(".")
    return f"{major}.{int(minor) + 1}"


def pending_queues(broker: RabbitmqBroker) -> set[str]:
    """The canonical queues Dramatiq's RabbitMQ broker has yet to declare (``queues_pending``)."""
    pending: set[str] = broker.queues_pending
    return pending


def delivery_tag(message: Any) -> int:
    """The AMQP delivery tag a worker's message proxy carries."""
    return int(message._tag)


check_version()

__all__ = [
    "WRITTEN_FOR",
    "RabbitmqConsumer",
    "RabbitmqMessage",
    "check_version",
    "delivery_tag",
    "pending_queues",
]
