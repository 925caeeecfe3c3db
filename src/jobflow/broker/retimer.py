"""Re-timing the delay ladder after a broker outage.

A level's TTL counts from a message's arrival in it. Messages whose level expired while RabbitMQ
was down move on only when it is back, and then wait their remaining levels in full: each would
run late by up to the length of the outage. Every jobflow message carries its due time
(``options.due_ms``), so the ladder can be put right: take each waiting message, publish it again
(confirmed) with the delay it has left (or straight to its queue when it is due), and only then
acknowledge the original. A crash midway leaves a message in the ladder or re-timed, possibly
both (a duplicate), never neither.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import pika
import pika.exceptions
import structlog
from dramatiq.common import current_millis

from jobflow.broker.deadline import RpcDeadline
from jobflow.broker.ladder import MAX_DELAY_MS, entry_level, routing_key
from jobflow.broker.names import DELAY_LEVELS, delay_exchange, delay_queue, delivery_exchange, unroutable_queue
from jobflow.log_config import get_logger
from jobflow.middleware.due_time import DUE_OPTION

logger: structlog.typing.FilteringBoundLogger = get_logger()


@dataclass
class RetimeResult:
    """How many waiting messages were moved to the level their remaining delay needs, delivered
    because they were due, or left where they were (no due time: not a jobflow message)."""

    retimed: int = 0
    delivered: int = 0
    left: int = 0


@dataclass
class RedeliverResult:
    """What ``<prefix>.delay.unroutable`` held: delivered to its queue (or sent back into the ladder
    with the delay it has left), or left there because its queue still does not exist."""

    delivered: int = 0
    retimed: int = 0
    left: int = 0


@dataclass(frozen=True)
class Outgoing:
    """One message to publish again: where, what, and with which headers."""

    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any] | None
    priority: int | None = None


#: Publishes a batch, each confirmed; returns which were confirmed (the others stay in the ladder).
Republish = Callable[[Sequence[Outgoing]], list[bool]]


def _delay_bits(key: str) -> int | None:
    words = key.split(".", DELAY_LEVELS)[:DELAY_LEVELS]
    if len(words) < DELAY_LEVELS or any(w not in ("0", "1") for w in words):
        return None
    return int("".join(words), 2)


def _arrived_ms(headers: dict[str, Any] | None) -> int | None:
    """When the message entered its level, to the second: the time of its latest ``x-death``."""
    deaths = (headers or {}).get("x-death")
    if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], dict):
        return None
    at = deaths[0].get("time")
    return round(at.timestamp() * 1000) if isinstance(at, datetime) else None  # pika decodes it aware, UTC


def behind_ms(level: int, key: str, headers: dict[str, Any] | None, body: bytes, now_ms: int) -> int | None:
    """How late a message waiting in ``level`` will leave it (0 if on time), or None if it is not a
    jobflow delayed message (no due time, no destination): such a message is never moved.

    It should leave at ``due - (its delay's bits below the level)``. It is late if that moment has
    passed, or if it entered the level (its latest ``x-death``, to the second) too late to make it.
    """
    due, bits = _due_ms(body), _delay_bits(key)
    if due is None or bits is None or not _destination(key):
        return None
    should_leave = due - (bits & ((1 << level) - 1))
    late = now_ms - should_leave
    arrived = _arrived_ms(headers)
    if arrived is not None:
        late = max(late, arrived + (1 << level) - should_leave)  # arrival is known to be at or after this
    return max(0, late)


def retimed(key: str, body: bytes, headers: dict[str, Any] | None, prefix: str, priority: int | None) -> Outgoing:
    """The message published again with the delay it has left, from now (straight to its queue if due)."""
    destination = _destination(key)
    kept = {k: v for k, v in (headers or {}).items() if k != "x-death"} or None  # 3.x drops a cycle it sees
    due = _due_ms(body)
    remaining = 0 if due is None else min(due - current_millis(), MAX_DELAY_MS)
    if remaining <= 0:
        return Outgoing("", destination, body, kept, priority)
    return Outgoing(
        delay_exchange(prefix, entry_level(remaining)), routing_key(remaining, destination), body, kept, priority
    )


def _due_ms(body: bytes) -> int | None:
    try:
        due = json.loads(body).get("options", {}).get(DUE_OPTION)
    except (ValueError, AttributeError):
        return None
    return due if isinstance(due, int) and not isinstance(due, bool) else None


def _destination(key: str) -> str:
    # The routing key is DELAY_LEVELS bit words, then the destination queue's name (which may hold dots).
    parts = key.split(".", DELAY_LEVELS)
    return parts[DELAY_LEVELS] if len(parts) > DELAY_LEVELS else ""


#: Seconds an RPC of the re-timer's own connection may wait for its answer before it is torn down.
RPC_TIMEOUT_S = 10.0

#: Seconds after a reconnect at which the ladder is swept. After a restart RabbitMQ forwards what
#: expired during the outage over several seconds (quorum dead-lettering retries a stuck hop every
#: ``dead_letter_worker_publisher_confirm_timeout``), and each such message re-enters the ladder
#: late: a sweep every second for a while catches it within about a second. A sweep moves only
#: what is behind, so the later ones cost a read of each level and little else.
SWEEPS_AFTER_RECONNECT_S = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 15.0)


class LadderRetimer:
    """Re-times the ladder in a background thread each time a worker's consumer comes back after a
    connection error (a broker restart is one): a series of sweeps, at most one series at a time.
    With ``republish`` (the broker's pipelined publisher) a sweep confirms its batch at once."""

    def __init__(
        self,
        parameters: Any,
        prefix: str,
        sweeps_at_s: tuple[float, ...] = SWEEPS_AFTER_RECONNECT_S,
        republish: Republish | None = None,
        rpc_timeout_s: float = RPC_TIMEOUT_S,
    ) -> None:
        self.parameters = parameters
        self.prefix = prefix
        self.sweeps_at_s = sweeps_at_s
        self.republish = republish
        self.rpc_timeout_s = rpc_timeout_s
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._redeliver_only = False

    def trigger(self, *, redeliver_only: bool = False) -> bool:
        """Start a re-timing (or, at a worker's boot, only the redelivery of what waits in
        ``delay.unroutable``) unless one runs now; True if one was started."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return False
            self._redeliver_only = redeliver_only
            self._thread = threading.Thread(target=self._run, name="jobflow-retime", daemon=True)
            self._thread.start()
            return True

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        start = time.monotonic()
        for at in self.sweeps_at_s if not self._redeliver_only else (0.0,):
            time.sleep(max(0.0, start + at - time.monotonic()))
            if not self._redeliver_only:
                try:
                    result = retime_ladder(
                        self.parameters,
                        self.prefix,
                        republish=self.republish,
                        only_behind=True,
                        rpc_timeout_s=self.rpc_timeout_s,
                    )
                except Exception as exc:
                    logger.warning("ladder.retime_failed", error_type=type(exc).__name__, error=str(exc))
                else:
                    if result.retimed or result.delivered:
                        logger.info(
                            "ladder.retimed",
                            retimed=result.retimed,
                            delivered=result.delivered,
                            left=result.left,
                            sweep_at_s=at,
                        )
            self._redeliver(at)

    def _redeliver(self, at: float) -> None:
        try:
            result = redeliver_unroutable(self.parameters, self.prefix, rpc_timeout_s=self.rpc_timeout_s)
        except Exception as exc:
            logger.warning("unroutable.redeliver_failed", error_type=type(exc).__name__, error=str(exc))
            return
        if result.delivered or result.retimed or result.left:
            logger.info(
                "unroutable.redelivered",
                delivered=result.delivered,
                retimed=result.retimed,
                left=result.left,
                sweep_at_s=at,
            )


def retime_ladder(
    parameters: Any,
    prefix: str,
    *,
    republish: Republish | None = None,
    only_behind: bool = False,
    rpc_timeout_s: float = RPC_TIMEOUT_S,
) -> RetimeResult:
    """Re-time every message waiting in ``prefix``'s ladder (see the module's docstring); with
    ``only_behind``, only those that would leave their level late (the others are left, counted).
    ``republish`` confirms each level's batch pipelined; without it each message is confirmed alone.
    Each RPC of its own connection is bounded by ``rpc_timeout_s`` (``AMQPConnectionError`` then)."""
    result = RetimeResult()
    connection = pika.BlockingConnection(parameters)
    deadline = RpcDeadline(connection, rpc_timeout_s)
    try:
        channel = _confirmed_channel(connection, deadline)
        # Upwards: a message re-timed lands in a level at or below its own, one already done.
        for level in range(DELAY_LEVELS):
            queue = delay_queue(prefix, level)
            try:
                with deadline(f"a passive declare of {queue}"):
                    waiting = channel.queue_declare(queue, passive=True).method.message_count or 0
            except pika.exceptions.ChannelClosedByBroker:
                channel = _confirmed_channel(connection, deadline)
                continue
            _retime_level(
                channel, prefix, level, waiting, result, republish=republish, only_behind=only_behind, deadline=deadline
            )
    finally:
        if connection.is_open:
            connection.close()
    return result


def _confirmed_channel(connection: Any, deadline: RpcDeadline) -> Any:
    with deadline("opening a channel"):
        channel = connection.channel()
        channel.confirm_delivery()
    return channel


def _retime_level(
    channel: Any,
    prefix: str,
    level: int,
    waiting: int,
    result: RetimeResult,
    *,
    republish: Republish | None,
    only_behind: bool,
    deadline: RpcDeadline,
) -> None:
    queue = delay_queue(prefix, level)
    # At most what the level held when we reached it, so the walk ends. What is left alone
    # stays unacked until the level is done: requeued at once, it would come back first.
    kept: list[int] = []
    batch: list[tuple[int, Outgoing]] = []
    for _ in range(waiting):
        with deadline(f"a basic.get from {queue}"):
            method, properties, body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            break
        tag, body = cast(int, method.delivery_tag), cast(bytes, body)
        if only_behind:
            late = behind_ms(level, method.routing_key, properties.headers, body, current_millis())
            if late is None or late <= 0:
                kept.append(tag)
                continue
        if republish is not None and _due_ms(body) is not None and _destination(method.routing_key):
            out = retimed(method.routing_key, body, properties.headers, prefix, properties.priority)
            batch.append((tag, out))
        elif republish is not None:
            kept.append(tag)
        else:
            with deadline(f"a confirm of a message re-timed from {queue}"):
                if not _retime_one(channel, prefix, method=method, properties=properties, body=body, result=result):
                    kept.append(tag)
    confirmed = republish([o for _t, o in batch]) if batch and republish is not None else []
    with deadline(f"the acknowledgements of {queue}"):
        _settle(channel, batch, confirmed, kept, result)


def _settle(
    channel: Any, batch: list[tuple[int, Outgoing]], confirmed: list[bool], kept: list[int], result: RetimeResult
) -> None:
    """Acknowledge what was re-timed and confirmed; return the rest (what was kept, or not confirmed)."""
    for (tag, out), ok in zip(batch, confirmed, strict=True):
        if not ok:  # acknowledged only once its re-timed copy is confirmed
            kept.append(tag)
            continue
        channel.basic_ack(tag)
        if out.exchange:
            result.retimed += 1
        else:
            result.delivered += 1
    for tag in kept:
        channel.basic_nack(tag, requeue=True)
    result.left += len(kept)


def _retime_one(channel: Any, prefix: str, *, method: Any, properties: Any, body: bytes, result: RetimeResult) -> bool:
    """Publish one waiting message again with the delay it has left; False if it has no due time."""
    due, destination = _due_ms(body), _destination(method.routing_key)
    if due is None or not destination:
        return False
    remaining = min(due - current_millis(), MAX_DELAY_MS)
    headers = {k: v for k, v in (properties.headers or {}).items() if k != "x-death"}
    props = pika.BasicProperties(delivery_mode=2, headers=headers or None)
    if remaining <= 0:
        channel.basic_publish(delivery_exchange(prefix), routing_key(0, destination), body, props, mandatory=True)
        result.delivered += 1
    else:
        exchange = delay_exchange(prefix, entry_level(remaining))
        channel.basic_publish(exchange, routing_key(remaining, destination), body, props, mandatory=True)
        result.retimed += 1
    channel.basic_ack(method.delivery_tag)
    return True


def redeliver_unroutable(
    parameters: Any, prefix: str, *, connection: Any | None = None, rpc_timeout_s: float = RPC_TIMEOUT_S
) -> RedeliverResult:
    """Deliver what waits in ``<prefix>.delay.unroutable`` to its queue, where that queue exists now.

    A delayed message lands there when the ladder delivers it while its queue (or the queue's
    binding) is missing: after a broker restart, before the bindings are back, or before any worker
    declared a new queue. Published to its queue by name (so a missing binding no longer matters),
    confirmed, then acknowledged; one not yet due goes back into the ladder with the delay it has left.
    ``connection``: an open one to use (the ladder's watchdog, which bounds its calls), else its own,
    the whole redelivery bounded by ``rpc_timeout_s`` (it moves what the queue held when reached).
    """
    if connection is not None:
        return _redeliver_on(connection, prefix)
    connection = pika.BlockingConnection(parameters)
    try:
        with RpcDeadline(connection, rpc_timeout_s)(f"the redelivery of {unroutable_queue(prefix)}"):
            return _redeliver_on(connection, prefix)
    finally:
        if connection.is_open:
            connection.close()


def _redeliver_on(connection: Any, prefix: str) -> RedeliverResult:
    result = RedeliverResult()
    source = unroutable_queue(prefix)
    channel = connection.channel()
    try:
        channel.confirm_delivery()
        try:
            waiting = channel.queue_declare(source, passive=True).method.message_count or 0
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return result  # no ladder yet: nothing can wait in it
            raise
        exists: dict[str, bool] = {}
        kept: list[int] = []
        for _ in range(waiting):
            got: tuple[Any, Any, Any] = channel.basic_get(source, auto_ack=False)
            method, properties, body = got
            if method is None:
                break
            destination = _destination(method.routing_key)
            if destination not in exists:
                exists[destination] = bool(destination) and _queue_exists(connection, destination)
            if not exists[destination]:
                kept.append(cast(int, method.delivery_tag))
                continue
            headers = {k: v for k, v in (properties.headers or {}).items() if k != "x-death"}
            props = pika.BasicProperties(delivery_mode=2, headers=headers or None)
            due = _due_ms(cast(bytes, body))
            remaining = 0 if due is None else min(due - current_millis(), MAX_DELAY_MS)
            if remaining > 0:
                exchange = delay_exchange(prefix, entry_level(remaining))
                channel.basic_publish(exchange, routing_key(remaining, destination), body, props, mandatory=True)
                result.retimed += 1
            else:
                channel.basic_publish("", destination, body, props, mandatory=True)
                result.delivered += 1
            channel.basic_ack(method.delivery_tag)
        for tag in kept:
            channel.basic_nack(tag, requeue=True)
        result.left = len(kept)
    finally:
        if channel.is_open:
            channel.close()
    return result


def _queue_exists(connection: Any, queue: str) -> bool:
    channel = connection.channel()  # a passive declare of a missing queue closes its channel
    try:
        channel.queue_declare(queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return False
        raise
    channel.close()
    return True
