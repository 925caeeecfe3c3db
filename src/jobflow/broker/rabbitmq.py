"""jobflow's RabbitMQ broker: Dramatiq's, with every publish confirmed within a deadline and every
delay held by the broker's ladder.

A drop-in for ``dramatiq.brokers.rabbitmq.RabbitmqBroker``: plain actors keep Dramatiq's options
and semantics. Underneath, every enqueue, retry, dead letter and declaration goes through one
:class:`~jobflow.broker.publisher.Publisher` (confirmed, pipelined, with a deadline, across the
nodes of a cluster), and a delayed enqueue (``delay=``, a scheduler's ``run_at``, a retry backoff)
waits in the ladder instead of Dramatiq's ``.DQ`` in worker memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import dramatiq
import pika
from dramatiq.broker import Consumer
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.common import current_millis, dq_name, q_name
from dramatiq.errors import QueueJoinTimeout
from dramatiq.middleware import Middleware

from jobflow.broker import _dramatiq
from jobflow.broker.cancels import CancelReader, stream_steps
from jobflow.broker.connection import (
    CONSUMER_DEFAULTS,
    PUBLISHER_DEFAULTS,
    cluster_parameters,
    redact_url,
    split_urls,
)
from jobflow.broker.consumer import JobflowConsumer
from jobflow.broker.ladder import MAX_DELAY_MS, DelayTopology, entry_level, routing_key
from jobflow.broker.names import (
    KINDS,
    cancel_stream,
    delay_exchange,
    delay_queues,
    schedules_queue,
    schedules_state_queue,
    schedules_status_queue,
    unroutable_queue,
)
from jobflow.broker.publisher import Publisher, Requirement, Step
from jobflow.broker.queues import (
    ServerVersion,
    dead_letter_queue_arguments,
    work_queue_arguments,
)
from jobflow.broker.retimer import LadderRetimer
from jobflow.broker.schedules import ScheduleDriver
from jobflow.broker.watchdog import LadderWatchdog, publisher_republish
from jobflow.cancel import CancelResult, CancelSet, check_job_id, encode_record, hold_until_ms
from jobflow.dead_letter import HEADER, DeadLetter, dead_letter_queue
from jobflow.envelope import envelope_identity
from jobflow.errors import BrokerUnavailableError, ConfigurationError, JobflowError, SchedulingError
from jobflow.middleware import DUE_OPTION, stack
from jobflow.settings import Settings

if TYPE_CHECKING:
    from jobflow.registry import JobRegistry

LADDER = "ladder"
CANCELS = "cancels"


def queue_key(queue: str) -> str:
    return f"queue:{queue}"


@dataclass(frozen=True, eq=False)
class PendingEnqueue:
    """A message handed to the publisher; ``future`` is done once RabbitMQ confirmed it."""

    message: dramatiq.Message[Any]
    delay: int | None
    future: Future[None]


class JobflowRabbitmqBroker(RabbitmqBroker):
    """RabbitMQ with confirms and deadlines always on, several nodes, and broker-held delays.

    ``url`` (or ``settings.broker_url``) may list several nodes, comma-separated, or be a list.
    ``middleware`` is Dramatiq's list; jobflow puts its own in the places of Retries and TimeLimit.
    ``max_priority`` declares classic work queues with ``x-max-priority`` (quorum queues refuse it).
    """

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        *,
        settings: Settings | None = None,
        middleware: list[Middleware] | None = None,
        max_priority: int | None = None,
        confirm_delivery: bool = True,
    ) -> None:
        if url is not None:
            joined = url if isinstance(url, str) else ",".join(url)
            settings = (settings or Settings()).model_copy(update={"broker_url": joined})
        self.settings = settings = settings or Settings()
        self.urls = split_urls(settings.broker_url.replace(";", ","))
        if max_priority is not None and not 0 < max_priority <= 255:
            raise ConfigurationError(f"max_priority must be between 1 and 255, got {max_priority!r}")
        if max_priority and settings.queue_type == "quorum":
            raise ConfigurationError(
                "max_priority needs classic work queues (quorum queues refuse x-max-priority):"
                " set JOBFLOW_QUEUE_TYPE=classic, or drop max_priority"
            )
        super().__init__(confirm_delivery=True, middleware=stack(middleware), max_priority=max_priority)
        #: Consumers connect with Dramatiq's BlockingConnection, trying the nodes in turn.
        self.parameters = cluster_parameters(self.urls, CONSUMER_DEFAULTS)
        self.url = settings.broker_url
        self.topology = DelayTopology(settings.queue_prefix, settings.delay_queue_type)
        self.publisher = Publisher(
            cluster_parameters(self.urls, PUBLISHER_DEFAULTS), self.urls, timeout=settings.publish_timeout
        )
        self.publisher.require(
            Requirement(
                LADDER, self.topology.declare_steps, explain=self._explain_ladder, probe=self.topology.probe_step
            )
        )
        self.retimer = LadderRetimer(
            self.parameters, settings.queue_prefix, republish=publisher_republish(self.publisher)
        )
        #: Started in ``dramatiq`` workers (WorkerBoot): re-times the ladder whenever it is behind.
        self.watchdog = LadderWatchdog(
            self.parameters, settings.queue_prefix, settings.delay_queue_type, publisher_republish(self.publisher)
        )
        self.cancel_stream = cancel_stream(settings.queue_prefix)
        self.publisher.require(
            Requirement(CANCELS, lambda _version: stream_steps(self.cancel_stream), explain=self._explain_stream)
        )
        #: What this process knows to be cancelled; a worker's :class:`CancelReader` fills it.
        self.cancellations = CancelSet()
        self.cancel_reader = CancelReader(self.parameters, self.cancel_stream, self.cancellations)
        #: Started in ``dramatiq`` workers whose registry declares recurring schedules (WorkerBoot).
        self.schedule_driver: ScheduleDriver | None = None
        self._consumed: set[str] = set()
        #: Queues published to (routed ones included) that this process does not consume.
        self._published_to: set[str] = set()

    def __repr__(self) -> str:
        return f"JobflowRabbitmqBroker({self.publisher.shown!r})"

    @property
    def consumer_class(self) -> type[JobflowConsumer]:
        return JobflowConsumer  # screens poison and keeps each delivery's body for its dead letter

    # --- queues -----------------------------------------------------------------------------

    def declare_queue(self, queue_name: str, *, ensure: bool = False) -> None:
        """Declare a queue to consume: a running worker starts consuming it (Dramatiq's rule)."""
        self.require_queue(queue_name)
        super().declare_queue(queue_name, ensure=ensure)

    def require_queue(self, queue_name: str) -> str:
        """Make ``queue_name`` exist before anything is published to it, without consuming it.

        A job in a worker that schedules to a routed queue, or forwards a command to one, must not
        make that worker a consumer of the queue (whose types it may not know): only
        :meth:`declare_queue` does. Returns the canonical name.
        """
        canonical = q_name(queue_name)
        if canonical not in self.queues and canonical not in self._published_to:
            self.publisher.require(
                Requirement(
                    queue_key(canonical),
                    partial(self._queue_steps, canonical),
                    after=(LADDER,),
                    explain=partial(self._explain_queue, canonical),
                )
            )
            self._published_to.add(canonical)
        return canonical

    def _queue_steps(self, queue: str, version: ServerVersion) -> list[Step]:
        queue_type = self.settings.queue_type
        args = work_queue_arguments(queue, queue_type, version, max_priority=self.max_priority)
        return [
            Step("queue_declare", {"queue": queue, "durable": True, "arguments": args}),
            # Dramatiq's .DQ: jobflow never delays through it, but a worker drains what plain
            # Dramatiq producers left there, so an application can switch without stranding any.
            Step("queue_declare", {"queue": dq_name(queue), "durable": True, "arguments": args}),
            Step(
                "queue_declare",
                {
                    "queue": dead_letter_queue(queue),
                    "durable": True,
                    "arguments": dead_letter_queue_arguments(queue_type, version),
                },
                # Plain Dramatiq's .XQ (a 7-day TTL) cannot be declared anew: use it as it is, and say so.
                ok_codes=(406,),
                note="its messages may expire; move them and delete the queue so jobflow declares it without a TTL",
            ),
            Step("queue_declare", {"queue": dead_letter_queue(queue), "passive": True}),
            self.topology.bind_destination_step(queue),
        ]

    def _ensure_queue(self, canonical_queue_name: str) -> None:
        pending = _dramatiq.pending_queues(self)
        if canonical_queue_name in pending:
            self.publisher.wait(self.publisher.ensure(queue_key(canonical_queue_name)))
            pending.discard(canonical_queue_name)

    def _explain_queue(self, queue: str, step: Step, code: int, text: str) -> JobflowError:
        setting = f"JOBFLOW_QUEUE_TYPE={self.settings.queue_type}"
        if code == 406 and "x-queue-type" in text:
            other = "classic" if self.settings.queue_type == "quorum" else "quorum"
            return ConfigurationError(
                f"queue {step.kwargs.get('queue')!r} already exists as a {other} queue, but {setting} asks for"
                f" {self.settings.queue_type}: set JOBFLOW_QUEUE_TYPE={other} to keep it, or migrate: stop its"
                " workers and producers, move its messages to a temporary queue (a shovel does it), delete it,"
                " start one worker so that jobflow declares it anew, and move the messages back"
            )
        if code == 406:
            return ConfigurationError(
                f"queue {step.kwargs.get('queue')!r} exists with other arguments than jobflow declares ({text});"
                f" with {setting}, move its messages and delete it so that jobflow declares it anew"
            )
        return self._refused(step, code, text)

    def _explain_ladder(self, step: Step, code: int, text: str) -> JobflowError:
        if code == 406:
            return ConfigurationError(
                f"the delay ladder of prefix {self.settings.queue_prefix!r} exists with other arguments than"
                f" JOBFLOW_DELAY_QUEUE_TYPE={self.settings.delay_queue_type!r} asks for ({text}); set the type it"
                " was declared with, or move its messages and delete it"
            )
        return self._refused(step, code, text)

    def _refused(self, step: Step, code: int, text: str) -> JobflowError:
        if code == 403:
            return ConfigurationError(
                f"{self.publisher.shown} refused {step.describe()} ({text}): the user needs configure, write and"
                " read permissions on this vhost, or an operator declares the topology (`jobflow topology declare`)"
            )
        return ConfigurationError(f"{self.publisher.shown} refused {step.describe()}: {code} {text}")

    def declare_topology(self, *, redeliver: bool = True) -> None:
        """Declare the ladder and every queue declared so far, now, or raise what stops it; then, in
        the background, deliver what waited in ``delay.unroutable`` for queues that exist now."""
        for queue in sorted(self.queues):
            self.declare_queue(queue, ensure=True)
        # In full, not probed: a worker's boot is where a ladder of another type must be found.
        self.publisher.forget(LADDER)
        self.publisher.wait(self.publisher.ensure(LADDER))
        if redeliver:
            self.retimer.trigger(redeliver_only=True)

    def delete_topology(self) -> None:
        """Delete every queue declared here (with its ``.DQ`` and ``.XQ``) and the ladder, messages and all."""
        queues = sorted(self.queues | self._published_to)
        steps = [
            Step("queue_delete", {"queue": name}, ok_codes=(404,))
            for queue in queues
            for name in (queue, dq_name(queue), dead_letter_queue(queue))
        ]
        prefix = self.settings.queue_prefix
        own = [
            Step("queue_delete", {"queue": name}, ok_codes=(404,))
            for name in (
                self.cancel_stream,
                schedules_queue(prefix),
                schedules_state_queue(prefix),
                schedules_status_queue(prefix),
            )
        ]
        self.publisher.wait(self.publisher.declare([*steps, *own, *self.topology.delete_steps()]))
        self.publisher.forget(LADDER, CANCELS, *(queue_key(q) for q in queues))
        _dramatiq.pending_queues(self).update(self.queues)

    # --- publishing -------------------------------------------------------------------------

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        """Publish ``message``, confirmed; with ``delay`` (ms) it waits in the ladder first."""
        pending = self.enqueue_start(message, delay=delay)
        self.publisher.wait(pending.future)
        return self.enqueue_finish(pending)

    def enqueue_start(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> PendingEnqueue:
        """Hand ``message`` to the publisher without waiting for its confirm (bulk and async callers)."""
        canonical = q_name(message.queue_name)
        if message.queue_name != canonical:
            message = message.copy(queue_name=canonical)  # never Dramatiq's .DQ: the ladder holds delays
        if delay is not None:
            delay = math.ceil(delay)  # never shorter than asked: 0.5 ms waits 1 ms
            if delay > MAX_DELAY_MS:
                raise SchedulingError(f"a delay can be at most {MAX_DELAY_MS} ms (about 8.7 years), got {delay} ms")
            delay = delay if delay > 0 else None
        self.require_queue(canonical)
        self.emit_before("enqueue", message, delay)
        due = message.options.get(DUE_OPTION)
        later = isinstance(due, int) and due > current_millis()
        future = self.publisher.publish(
            route=partial(self._route, canonical, due if isinstance(due, int) else None),
            body=message.encode(),
            properties=pika.BasicProperties(delivery_mode=2, priority=message.options.get("broker_priority")),
            requires=(queue_key(canonical), LADDER) if later else (queue_key(canonical),),
            what=describe_message(message),
            ident=identity(message),
        )
        return PendingEnqueue(message, delay, future)

    def enqueue_finish(self, pending: PendingEnqueue) -> dramatiq.Message[Any]:
        """After the confirm: the middleware's ``after_enqueue``, on the caller's thread."""
        self.emit_after("enqueue", pending.message, pending.delay)
        return pending.message

    def enqueue_many(self, messages: Sequence[dramatiq.Message[Any]]) -> list[dramatiq.Message[Any]]:
        """Publish every message with their confirms pipelined; return once all are confirmed.

        Raises :class:`BrokerUnavailableError` listing the ids of the messages that were not
        confirmed (the others were, and stay published).
        """
        pending: list[PendingEnqueue] = []
        try:
            for message in messages:
                pending.append(self.enqueue_start(message))
        finally:
            # A message refused before it was handed over (a bad delay) still lets the others finish.
            self.publisher.wait_all([p.future for p in pending])
        failed = [p for p in pending if not p.future.done() or p.future.exception() is not None]
        done = [self.enqueue_finish(p) for p in pending if p not in failed]
        if failed:
            first = failed[0].future.exception() if failed[0].future.done() else None
            ids = [p.message.message_id for p in failed]
            raise BrokerUnavailableError(
                f"{len(failed)} of {len(pending)} messages were not confirmed by {self.publisher.shown}"
                f" (the other {len(done)} were): {first or 'no answer in time'}",
                broker=redact_url(",".join(self.urls)),
                job_ids=ids,
            ) from first
        return done

    def _route(self, queue: str, due_ms: int | None) -> tuple[str, str]:
        """Where a message goes, decided as it is written: its remaining delay counts from now."""
        remaining = min(due_ms - current_millis(), MAX_DELAY_MS) if due_ms is not None else 0
        if remaining <= 0:
            return "", queue
        return delay_exchange(self.settings.queue_prefix, entry_level(remaining)), routing_key(remaining, queue)

    def publish_dead_letter(
        self, source_queue: str, body: bytes, record: DeadLetter, headers: dict[str, Any] | None = None
    ) -> None:
        """Publish a dead letter to ``<source_queue>.XQ``, confirmed; raises if it was not."""
        self.publisher.wait(self.publish_dead_letter_async(source_queue, body, record, headers))

    def publish_dead_letter_async(
        self, source_queue: str, body: bytes, record: DeadLetter, headers: dict[str, Any] | None = None
    ) -> Any:
        """The same, without waiting: a future done once RabbitMQ confirmed it (or failed)."""
        canonical = q_name(source_queue)
        self.require_queue(canonical)
        kept = {k: v for k, v in (headers or {}).items() if k != "x-death"}  # 3.x drops a cycle it sees
        xq = dead_letter_queue(canonical)
        return self.publisher.publish(
            route=lambda: ("", xq),
            body=body,
            properties=pika.BasicProperties(delivery_mode=2, headers={**kept, HEADER: record.to_header()}),
            requires=(queue_key(canonical),),
            what=f"the dead letter of {record.kind or 'message'} {record.message_id or '(no id)'}",
            ident={"name": record.name, "version": record.version, "job_id": record.message_id},
        )

    # --- cancelling ------------------------------------------------------------------------

    def cancel_many(self, job_ids: Sequence[str]) -> list[CancelResult]:
        """Record a cancel of each job in the cancel stream, confirmed; every worker then skips them.

        Raises :class:`BrokerUnavailableError` with the ids whose cancel was not confirmed.
        """
        now = current_millis()
        records = [(job_id, hold_until_ms(job_id, now)) for job_id in (check_job_id(j) for j in job_ids)]
        futures = [
            self.publisher.publish(
                route=lambda: ("", self.cancel_stream),
                body=encode_record(job_id, now, until),
                properties=pika.BasicProperties(delivery_mode=2, content_type="application/json"),
                requires=(CANCELS,),
                what=f"the cancel of job {job_id}",
                ident={"job_id": job_id},
            )
            for job_id, until in records
        ]
        self.publisher.wait_all(futures)
        failed = [job_id for (job_id, _), f in zip(records, futures, strict=True) if not _confirmed(f)]
        if failed:
            first = next((f.exception() for f in futures if f.done() and f.exception() is not None), None)
            raise BrokerUnavailableError(
                f"{len(failed)} of {len(records)} cancels were not confirmed by {self.publisher.shown}:"
                f" {first or 'no answer in time'}",
                broker=redact_url(",".join(self.urls)),
                job_ids=failed,
            ) from first
        for job_id, until in records:
            self.cancellations.add(job_id, until, now)  # this process's own worker knows at once
        return [CancelResult(job_id, recorded=True, pending=None, until_ms=until) for job_id, until in records]

    def start_cancel_reader(self, timeout: float | None = None) -> bool:
        """Follow the cancel stream from this process; True once it has read every earlier cancel."""
        self.cancel_reader.start()
        return self.cancel_reader.wait_ready(self.settings.publish_timeout if timeout is None else timeout)

    def stop_cancel_reader(self) -> None:
        self.cancel_reader.stop()

    def _explain_stream(self, step: Step, code: int, text: str) -> JobflowError:
        if code == 406:
            return ConfigurationError(
                f"{self.cancel_stream} exists with other arguments than jobflow's cancel stream"
                f" ({text}): delete it, jobflow declares it anew"
            )
        return self._refused(step, code, text)

    # --- consuming --------------------------------------------------------------------------

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        try:
            consumer = super().consume(queue_name, prefetch, timeout)
        except ConfigurationError as exc:
            on_fatal = getattr(self, "on_fatal", None)  # set in `dramatiq` worker processes: exit, not loop
            if on_fatal is not None:
                on_fatal(exc)
            raise
        # Dramatiq consumes a queue again only after a connection error; RabbitMQ may have been down,
        # and whatever expired in the ladder meanwhile would run late by the outage: the ladder's
        # watchdog (elected in one worker) sweeps it if it runs here, and finds it behind if not.
        if queue_name in self._consumed:
            if self.settings.ladder_watchdog:
                self.watchdog.nudge(f"the consumer of {queue_name} reconnected")
            else:
                self.retimer.trigger()
        self._consumed.add(queue_name)
        return consumer

    # --- tests and tools --------------------------------------------------------------------

    def _counts(self, queues: Sequence[str]) -> list[int]:
        steps = [Step("queue_declare", {"queue": q, "passive": True}, ok_codes=(404,)) for q in queues]
        replies = self.publisher.wait(self.publisher.declare(steps))
        return [int(r.method.message_count or 0) if r is not None else 0 for r in replies]

    def get_queue_message_counts(self, queue_name: str) -> tuple[int, int, int]:
        """Ready messages in the queue, in the ladder (every destination) and in its ``.XQ``."""
        queue = q_name(queue_name)
        counts = self._counts([queue, dead_letter_queue(queue), *self._ladder_queues()])
        return counts[0], sum(counts[2:]), counts[1]

    def _ladder_queues(self) -> list[str]:
        prefix = self.settings.queue_prefix
        return [*delay_queues(prefix), unroutable_queue(prefix)]

    def flush(self, queue_name: str) -> None:
        queue = q_name(queue_name)
        purge = [Step("queue_purge", {"queue": q}, ok_codes=(404,)) for q in (queue, dead_letter_queue(queue))]
        self.publisher.wait(self.publisher.declare(purge))

    def join(
        self, queue_name: str, min_successes: int = 10, idle_time: int = 100, *, timeout: int | None = None
    ) -> None:
        """Wait until ``queue_name`` and the whole ladder are empty ``min_successes`` times in a row.

        Dramatiq's join ignores messages that wait out a delay; here they count, for every queue of
        the prefix (the ladder is shared), so a join also waits for delayed messages of other queues.
        """
        deadline = time.monotonic() + timeout / 1000 if timeout else None
        successes = 0
        while successes < min_successes:
            if deadline is not None and time.monotonic() >= deadline:
                raise QueueJoinTimeout(queue_name)
            ready, delayed, _dead = self.get_queue_message_counts(queue_name)
            successes = successes + 1 if ready + delayed == 0 else 0
            time.sleep(idle_time / 1000)

    def start_watchdog(self) -> None:
        """Watch the ladder from this process (a worker's boot does it; one worker at a time is elected)."""
        if self.settings.ladder_watchdog:
            self.watchdog.start()

    def stop_watchdog(self) -> None:
        self.watchdog.stop()

    def start_schedule_driver(self, registry: JobRegistry) -> None:
        """Stand for driving ``registry``'s recurring schedules (one worker at a time is elected)."""
        if not registry.schedules():
            return
        if self.schedule_driver is None:
            self.schedule_driver = ScheduleDriver(self, registry)
        self.schedule_driver.start()

    def stop_schedule_driver(self) -> None:
        if self.schedule_driver is not None:
            self.schedule_driver.stop()

    def close(self) -> None:
        self.watchdog.stop(timeout=0.5)
        self.stop_schedule_driver()
        self.cancel_reader.stop(timeout=0.5)
        self.publisher.close()
        super().close()


def _confirmed(future: Future[Any]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def identity(message: dramatiq.Message[Any]) -> dict[str, Any]:
    """The job's (or command's) name, version and id, for errors about ``message``."""
    name, version = envelope_identity(message.args)
    return {"name": name, "version": version, "job_id": message.message_id}


def describe_message(message: dramatiq.Message[Any]) -> str:
    """``job 'SendInvoice' v2 (<id>)``, ``command ...``, or a plain actor's message."""
    kind = KINDS.get(message.actor_name)
    name, version = envelope_identity(message.args)
    if kind is not None and name is not None:
        return f"{kind} {name!r} v{version} ({message.message_id})"
    return f"message {message.message_id} for actor {message.actor_name!r}"
