"""Delays held by RabbitMQ: a ladder of TTL queues that dead-letter into each other.

Level ``k`` is a queue whose messages expire after exactly ``2**k`` ms. A delayed message carries
its delay in binary in its routing key (``b37.b36....b0.<destination queue>``) and enters at the
level of its highest set bit. When it expires there it is dead-lettered to that level's "next"
exchange, whose bindings send it in one routing step into the level of its next set bit, or, when
no bit below is set, to the delivery exchange, which routes it to its destination queue. A message so visits
only the levels of its set bits, waits nowhere but in durable broker queues (nothing is held by a
worker, nothing is lost by a worker restart), and its total wait is the sum of those TTLs: its
delay to the millisecond, plus the time of the hops.

Prior art: NServiceBus's delayed delivery and kombu's native delayed delivery (whole seconds there).
"""

from __future__ import annotations

from typing import Any, Literal

from pika.adapters.blocking_connection import BlockingChannel
from pika.exchange_type import ExchangeType

from jobflow.broker.names import (
    DELAY_LEVELS,
    delay_exchange,
    delay_queue,
    delivery_exchange,
    next_exchange,
    unroutable_queue,
)

#: The longest delay the ladder can hold: 2**38 - 1 ms, about 8.7 years.
MAX_DELAY_MS = 2**DELAY_LEVELS - 1

QueueType = Literal["classic", "quorum"]

# Built by value: the types-pika stub declares the enum members as str.
_TOPIC, _FANOUT = ExchangeType("topic"), ExchangeType("fanout")


def entry_level(delay_ms: int) -> int:
    """The level a message with this delay enters at: its highest set bit."""
    if not 0 < delay_ms <= MAX_DELAY_MS:
        raise ValueError(f"a delay must be between 1 and {MAX_DELAY_MS} ms, got {delay_ms}")
    return delay_ms.bit_length() - 1


def routing_key(delay_ms: int, destination: str) -> str:
    """The delay's bits, most significant first, then the destination queue's name."""
    return ".".join(format(delay_ms, f"0{DELAY_LEVELS}b")) + "." + destination


def levels_visited(delay_ms: int) -> list[int]:
    """The levels a message with this delay waits in, in the order it visits them."""
    return [k for k in reversed(range(DELAY_LEVELS)) if delay_ms >> k & 1]


def _entry_pattern(level: int) -> str:
    # Word i of the routing key holds bit DELAY_LEVELS-1-i; '#' matches the destination's words.
    return "*." * (DELAY_LEVELS - 1 - level) + "1.#"


def _next_level_pattern(expired: int, below: int) -> str:
    """Leaving level ``expired``: bits between it and ``below`` are 0 and bit ``below`` is 1."""
    return "*." * (DELAY_LEVELS - expired) + "0." * (expired - 1 - below) + "1.#"


def _done_pattern(expired: int) -> str:
    """Leaving level ``expired`` with no set bit below it: the delay is over."""
    return "*." * (DELAY_LEVELS - expired) + "0." * expired + "#"


def _destination_pattern(queue_name: str) -> str:
    return "*." * DELAY_LEVELS + queue_name


def queue_type_arguments(queue_type: QueueType) -> dict[str, Any]:
    """Arguments that make a queue a quorum queue; quorum dead-lettering is at-least-once."""
    if queue_type == "quorum":
        return {"x-queue-type": "quorum"}
    return {}


def _delay_queue_arguments(level: int, prefix: str, queue_type: QueueType) -> dict[str, Any]:
    args: dict[str, Any] = {
        "x-message-ttl": 2**level,
        "x-dead-letter-exchange": next_exchange(prefix, level),
        **queue_type_arguments(queue_type),
    }
    if queue_type == "quorum":
        # At-least-once dead-lettering needs reject-publish overflow; with it a hop is never lost.
        args |= {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    return args


class DelayTopology:
    """Declares the ladder for one queue prefix; every declaration is idempotent."""

    def __init__(self, prefix: str, queue_type: QueueType = "quorum") -> None:
        self.prefix = prefix
        self.queue_type = queue_type

    def declare(self, channel: BlockingChannel) -> None:
        """Exchanges, TTL queues and bindings of every level, and the delivery exchange."""
        p = self.prefix
        unroutable = unroutable_queue(p)
        channel.exchange_declare(unroutable, exchange_type=_FANOUT, durable=True)
        channel.queue_declare(unroutable, durable=True, arguments=queue_type_arguments(self.queue_type))
        channel.queue_bind(unroutable, unroutable)
        channel.exchange_declare(
            delivery_exchange(p), exchange_type=_TOPIC, durable=True, arguments={"alternate-exchange": unroutable}
        )
        for level in range(DELAY_LEVELS):
            channel.exchange_declare(delay_exchange(p, level), exchange_type=_TOPIC, durable=True)
            channel.exchange_declare(next_exchange(p, level), exchange_type=_TOPIC, durable=True)
            channel.queue_declare(
                delay_queue(p, level), durable=True, arguments=_delay_queue_arguments(level, p, self.queue_type)
            )
            channel.queue_bind(delay_queue(p, level), delay_exchange(p, level), routing_key=_entry_pattern(level))
        for level in range(DELAY_LEVELS):
            # One routing step from an expired level to the next set bit's level (or out): an
            # exchange chain, one hop per zero bit, made bursts of expiries late by hundreds of ms.
            for below in range(level):
                channel.queue_bind(
                    delay_queue(p, below), next_exchange(p, level), routing_key=_next_level_pattern(level, below)
                )
            channel.exchange_bind(
                destination=delivery_exchange(p), source=next_exchange(p, level), routing_key=_done_pattern(level)
            )

    def bind_destination(self, channel: BlockingChannel, queue_name: str) -> None:
        """Let messages whose delay has passed reach ``queue_name``."""
        channel.queue_bind(queue_name, delivery_exchange(self.prefix), routing_key=_destination_pattern(queue_name))

    def delete(self, channel: BlockingChannel) -> None:
        """Remove the ladder (tests, and operators retiring a prefix); pending delayed messages go with it."""
        for level in range(DELAY_LEVELS):
            channel.queue_delete(delay_queue(self.prefix, level))
            channel.exchange_delete(delay_exchange(self.prefix, level))
            channel.exchange_delete(next_exchange(self.prefix, level))
        channel.exchange_delete(delivery_exchange(self.prefix))
        channel.queue_delete(unroutable_queue(self.prefix))
        channel.exchange_delete(unroutable_queue(self.prefix))
