"""A watchdog of the delay ladder: one elected worker notices when the ladder is behind and re-times
it, sweep after sweep, until nothing is behind.

Why: a level's TTL counts from a message's arrival in it. A broker restart, a lost node or a new
quorum leader holds hops back (RabbitMQ 3.10's quorum dead-lettering also retries a stuck hop only
every ``dead_letter_worker_publisher_confirm_timeout``), and each held-back message then waits its
next level in full: late by up to the outage. Re-timing on one worker's reconnect missed outages
that worker's connection never saw (another node died) and hops forwarded after its one sweep.

- **Election**: every worker consumes ``<prefix>.delay.watchdog``, declared with
  ``x-single-active-consumer`` (a quorum queue on a quorum ladder, so it survives a node). Each
  worker publishes a tick there every ``check_every_s``; RabbitMQ delivers them all to the active
  consumer only, so a worker that receives ticks is the elected one. When it goes away, RabbitMQ
  makes the next consumer active: no coordination of our own.
- **Checks** (the elected worker, every ``check_every_s``, cheap): a canary (a tiny message due
  ``CANARY_MS`` later, routed through the ladder back to the watchdog queue) came back late or not
  at all; the head of a non-empty level should have left already (a passive declare and a peek per
  level); the watchdog reconnected or was just elected (what happened before is unknown).
- **Sweeps** while the ladder is behind, and for ``settle_s`` after the last sign of it: each level,
  lowest first, is read up to what it held when reached; a message that is behind (its level should
  have let it out by now, or its ``x-death`` time says it entered the level too late to leave on
  time) is published again, confirmed, with the delay it has left (straight to its queue when due),
  and only then acknowledged; the others are returned untouched. A re-timed message lands in a
  level already swept or behind the count taken, so each message moves at most once per sweep; a
  message is never released before ``due_ms``; a crash midway can duplicate, never lose.

Every RPC of the watchdog's own connection is bounded by a deadline (``rpc_timeout_s``: the
connection is torn down when it passes); republishing goes through the broker's publisher, bounded
by ``publish_timeout``. The thread is a daemon and stops at the worker's shutdown.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import pika
import pika.exceptions
import structlog
from dramatiq.common import current_millis
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from jobflow.broker.deadline import RpcDeadline
from jobflow.broker.ladder import entry_level, routing_key
from jobflow.broker.names import (
    DELAY_LEVELS,
    delay_exchange,
    delay_queue,
    delivery_exchange,
    unroutable_queue,
    watchdog_queue,
)
from jobflow.broker.queues import QueueType
from jobflow.broker.retimer import (
    Outgoing,
    Republish,
    _due_ms,
    behind_ms,
    redeliver_unroutable,
    retimed,
)

logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("jobflow")

#: A canary's delay: through levels 0-10, so a stall of any of them shows within about 2 s.
CANARY_MS = 2**11 - 1

#: The most messages taken from one level in one sweep (what the level holds beyond waits for the next).
SWEEP_BATCH = 5000

_TICK = b"tick"
_CANARY_KEY = "jobflow_canary"


def publisher_republish(publisher: Any) -> Republish:
    """A :data:`Republish` through the broker's pipelined, confirmed, deadline-bound publisher."""

    def republish(items: Sequence[Outgoing]) -> list[bool]:
        futures = [
            publisher.publish(
                route=(lambda i=item: (i.exchange, i.routing_key)),
                body=item.body,
                properties=pika.BasicProperties(delivery_mode=2, headers=item.headers, priority=item.priority),
                what="a delayed message being re-timed",
            )
            for item in items
        ]
        publisher.wait_all(futures)
        return [f.done() and not f.cancelled() and f.exception() is None for f in futures]

    return republish


@dataclass
class SweepResult:
    """What one sweep found: messages moved to their right level, delivered because due, left alone."""

    retimed: int = 0
    delivered: int = 0
    left: int = 0
    failed: int = 0

    @property
    def moved(self) -> int:
        return self.retimed + self.delivered


@dataclass
class WatchdogState:
    """What the elected watchdog knows; read by tests and logs."""

    elected: bool = False
    last_tick: float = 0.0
    behind_until: float = 0.0  # sweeping goes on until then (monotonic)
    reasons: list[str] = field(default_factory=list)
    sweeps: int = 0
    moved: int = 0
    canaries: dict[str, int] = field(default_factory=dict)  # id -> due_ms, still out


class LadderWatchdog:
    """The elected worker's watchdog of one prefix's ladder (see the module's docstring)."""

    def __init__(
        self,
        parameters: Sequence[pika.URLParameters],
        prefix: str,
        queue_type: QueueType,
        republish: Republish,
        *,
        check_every_s: float = 2.0,
        sweep_every_s: float = 0.5,
        settle_s: float = 10.0,
        slack_ms: int = 1000,
        rpc_timeout_s: float = 10.0,
    ) -> None:
        self.parameters = list(parameters)
        self.prefix = prefix
        self.queue = watchdog_queue(prefix)
        self.queue_type = queue_type
        self.republish = republish
        self.check_every_s = check_every_s
        self.sweep_every_s = sweep_every_s
        self.settle_s = settle_s
        self.slack_ms = slack_ms
        self.rpc_timeout_s = rpc_timeout_s
        self.state = WatchdogState()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # --- the worker's side ------------------------------------------------------------------

    def start(self) -> None:
        """Start the watchdog thread (a daemon: it never holds a worker's exit) unless it runs."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="jobflow-ladder-watchdog", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the thread to stop and wait a little; it is a daemon, so a stuck call never blocks exit."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def nudge(self, reason: str) -> None:
        """Evidence from elsewhere (a consumer reconnected): if elected, sweep for a while."""
        self._behind(reason)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._session()
            except Exception as exc:
                if self._stop.is_set():
                    break
                logger.warning("ladder.watchdog_disconnected", error_type=type(exc).__name__, error=str(exc))
                self._stop.wait(1.0)
            self.state.elected = False

    def _session(self) -> None:
        connection = pika.BlockingConnection(self.parameters)
        deadline = RpcDeadline(connection, self.rpc_timeout_s)
        try:
            channel = connection.channel()
            with deadline("the watchdog queue's declaration"):
                self._declare(channel)
            channel.basic_qos(prefetch_count=100)
            channel.basic_consume(self.queue, self._on_message)
            sweep_channel = connection.channel()
            next_tick = 0.0
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + self.check_every_s
                    channel.basic_publish("", self.queue, _TICK)
                    if self.state.elected:
                        with deadline("the ladder's check"):
                            sweep_channel = self._check(connection, channel, sweep_channel)
                if self.state.elected and time.monotonic() < self.state.behind_until:
                    sweep_channel = self._sweep(connection, sweep_channel, deadline)
                    connection.process_data_events(time_limit=self.sweep_every_s)  # type: ignore[arg-type]
                else:
                    wait = min(0.5, max(0.0, next_tick - time.monotonic()))
                    connection.process_data_events(time_limit=wait)  # type: ignore[arg-type]  # pika takes a float
                if self.state.elected and time.monotonic() - self.state.last_tick > 3 * self.check_every_s:
                    self.state.elected = False  # another worker got the ticks meanwhile
                    logger.info("ladder.watchdog_resigned", queue=self.queue)
        finally:
            with contextlib.suppress(Exception):
                if connection.is_open:
                    connection.close()

    def _declare(self, channel: BlockingChannel) -> None:
        arguments: dict[str, Any] = {"x-single-active-consumer": True, "x-message-ttl": 60_000}
        if self.queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
        channel.queue_declare(self.queue, durable=True, arguments=arguments)
        # Canaries come back through the ladder's delivery exchange, like any delayed message.
        channel.queue_bind(self.queue, delivery_exchange(self.prefix), "*." * DELAY_LEVELS + self.queue)

    def _on_message(self, channel: BlockingChannel, method: Any, _properties: Any, body: bytes) -> None:
        channel.basic_ack(method.delivery_tag)
        now = time.monotonic()
        if not self.state.elected:
            self.state.elected = True
            logger.info("ladder.watchdog_elected", queue=self.queue)
            self.state.last_tick = now
            self._behind("elected: what happened before is not known")
        self.state.last_tick = now
        if body == _TICK:
            return
        try:
            canary = json.loads(body).get(_CANARY_KEY)
        except (ValueError, AttributeError):
            return
        due = self.state.canaries.pop(str(canary), None) or _due_ms(body)
        if due is not None and current_millis() - due > self.slack_ms:
            self._behind(f"a canary came back {current_millis() - due} ms late")

    def _behind(self, reason: str) -> None:
        until = time.monotonic() + self.settle_s
        if until > self.state.behind_until:
            if time.monotonic() >= self.state.behind_until:
                logger.info("ladder.behind", reason=reason, prefix=self.prefix)
            self.state.behind_until = until
        self.state.reasons = [*self.state.reasons[-19:], reason]

    def _check(
        self, connection: BlockingConnection, channel: BlockingChannel, peek: BlockingChannel
    ) -> BlockingChannel:
        """Canaries back in time, and no level's head overdue; sends the next canary."""
        now = current_millis()
        for ident, due in list(self.state.canaries.items()):
            if now - due > self.slack_ms:
                del self.state.canaries[ident]
                self._behind(f"a canary is {now - due} ms overdue")
        ident = uuid.uuid4().hex
        due = now + CANARY_MS
        body = json.dumps({_CANARY_KEY: ident, "options": {"due_ms": due}}).encode()
        self.state.canaries[ident] = due
        channel.basic_publish(
            delay_exchange(self.prefix, entry_level(CANARY_MS)), routing_key(CANARY_MS, self.queue), body
        )
        for level in range(DELAY_LEVELS):
            queue = delay_queue(self.prefix, level)
            waiting, peek = self._count(connection, peek, queue)
            if not waiting:
                continue
            got: tuple[Any, Any, Any] = peek.basic_get(queue, auto_ack=False)
            method, properties, head = got
            if method is None:
                continue
            late = behind_ms(level, method.routing_key, properties.headers, cast(bytes, head), current_millis())
            peek.basic_nack(method.delivery_tag, requeue=True)  # a peek: the head stays where it was
            if late is not None and late > self.slack_ms:
                self._behind(f"the head of {queue} is {late} ms behind")
        return peek

    def _count(
        self, connection: BlockingConnection, channel: BlockingChannel, queue: str
    ) -> tuple[int, BlockingChannel]:
        try:
            return channel.queue_declare(queue, passive=True).method.message_count or 0, channel
        except pika.exceptions.ChannelClosedByBroker:
            return 0, connection.channel()  # no such level (a ladder being declared): nothing waits there

    def _sweep(
        self, connection: BlockingConnection, channel: BlockingChannel, deadline: RpcDeadline
    ) -> BlockingChannel:
        """One sweep of every level, lowest first; then what waits in ``delay.unroutable``."""
        result = SweepResult()
        for level in range(DELAY_LEVELS):
            if self._stop.is_set():
                break
            queue = delay_queue(self.prefix, level)
            with deadline(f"a passive declare of {queue}"):
                waiting, channel = self._count(connection, channel, queue)
            if waiting:
                with deadline(f"the sweep of {queue}"):
                    self._sweep_level(connection, channel, level, min(waiting, SWEEP_BATCH), result)
        with deadline("a passive declare of delay.unroutable"):
            waiting, channel = self._count(connection, channel, unroutable_queue(self.prefix))
        if waiting:  # delivered to its queue by name: a binding missing after a restart no longer matters
            with deadline("the redelivery of delay.unroutable"):
                unroutable = redeliver_unroutable(self.parameters, self.prefix, connection=connection)
            result.delivered += unroutable.delivered
            result.retimed += unroutable.retimed
        self.state.sweeps += 1
        self.state.moved += result.moved
        if result.moved or result.failed:
            self._behind(f"a sweep moved {result.moved} messages")
            logger.info(
                "ladder.retimed",
                retimed=result.retimed,
                delivered=result.delivered,
                left=result.left,
                failed=result.failed,
                prefix=self.prefix,
            )
        return channel

    def _sweep_level(
        self, connection: BlockingConnection, channel: BlockingChannel, level: int, count: int, result: SweepResult
    ) -> None:
        """Take up to ``count`` messages of one level; re-time those behind, return the others."""
        queue = delay_queue(self.prefix, level)
        taken: list[tuple[Any, Any, bytes]] = []
        channel.basic_qos(prefetch_count=count)

        def take(_ch: BlockingChannel, method: Any, properties: Any, body: bytes) -> None:
            taken.append((method, properties, body))

        tag = channel.basic_consume(queue, take)
        quiet_until = time.monotonic() + 0.5
        while len(taken) < count and time.monotonic() < quiet_until:
            before = len(taken)
            connection.process_data_events(time_limit=0.05)  # type: ignore[arg-type]
            if len(taken) > before:
                quiet_until = time.monotonic() + 0.5
        channel.basic_cancel(tag)  # what arrived beyond the count is returned by the cancel
        extra, taken = taken[count:], taken[:count]
        now = current_millis()
        move: list[tuple[Any, Outgoing]] = []
        keep: list[Any] = [m for m, _p, _b in extra]
        for method, properties, body in taken:
            late = behind_ms(level, method.routing_key, properties.headers, body, now)
            if late is None or late <= 0:
                keep.append(method)
            else:
                move.append(
                    (method, retimed(method.routing_key, body, properties.headers, self.prefix, properties.priority))
                )
        result.left += len(keep)
        confirmed = self.republish([out for _m, out in move]) if move else []
        for (method, out), ok in zip(move, confirmed, strict=True):
            if ok:  # acknowledged only once its re-timed copy is confirmed
                channel.basic_ack(method.delivery_tag)
                if out.exchange:
                    result.retimed += 1
                else:
                    result.delivered += 1
            else:
                keep.append(method)
                result.failed += 1
        for method in keep:
            channel.basic_nack(method.delivery_tag, requeue=True)
