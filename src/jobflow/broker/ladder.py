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

from typing import Any

from pika.adapters.blocking_connection import BlockingChannel
from pika.exchange_type import ExchangeType

from jobflow.broker.names import (
    DELAY_LEVELS,
    delay_exchange,
    delay_queue,
    delivery_exchange,
    ladder_marker,
    next_exchange,
    unroutable_queue,
    watchdog_queue,
)
from jobflow.broker.publisher import Step
from jobflow.broker.queues import (
    UNKNOWN_VERSION,
    UPGRADED_QUEUE_NOTE,
    QueueType,
    ServerVersion,
    delay_queue_arguments,
    parse_version,
    plain_queue_arguments,
)

#: The longest delay the ladder can hold: 2**38 - 1 ms, about 8.7 years.
MAX_DELAY_MS = 2**DELAY_LEVELS - 1

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


def unlimited_queue_step(queue: str, arguments: dict[str, Any]) -> Step:
    """Declares a queue whose messages must never hit a delivery limit (``-1`` on RabbitMQ 4).

    The same queue declared by RabbitMQ 3.x has no limit argument, and an upgraded broker refuses
    the declaration as inequivalent: it is then used as it is, with a warning saying how to lift
    the limit of 20 that RabbitMQ 4 gives it.
    """
    kwargs = {"queue": queue, "durable": True, "arguments": arguments}
    if "x-delivery-limit" not in arguments:
        return Step("queue_declare", kwargs)
    return Step("queue_declare", kwargs, ok_codes=(406,), ok_if="x-delivery-limit", note=UPGRADED_QUEUE_NOTE)


def _declare_exchange(name: str, kind: ExchangeType, arguments: dict[str, Any] | None = None) -> Step:
    return Step("exchange_declare", {"exchange": name, "exchange_type": kind, "durable": True, "arguments": arguments})


class DelayTopology:
    """The ladder of one queue prefix, as declaration steps; every step is idempotent."""

    def __init__(self, prefix: str, queue_type: QueueType = "quorum") -> None:
        self.prefix = prefix
        self.queue_type = queue_type

    def declare_steps(self, version: ServerVersion = UNKNOWN_VERSION) -> list[Step]:
        """Exchanges, TTL queues and bindings of every level, and the delivery exchange."""
        p = self.prefix
        unroutable = unroutable_queue(p)
        steps = [
            _declare_exchange(unroutable, _FANOUT),
            unlimited_queue_step(unroutable, plain_queue_arguments(self.queue_type, version)),
            Step("queue_bind", {"queue": unroutable, "exchange": unroutable, "routing_key": ""}),
            _declare_exchange(delivery_exchange(p), _TOPIC, {"alternate-exchange": unroutable}),
        ]
        for level in range(DELAY_LEVELS):
            args = delay_queue_arguments(2**level, next_exchange(p, level), self.queue_type, version)
            steps += [
                _declare_exchange(delay_exchange(p, level), _TOPIC),
                _declare_exchange(next_exchange(p, level), _TOPIC),
                unlimited_queue_step(delay_queue(p, level), args),
                Step(
                    "queue_bind",
                    {
                        "queue": delay_queue(p, level),
                        "exchange": delay_exchange(p, level),
                        "routing_key": _entry_pattern(level),
                    },
                ),
            ]
        for level in range(DELAY_LEVELS):
            # One routing step from an expired level to the next set bit's level (or out): an
            # exchange chain, one hop per zero bit, made bursts of expiries late by hundreds of ms.
            steps += [
                Step(
                    "queue_bind",
                    {
                        "queue": delay_queue(p, below),
                        "exchange": next_exchange(p, level),
                        "routing_key": _next_level_pattern(level, below),
                    },
                )
                for below in range(level)
            ]
            steps.append(
                Step(
                    "exchange_bind",
                    {
                        "destination": delivery_exchange(p),
                        "source": next_exchange(p, level),
                        "routing_key": _done_pattern(level),
                    },
                )
            )
        steps.append(_declare_exchange(ladder_marker(p, self.queue_type), _FANOUT))
        return steps

    def probe_step(self) -> Step:
        """A passive check of the marker declared last: present, the whole ladder was declared."""
        marker = ladder_marker(self.prefix, self.queue_type)
        return Step(
            "exchange_declare",
            {"exchange": marker, "exchange_type": _FANOUT, "passive": True},
            ok_codes=(404,),
            probe=True,
        )

    def bind_destination_step(self, queue_name: str) -> Step:
        """Lets messages whose delay has passed reach ``queue_name``."""
        return Step(
            "queue_bind",
            {
                "queue": queue_name,
                "exchange": delivery_exchange(self.prefix),
                "routing_key": _destination_pattern(queue_name),
            },
        )

    def delete_steps(self) -> list[Step]:
        """Remove the ladder (tests, and operators retiring a prefix); pending delayed messages go with it."""
        p = self.prefix
        steps = []
        for level in range(DELAY_LEVELS):
            steps += [
                Step("queue_delete", {"queue": delay_queue(p, level)}),
                Step("exchange_delete", {"exchange": delay_exchange(p, level)}),
                Step("exchange_delete", {"exchange": next_exchange(p, level)}),
            ]
        markers = [Step("exchange_delete", {"exchange": ladder_marker(p, kind)}) for kind in ("quorum", "classic")]
        return [
            *markers,  # first: a ladder half deleted must not look declared
            *steps,
            Step("exchange_delete", {"exchange": delivery_exchange(p)}),
            Step("queue_delete", {"queue": unroutable_queue(p)}),
            Step("exchange_delete", {"exchange": unroutable_queue(p)}),
            Step("queue_delete", {"queue": watchdog_queue(p)}),
        ]

    def declare(self, channel: BlockingChannel, version: ServerVersion | None = None) -> None:
        """:meth:`declare_steps` on a blocking channel (tests and tools), by default with the arguments
        for the version of the node it is connected to, as a worker would declare them."""
        run_steps(channel, self.declare_steps(server_version(channel) if version is None else version))

    def bind_destination(self, channel: BlockingChannel, queue_name: str) -> None:
        """:meth:`bind_destination_step` on a blocking channel."""
        run_steps(channel, [self.bind_destination_step(queue_name)])

    def delete(self, channel: BlockingChannel) -> None:
        """:meth:`delete_steps` on a blocking channel."""
        run_steps(channel, self.delete_steps())


def server_version(channel: BlockingChannel) -> ServerVersion:
    """The RabbitMQ version a blocking channel's connection reported in its handshake."""
    impl: Any = getattr(channel.connection, "_impl", None)  # pika keeps the handshake's properties there
    return parse_version((getattr(impl, "server_properties", None) or {}).get("version"))


def run_steps(channel: BlockingChannel, steps: list[Step]) -> list[Any]:
    """Declaration steps on a blocking channel (operators' commands and tests)."""
    return [getattr(channel, step.method)(**step.kwargs) for step in steps]
