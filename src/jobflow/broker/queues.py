"""The arguments of every queue jobflow declares, by queue type and RabbitMQ version.

Quorum queues are the default for work and dead-letter queues, as for the ladder: they are
replicated, and with ``x-dead-letter-strategy: at-least-once`` (which needs ``reject-publish``
overflow) a message RabbitMQ dead-letters is never lost on the way. Classic queues, an explicit
choice, dead-letter at most once: a message rejected on the failure path while the broker restarts
can vanish.

Delivery limits differ by version: RabbitMQ 4.0 gives every quorum queue a limit of 20 redeliveries
unless told otherwise, and ``-1`` means none; on 3.x a negative limit means 0 (every redelivery
dead-letters). Work queues get 20 on every version, so a job that kills its worker over and over
(out of memory, a segfault) ends in the dead-letter queue instead of looping; dead-letter queues
and the ladder, whose messages are only ever read by operators' and the re-timer's walks (each a
redelivery), get none: ``-1`` on 4.x, the argument left out on 3.x.
"""

from __future__ import annotations

from typing import Any, Literal

from dramatiq.common import xq_name

QueueType = Literal["classic", "quorum"]
ServerVersion = tuple[int, int]

#: Redeliveries of one message (crashed or disconnected workers) before RabbitMQ dead-letters it.
WORK_QUEUE_DELIVERY_LIMIT = 20

#: What jobflow assumes before it has spoken to the broker.
UNKNOWN_VERSION: ServerVersion = (0, 0)


def parse_version(text: object) -> ServerVersion:
    """``(major, minor)`` of a RabbitMQ version string such as ``"4.0.5"``; (0, 0) when unknown."""
    try:
        major, minor = str(text).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return UNKNOWN_VERSION


#: Why a queue of an upgraded broker is used as it is, and what the operator should do.
UPGRADED_QUEUE_NOTE = (
    "declared by RabbitMQ 3.x without a delivery limit, so RabbitMQ 4 gives it its default of 20 redeliveries;"
    " lift it with a policy (rabbitmqctl set_policy --apply-to quorum_queues jobflow-unlimited"
    " '<queue pattern>' '{\"delivery-limit\": -1}'), or move its messages and delete it so jobflow declares it anew"
)


def _unlimited(version: ServerVersion) -> dict[str, Any]:
    return {"x-delivery-limit": -1} if version >= (4, 0) else {}


def _at_least_once() -> dict[str, Any]:
    return {"x-queue-type": "quorum", "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


def work_queue_arguments(
    queue: str, queue_type: QueueType, version: ServerVersion, *, max_priority: int | None = None
) -> dict[str, Any]:
    """A work queue: what RabbitMQ dead-letters from it goes to its ``.XQ``."""
    args: dict[str, Any] = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": xq_name(queue)}
    if queue_type == "quorum":
        return args | _at_least_once() | {"x-delivery-limit": WORK_QUEUE_DELIVERY_LIMIT}
    if max_priority:
        args["x-max-priority"] = max_priority
    return args


def dead_letter_queue_arguments(queue_type: QueueType, version: ServerVersion) -> dict[str, Any]:
    """A ``.XQ``: no TTL (dead letters wait for an operator) and no dead-lettering of its own."""
    if queue_type == "quorum":
        return {"x-queue-type": "quorum"} | _unlimited(version)
    return {}


def delay_queue_arguments(
    ttl_ms: int, next_exchange: str, queue_type: QueueType, version: ServerVersion
) -> dict[str, Any]:
    """One level of the ladder: messages expire after ``ttl_ms`` into ``next_exchange``."""
    args: dict[str, Any] = {"x-message-ttl": ttl_ms, "x-dead-letter-exchange": next_exchange}
    if queue_type == "quorum":
        return args | _at_least_once() | _unlimited(version)
    return args


def plain_queue_arguments(queue_type: QueueType, version: ServerVersion) -> dict[str, Any]:
    """A queue that only holds messages (``delay.unroutable``)."""
    if queue_type == "quorum":
        return {"x-queue-type": "quorum"} | _unlimited(version)
    return {}
