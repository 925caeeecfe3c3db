"""The driver of recurring schedules: one elected worker publishes their occurrences ahead of time.

- **Election**: every worker with schedules consumes ``<prefix>.schedules`` (single active
  consumer) and publishes a tick there every second; RabbitMQ delivers them all to the active
  consumer only, so the worker that receives ticks drives. When it dies, RabbitMQ makes the next
  consumer active: a new driver within about a second.
- **State in RabbitMQ**: ``<prefix>.schedules.state`` (``x-max-length`` 1, drop-head) holds one
  message: per schedule, the last occurrence published. A new driver reads it and resumes there.
- **Steps published on commit**: the driver's consuming channel is transactional. Each step
  publishes the occurrences due within ``schedule_ahead`` (into the delay ladder, so each starts on
  time) and the new state, then commits: RabbitMQ makes none of it visible before the commit (its
  transactions batch, they are not atomic across queues). A driver killed before it commits
  published nothing: its successor publishes the same occurrences, with the same ids. A driver
  that lost its consumer lost its channel too, so it cannot commit after a successor took over.
- **Missed occurrences** (no worker ran when they came due): a schedule's ``missed="once"`` runs
  the latest of them once, now; ``"skip"`` skips them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions
import structlog
from dramatiq.common import current_millis, q_name
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from jobflow.broker.deadline import RpcDeadline
from jobflow.broker.names import schedules_queue, schedules_state_queue, schedules_status_queue
from jobflow.errors import JobflowError
from jobflow.job_ids import occurrence_job_id
from jobflow.log_config import get_logger

if TYPE_CHECKING:
    from jobflow.broker.rabbitmq import JobflowRabbitmqBroker
    from jobflow.recurring import RecurringSchedule
    from jobflow.registry import JobRegistry

logger: structlog.typing.FilteringBoundLogger = get_logger()

STATE_VERSION = 1
#: How many of each schedule's latest occurrence times the state keeps (for ``jobflow schedules list``).
KEEP_PUBLISHED = 16
#: A schedule no longer declared by the driver is forgotten once its last occurrence is this old.
FORGET_AFTER_MS = 30 * 86_400_000
#: The driver writes its state at least this often, so ``schedules list`` shows it alive.
HEARTBEAT_MS = 10_000
#: A state written this recently, by a driver that did not stop cleanly, means it crashed: its
#: successor publishes every occurrence since, late, rather than treat them as missed (a crashed
#: host is noticed only after heartbeats, which can take longer than ``schedule_ahead``).
TAKEOVER_GRACE_MS = 120_000


def queue_arguments(queue_type: str) -> dict[str, Any]:
    arguments: dict[str, Any] = {"x-single-active-consumer": True}
    if queue_type == "quorum":
        arguments["x-queue-type"] = "quorum"
    return arguments


def state_arguments(queue_type: str) -> dict[str, Any]:
    arguments: dict[str, Any] = {"x-max-length": 1, "x-overflow": "drop-head"}
    if queue_type == "quorum":
        arguments["x-queue-type"] = "quorum"
    return arguments


def declare(channel: BlockingChannel, prefix: str, queue_type: str) -> None:
    channel.queue_declare(schedules_queue(prefix), durable=True, arguments=queue_arguments(queue_type))
    for queue in (schedules_state_queue(prefix), schedules_status_queue(prefix)):
        channel.queue_declare(queue, durable=True, arguments=state_arguments(queue_type))


def read_state(channel: BlockingChannel, queue: str, *, empty_retries: int = 0) -> dict[str, Any]:
    """The newest state in ``queue``, read and put back (an empty one where none was written yet).

    Every message is read, not only the head, and an empty queue is read again ``empty_retries``
    times (0.2 s apart) before a new driver concludes there is no state: resuming from nothing
    would republish what the last driver published ahead.
    """
    for attempt in range(empty_retries + 1):
        bodies: list[bytes] = []
        last_tag = 0
        while len(bodies) < 16:
            method, _properties, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                break
            last_tag = method.delivery_tag or 0
            bodies.append(body if isinstance(body, bytes) else b"")
        if last_tag:
            channel.basic_nack(last_tag, multiple=True, requeue=True)
        states = [state for state in map(_decode_state, bodies) if state]
        if states:
            return max(states, key=lambda state: state.get("at_ms") or 0)
        if bodies:
            logger.warning("schedules.state_unreadable", outcome="starting afresh: occurrences from now on")
            return {}
        if attempt < empty_retries:
            time.sleep(0.2)
    return {}


def _decode_state(body: bytes) -> dict[str, Any]:
    try:
        state = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return state if isinstance(state, dict) and state.get("v") == STATE_VERSION else {}


def plan_occurrences(
    schedules: dict[str, RecurringSchedule],
    entries: dict[str, Any],
    now_ms: int,
    ahead_ms: int,
    *,
    driven_at_ms: int | None = None,
) -> list[tuple[RecurringSchedule, int]]:
    """The occurrences to publish now: those due by ``now_ms + ahead_ms`` not published yet.

    ``entries`` is the state's per-schedule record (``last_ms``: the latest occurrence published;
    ``since_ms``: when a driver first saw it; ``describe``: its definition then). A new schedule, or
    one whose definition changed, starts after now. If a driver wrote the state within
    :data:`TAKEOVER_GRACE_MS` (``driven_at_ms``), a takeover is under way and every occurrence
    since is published, late; otherwise occurrences already past came due while no worker ran:
    ``missed="once"`` publishes the latest of them, ``"skip"`` none. A schedule whose occurrences
    cannot be computed is left out (logged), so the others still run.
    """
    taking_over = driven_at_ms is not None and now_ms - driven_at_ms <= TAKEOVER_GRACE_MS
    plan: list[tuple[RecurringSchedule, int]] = []
    for name, schedule in schedules.items():
        found = entries.get(name)
        entry: dict[str, Any] = found if isinstance(found, dict) else {}
        last = entry.get("last_ms")
        base = last if isinstance(last, int) else entry.get("since_ms")
        if entry.get("describe") not in (None, schedule.describe()) or not isinstance(base, int):
            base = None  # new, or redefined: from now on
        try:
            after = now_ms if base is None else base
            due = None if base is None else schedule.next_after(base)
            late_takeover = taking_over and due is not None and due >= now_ms - TAKEOVER_GRACE_MS
            if base is not None and due is not None and due <= now_ms and not late_takeover:  # none drove
                if schedule.missed == "once":
                    latest = schedule.last_at_or_before(now_ms, base)
                    if latest is not None:
                        plan.append((schedule, latest))
                after = now_ms
            plan += [(schedule, at) for at in schedule.occurrences(after, now_ms + ahead_ms, limit=100)]
        except Exception as exc:
            _warn_now_and_then(name, "schedule.plan_failed", error_type=type(exc).__name__, error=str(exc))
    return plan


_warned: dict[str, float] = {}


def _warn_now_and_then(name: str, event: str, **details: Any) -> None:
    """A schedule that keeps failing is logged once a minute, not every step."""
    now = time.monotonic()
    if now - _warned.get(f"{event}:{name}", -3600.0) >= 60:
        _warned[f"{event}:{name}"] = now
        logger.warning(event, schedule=name, outcome="this schedule is skipped; the others run", **details)


def forget_undeclared(schedules: dict[str, RecurringSchedule], entries: dict[str, Any], now_ms: int) -> None:
    """Drop the entries of schedules removed from the code, once their last occurrence is old."""
    for name, entry in list(entries.items()):
        if name not in schedules and (
            not isinstance(entry, dict) or entry.get("last_ms", 0) < now_ms - FORGET_AFTER_MS
        ):
            del entries[name]


class ScheduleDriver:
    """One worker process's candidacy, and once elected its driving, of the registry's schedules."""

    def __init__(
        self,
        broker: JobflowRabbitmqBroker,
        registry: JobRegistry,
        *,
        tick_every_s: float = 1.0,
        step_every_s: float = 0.25,
        rpc_timeout_s: float = 10.0,
    ) -> None:
        from jobflow.schedulers import BrokerJobScheduler  # noqa: PLC0415  (it imports the broker's module)

        self.broker = broker
        self.prefix = broker.settings.queue_prefix
        self.queue_type = broker.settings.delay_queue_type
        self.ahead_ms = round(broker.settings.schedule_ahead * 1000)
        self.schedules: dict[str, RecurringSchedule] = {s.name: s for s in registry.schedules()}
        self.scheduler = BrokerJobScheduler(broker=broker, settings=broker.settings, registry=registry)
        self.tick_every_s = tick_every_s
        self.step_every_s = step_every_s
        self.rpc_timeout_s = rpc_timeout_s
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self.elected = False
        self.published = 0
        self._state: dict[str, Any] | None = None
        #: The last state this driver committed.
        self.written: dict[str, Any] | None = None
        self._written_ms = 0
        self._last_tick = 0.0
        self._ready_queues: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="jobflow-schedule-driver", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._session()
            except Exception as exc:
                if self._stop.is_set():
                    break
                logger.warning(
                    "schedules.driver_disconnected",
                    error_type=type(exc).__name__,
                    error=str(exc),
                    outcome="reconnecting",
                )
                self._stop.wait(1.0)
            finally:
                self._resign("disconnected")

    def _session(self) -> None:
        connection = pika.BlockingConnection(self.broker.parameters)
        deadline = RpcDeadline(connection, self.rpc_timeout_s)
        try:
            with deadline("the schedules' channels and queues"):
                plain = connection.channel()
                declare(plain, self.prefix, self.queue_type)
                driving = connection.channel()
                driving.basic_qos(prefetch_count=10)
                driving.basic_consume(schedules_queue(self.prefix), self._on_tick, auto_ack=True)
                driving.tx_select()
            next_tick = 0.0
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + self.tick_every_s
                    plain.basic_publish(
                        "", schedules_queue(self.prefix), b"tick", pika.BasicProperties(expiration="5000")
                    )
                if self.elected and now - self._last_tick > 3 * self.tick_every_s:
                    self._resign("no tick for 3 s: another worker drives")
                if self.elected:
                    if self._state is None:
                        with deadline("reading the schedules' state"):
                            self._state = self._take_over(plain)
                    with deadline("a step of the schedules"):
                        self._step(connection, driving)
                connection.process_data_events(time_limit=self.step_every_s)  # type: ignore[arg-type]
            if self.elected and self._state:
                with deadline("the schedules' last state"):
                    self._release(driving)
        finally:
            with contextlib.suppress(Exception):
                if connection.is_open:
                    connection.close()

    def _release(self, channel: BlockingChannel) -> None:
        """A clean stop says so in the state: its successor, if none comes at once, knows that no
        driver ran since and applies ``missed`` (after a crash it publishes what came due, late)."""
        assert self._state is not None
        state = {**self._state, "released": True, "at_ms": current_millis()}
        self._write(channel, state)
        channel.tx_commit()

    def _write(self, channel: BlockingChannel, state: dict[str, Any]) -> None:
        body = json.dumps(state, separators=(",", ":")).encode()
        for queue in (schedules_state_queue(self.prefix), schedules_status_queue(self.prefix)):
            properties = pika.BasicProperties(delivery_mode=2, content_type="application/json")
            channel.basic_publish("", queue, body, properties)

    def _take_over(self, plain: BlockingChannel) -> dict[str, Any]:
        state_queue = schedules_state_queue(self.prefix)
        state = read_state(plain, state_queue, empty_retries=3)
        # The state read is back in its queue before this driver writes: a quorum queue's length
        # limit counts a held message, and would drop the first state written behind it.
        while state and not plain.queue_declare(state_queue, durable=True, passive=True).method.message_count:
            time.sleep(0.05)
        entries = state.get("schedules") or {}
        foreign = sorted(name for name in entries if name not in self.schedules)
        logger.info("schedules.driving", driver=self.identity, schedules=sorted(self.schedules))
        if foreign:
            logger.warning(
                "schedules.not_declared_here",
                driver=self.identity,
                schedules=foreign,
                outcome="not driven while this worker drives: every worker should import every schedule's module",
            )
        return state

    def _on_tick(self, _channel: BlockingChannel, _method: Any, _properties: Any, _body: bytes) -> None:
        self._last_tick = time.monotonic()
        if not self.elected:
            self.elected = True
            self._state = None  # read afresh: the last driver may have written it a moment ago

    def _resign(self, reason: str) -> None:
        if self.elected:
            logger.info("schedules.resigned", driver=self.identity, reason=reason)
        self.elected = False
        self._state = None

    def _step(self, connection: BlockingConnection, channel: BlockingChannel) -> None:
        """Publish what is due within ``schedule_ahead`` and the new state, in one transaction."""
        assert self._state is not None
        now = current_millis()
        entries: dict[str, Any] = dict(self._state.get("schedules") or {})
        for name, schedule in self.schedules.items():
            entry = entries.get(name)
            if not isinstance(entry, dict) or entry.get("describe") not in (None, schedule.describe()):
                entries[name] = {"since_ms": now}  # new, or redefined: counted from now
        driven_at = None if self._state.get("released") else self._state.get("at_ms")
        plan = plan_occurrences(
            self.schedules, entries, now, self.ahead_ms, driven_at_ms=driven_at if isinstance(driven_at, int) else None
        )
        forget_undeclared(self.schedules, entries, now)
        if not plan and now - self._written_ms < HEARTBEAT_MS:
            return
        published: list[tuple[RecurringSchedule, int, str, str, Any]] = []
        failed: set[str] = set()
        for schedule, at in plan:
            if schedule.name in failed:
                continue
            try:
                job_id, queue, message = self._build(schedule, at)
            except JobflowError as exc:  # its data too large for the limit, say: that schedule only
                failed.add(schedule.name)
                _warn_now_and_then(
                    schedule.name, "schedule.publish_failed", error_type=type(exc).__name__, error=str(exc)
                )
                continue
            exchange, routing_key = self.broker._route(queue, at)
            channel.basic_publish(exchange, routing_key, message.encode(), pika.BasicProperties(delivery_mode=2))
            published.append((schedule, at, job_id, queue, message))
            entry = dict(entries.get(schedule.name) or {})
            entry["last_ms"] = at
            entry["published_ms"] = [*entry.get("published_ms", []), at][-KEEP_PUBLISHED:]
            entries[schedule.name] = entry
        for name, schedule in self.schedules.items():
            entry = dict(entries.get(name) or {})
            entry.update(describe=schedule.describe(), job=type(schedule.job).job_name, missed=schedule.missed)
            last = entry.get("last_ms")
            with contextlib.suppress(Exception):
                entry["next_ms"] = schedule.next_after(last if isinstance(last, int) else now)
            entries[name] = entry
        state = {"v": STATE_VERSION, "driver": self.identity, "at_ms": now, "schedules": entries}
        self._write(channel, state)
        channel.tx_commit()  # the occurrences and the state become visible here, not before
        self._state = self.written = state
        self._written_ms = now
        self.published += len(published)
        for schedule, at, job_id, queue, message in published:
            logger.info(
                "schedule.occurrence_published",
                schedule=schedule.name,
                job_id=job_id,
                job_name=type(schedule.job).job_name,
                queue=queue,
                due_at=datetime.fromtimestamp(at / 1000, UTC).isoformat(),
            )
            self.broker.emit_after("enqueue", message, None)

    def _build(self, schedule: RecurringSchedule, at: int) -> tuple[str, str, Any]:
        due_at = datetime.fromtimestamp(at / 1000, UTC)
        envelope, message = self.scheduler.occurrence_message(
            schedule.job, due_at, occurrence_job_id(schedule.name, due_at), schedule.queue
        )
        self.broker.emit_before("enqueue", message, None)  # user middleware sees occurrences too
        queue = q_name(message.queue_name)
        if queue not in self._ready_queues:  # the queue and the ladder exist before anything goes there
            publisher = self.broker.publisher
            publisher.wait(publisher.ensure(f"queue:{queue}", "ladder"))
            self._ready_queues.add(queue)
        return envelope.job_id, queue, message
