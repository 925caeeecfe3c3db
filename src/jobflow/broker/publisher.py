"""Confirmed publishing with a deadline: the one way jobflow's runtime writes to RabbitMQ.

One I/O thread per broker owns a pika ``SelectConnection`` (callbacks only: nothing in it ever
blocks, so every call can keep a deadline). Callers hand it publishes and declarations and wait
on a future. Each publish is persistent, mandatory and confirmed; each call either gets its
confirm or fails with :class:`~jobflow.BrokerUnavailableError` within its timeout, against a
refused port, a stopped or killed node, a frozen broker, a listener that never speaks AMQP, or a
memory or disk alarm. Publishes are pipelined: many confirms may be in flight on one channel.

What the topology needs is declared on demand, once: a publish names the *requirements* it needs
(the ladder, its queue), and a requirement is declared again only when RabbitMQ says it is gone
(an unroutable return, or a 404 that closes the channel), never after a plain connection loss.

When a connection dies with publishes unconfirmed, they are sent again on the next one (possibly
to another node of the cluster): a lost confirm may mean two copies, never none. A connection on
which a confirm is overdue while RabbitMQ is not blocking it is given up for the next node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pika
import pika.exceptions
import structlog
from pika.adapters.select_connection import IOLoop
from pika.adapters.utils import connection_workflow as workflow
from pika.channel import Channel
from pika.spec import Basic

from jobflow.broker.connection import describe_broker, redact_url
from jobflow.broker.queues import UNKNOWN_VERSION, ServerVersion, parse_version
from jobflow.errors import BrokerUnavailableError, ConfigurationError, JobflowError
from jobflow.log_config import get_logger

logger: structlog.typing.FilteringBoundLogger = get_logger()

T = TypeVar("T")

#: How often the I/O thread checks deadlines.
_SWEEP_S = 0.05
#: Pause after every node of the cluster refused a connection, doubling up to the cap.
_BACKOFF_S, _MAX_BACKOFF_S = 0.2, 2.0
#: A publish whose channel closed under it this often fails with the broker's reason.
_MAX_CHANNEL_CLOSES = 3
#: A publish returned unroutable this often, its topology declared again each time, fails.
_MAX_RETURNS = 2
#: What a waiting caller adds to the I/O thread's own deadline before it gives up on the thread.
_GRACE_S = 1.0

_WRONG_STATE = (pika.exceptions.ChannelWrongStateError, pika.exceptions.ConnectionWrongStateError)


@dataclass(frozen=True)
class Step:
    """One AMQP method of a declaration, called as ``channel.<method>(**kwargs, callback=...)``.

    ``ok_codes``: channel-closing replies that still count as done (404 for a delete or a passive
    check of something absent); the step's result is then None.
    """

    method: str
    kwargs: dict[str, Any]
    ok_codes: tuple[int, ...] = ()
    #: When set, one of ``ok_codes`` counts as done only if RabbitMQ's reply text contains it.
    ok_if: str = ""
    #: Logged as a warning when one of ``ok_codes`` is the reply: what it means, what to do.
    note: str | None = None
    #: A passive check: when it succeeds, the rest of its requirement's steps are skipped.
    probe: bool = False

    def describe(self) -> str:
        name = self.kwargs.get("queue") or self.kwargs.get("exchange") or self.kwargs.get("destination") or ""
        return f"{self.method} {name}".strip()


Explain = Callable[[Step, int, str], JobflowError]


@dataclass(frozen=True)
class Requirement:
    """Topology a publish needs: declared once, again only when RabbitMQ says it is gone."""

    key: str
    #: The steps, for the version of RabbitMQ connected to (arguments differ between 3.x and 4.x).
    steps: Callable[[ServerVersion], Sequence[Step]]
    after: tuple[str, ...] = ()
    #: Turns a refusal (406 inequivalent arguments, 403 access refused) into the error to raise.
    explain: Explain | None = None
    #: A passive check that the whole requirement exists (tried once per process, never after
    #: RabbitMQ reported part of it gone): one round trip instead of hundreds for a fresh producer.
    probe: Callable[[], Step] | None = None


@dataclass(eq=False)
class _Publish:
    route: Callable[[], tuple[str, str]]
    body: bytes
    properties: pika.BasicProperties
    requires: tuple[str, ...]
    deadline: float
    timeout: float
    future: Future[None]
    what: str
    ident: dict[str, Any]
    sent_to: tuple[str, str] | None = None
    returned: bool = False
    returns: int = 0
    channel_closes: int = 0


@dataclass(eq=False)
class _Declare:
    items: Sequence[tuple[str | None, Step]]
    keys: list[str]
    deadline: float
    timeout: float
    future: Future[list[Any]]
    results: list[Any] = field(default_factory=list)
    index: int = 0
    channel: Channel | None = None


class Publisher:
    """The I/O thread of one broker: connects to its nodes in turn, publishes, declares."""

    def __init__(self, nodes: Sequence[pika.URLParameters], urls: Sequence[str], *, timeout: float) -> None:
        if not nodes:
            raise ConfigurationError("a publisher needs at least one broker node")
        self.nodes = list(nodes)
        self.urls = list(urls)
        self.timeout = timeout
        self.shown = describe_broker(self.urls)
        self._requirements: dict[str, Requirement] = {}
        self._lock = threading.Lock()
        self._pid = -1
        self._thread: threading.Thread | None = None

    # --- the callers' side -------------------------------------------------------------------

    def require(self, requirement: Requirement) -> None:
        """Make ``requirement`` known; it is declared when a publish or :meth:`ensure` needs it."""
        self._requirements[requirement.key] = requirement

    def publish(
        self,
        *,
        route: Callable[[], tuple[str, str]],
        body: bytes,
        properties: pika.BasicProperties,
        requires: tuple[str, ...] = (),
        timeout: float | None = None,
        what: str = "a message",
        ident: dict[str, Any] | None = None,
    ) -> Future[None]:
        """Publish ``body``; the future is done once RabbitMQ confirmed it, or failed by the deadline.

        ``route`` gives (exchange, routing key) and is called at the moment the message is written
        to the socket, so a remaining delay is counted from then, not from the call.
        """
        self._check_requirements(requires)
        timeout = self.timeout if timeout is None else timeout
        request = _Publish(
            route, body, properties, requires, time.monotonic() + timeout, timeout, Future(), what, ident or {}
        )
        self._submit(lambda io: io.add_publish(request))
        return request.future

    def ensure(self, *keys: str, timeout: float | None = None) -> Future[list[Any]]:
        """Declare the requirements ``keys`` (and what they come after) unless they are declared."""
        self._check_requirements(keys)
        timeout = self.timeout if timeout is None else timeout
        future: Future[list[Any]] = Future()
        self._submit(lambda io: io.add_ensure(keys, time.monotonic() + timeout, timeout, future))
        return future

    def declare(self, steps: Sequence[Step], *, timeout: float | None = None) -> Future[list[Any]]:
        """Run ``steps`` in order on a channel of their own; the future holds each step's reply."""
        timeout = self.timeout if timeout is None else timeout
        request = _Declare([(None, s) for s in steps], [], time.monotonic() + timeout, timeout, Future())
        self._submit(lambda io: io.add_declare(request))
        return request.future

    def forget(self, *keys: str) -> None:
        """Declare ``keys`` again before their next use (a consumer found its queue gone, say)."""
        self._submit(lambda io: io.forget(keys))

    def wait(self, future: Future[T], timeout: float | None = None) -> T:
        """The future's result; its deadline is kept by the I/O thread, this only guards that thread."""
        limit = (self.timeout if timeout is None else timeout) + _GRACE_S
        try:
            return future.result(timeout=limit)
        except FutureTimeout:
            raise BrokerUnavailableError(
                f"no answer from {self.shown} within {limit:.1f} s (jobflow's publisher thread is stuck)",
                broker=redact_url(",".join(self.urls)),
            ) from None

    def wait_all(self, futures: Sequence[Future[Any]]) -> None:
        """Until every future is done; they were submitted together, so one deadline bounds them all."""
        futures_wait(futures, timeout=self.timeout + _GRACE_S)

    async def wait_async(self, future: Future[T]) -> T:
        """:meth:`wait` for a coroutine: the event loop keeps running meanwhile."""
        limit = self.timeout + _GRACE_S
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), limit)
        except TimeoutError:
            raise BrokerUnavailableError(
                f"no answer from {self.shown} within {limit:.1f} s (jobflow's publisher thread is stuck)",
                broker=redact_url(",".join(self.urls)),
            ) from None

    def close(self, timeout: float = 2.0) -> None:
        """Fail what is still waiting, close the connection, stop the thread."""
        with self._lock:
            thread, io = self._thread, getattr(self, "_io", None)
            if thread is None or io is None or self._pid != os.getpid():
                return
            self._thread = None
        io.ioloop.add_callback_threadsafe(io.shutdown)
        thread.join(timeout)

    def _check_requirements(self, keys: Sequence[str]) -> None:
        unknown = [k for k in keys if k not in self._requirements]
        if unknown:
            raise ConfigurationError(f"unknown topology requirement(s) {unknown}: register them with require()")

    def _submit(self, action: Callable[[_IOThread], None]) -> None:
        io = self._io_thread()
        io.ioloop.add_callback_threadsafe(lambda: action(io))

    def _io_thread(self) -> _IOThread:
        with self._lock:
            # After a fork the thread is gone: the child starts its own.
            if self._thread is None or self._pid != os.getpid():
                self._io = _IOThread(self)
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._io.run, name="jobflow-publisher", daemon=True)
                self._thread.start()
            return self._io


class _IOThread:
    """Everything below runs on the I/O thread only: no locks, no blocking calls."""

    def __init__(self, owner: Publisher) -> None:
        self.owner = owner
        self.ioloop = IOLoop()
        self.conn: pika.SelectConnection | None = None
        self.channel: Channel | None = None
        self.ready = False
        self.blocked = False
        self.connecting = False
        self.stopping = False
        self.node = 0
        self.failed_in_round = 0
        self.backoff = _BACKOFF_S
        self.reconnect_at: float | None = None
        self.problem = "not connected yet"
        self.seq = 0
        self.inflight: OrderedDict[int, _Publish] = OrderedDict()
        self.queue: deque[_Publish] = deque()
        self.declares: deque[_Declare] = deque()
        self.declaring: _Declare | None = None
        self.declared: set[str] = set()
        #: Requirements to declare in full, never probed: RabbitMQ said part of them is gone.
        self.full: set[str] = set()
        self.version: ServerVersion = UNKNOWN_VERSION

    def run(self) -> None:
        self.ioloop.call_later(_SWEEP_S, self.sweep)
        try:
            while True:
                try:
                    self.ioloop.start()
                    return
                except Exception as exc:
                    # pika 1.4 raises out of its own callbacks when a connection is closed during
                    # its handshake (an AssertionError in base_connection, after it closed the
                    # socket). That connection is abandoned already: keep serving the others.
                    logger.debug("publisher.pika_callback_failed", error_type=type(exc).__name__, error=str(exc))
                    if self.stopping:
                        return
        finally:
            self.ioloop.close()

    # --- requests ---------------------------------------------------------------------------

    def add_publish(self, request: _Publish) -> None:
        self.queue.append(request)
        self.pump()

    def add_ensure(self, keys: Sequence[str], deadline: float, timeout: float, future: Future[list[Any]]) -> None:
        missing = self.missing(keys)
        if not missing:
            future.set_result([])
            return
        self.declares.append(self.declaration(missing, deadline, timeout, future))
        self.pump()

    def add_declare(self, request: _Declare) -> None:
        self.declares.append(request)
        self.pump()

    def forget(self, keys: Sequence[str]) -> None:
        self.declared.difference_update(keys)
        self.full.update(keys)

    def missing(self, keys: Sequence[str]) -> list[str]:
        """``keys`` not yet declared, with what they come after first."""
        out: list[str] = []

        def visit(key: str) -> None:
            for before in self.owner._requirements[key].after:
                visit(before)
            if key not in self.declared and key not in out:
                out.append(key)

        for key in keys:
            visit(key)
        return out

    def declaration(self, keys: list[str], deadline: float, timeout: float, future: Future[list[Any]]) -> _Declare:
        return _Declare([], keys, deadline, timeout, future)  # its steps are built when it starts

    # --- the connection ---------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.queue or self.declares or self.inflight or self.declaring)

    def pump(self) -> None:
        if self.stopping:
            return
        if self.conn is None or not self.ready:
            if self.has_work():
                self.connect_soon()
            return
        if self.declaring is None and self.declares:
            self.start_declaration(self.declares.popleft())
        if self.channel is None:
            return
        while self.queue:
            request = self.queue[0]
            missing = self.missing(request.requires)
            if missing:
                self.want(missing, request)
                return
            self.queue.popleft()
            self.send(request)

    def connect_soon(self) -> None:
        if self.connecting or self.conn is not None:
            return
        if self.reconnect_at is not None and time.monotonic() < self.reconnect_at:
            return
        self.reconnect_at = None
        self.connecting = True
        params = self.owner.nodes[self.node % len(self.owner.nodes)]
        self.conn = pika.SelectConnection(
            params,
            on_open_callback=self.on_open,
            on_open_error_callback=self.on_open_error,
            on_close_callback=self.on_closed,
            custom_ioloop=self.ioloop,
        )

    def on_open(self, opened: Any) -> None:
        conn = self.conn
        if opened is not conn or conn is None:
            return
        self.connecting = False
        self.failed_in_round = 0
        self.backoff = _BACKOFF_S
        self.version = parse_version((conn.server_properties or {}).get("version"))
        conn.add_on_connection_blocked_callback(self.on_blocked)
        conn.add_on_connection_unblocked_callback(self.on_unblocked)
        conn.channel(on_open_callback=self.on_channel_open)

    def on_channel_open(self, channel: Channel) -> None:
        if self.conn is None or channel.connection is not self.conn:
            return
        channel.add_on_close_callback(self.on_channel_closed)
        channel.add_on_return_callback(self.on_return)
        channel.confirm_delivery(ack_nack_callback=self.on_confirm, callback=lambda _frame: self.on_confirming(channel))

    def on_confirming(self, channel: Channel) -> None:
        if self.conn is None or channel.connection is not self.conn:
            return
        self.channel = channel
        self.seq = 0
        self.ready = True
        self.problem = "not confirmed in time"
        self.pump()

    def on_open_error(self, conn: Any, exc: BaseException | str) -> None:
        if conn is not self.conn:
            return
        self.lost(
            f"cannot connect to {self.node_shown()}: {explain_failure(exc) if isinstance(exc, BaseException) else exc}"
        )
        self.failed_in_round += 1
        self.node += 1
        if self.failed_in_round >= len(self.owner.nodes):
            self.failed_in_round = 0
            self.reconnect_at = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, _MAX_BACKOFF_S)
        if isinstance(exc, pika.exceptions.ProbableAuthenticationError | pika.exceptions.ProbableAccessDeniedError):
            self.fail_everything()  # a login or vhost refusal will not pass by itself: say so now
        self.pump()

    def on_closed(self, conn: Any, exc: BaseException) -> None:
        if conn is not self.conn:
            return
        self.lost(f"lost the connection to {self.node_shown()}: {explain_failure(exc)}")
        self.node += 1  # another node of the cluster may still be up
        self.pump()

    def lost(self, problem: str) -> None:
        """The connection is gone: keep what was unconfirmed for the next one."""
        self.problem = problem
        logger.debug("publisher.connection_lost", problem=problem)
        self.conn, self.channel, self.ready, self.connecting, self.blocked = None, None, False, False, False
        self.requeue_inflight()
        if self.declaring is not None:
            self.declaring.results.clear()
            self.declaring.index, self.declaring.channel = 0, None
            self.declares.appendleft(self.declaring)
            self.declaring = None

    def give_up_connection(self, problem: str) -> None:
        conn = self.conn
        self.lost(problem)
        self.node += 1
        if conn is not None and not (conn.is_closing or conn.is_closed):
            conn.close()  # its callbacks no longer count: conn is no longer self.conn

    def requeue_inflight(self) -> None:
        for request in reversed(list(self.inflight.values())):
            request.sent_to, request.returned = None, False
            self.queue.appendleft(request)
        self.inflight.clear()

    def node_shown(self) -> str:
        return redact_url(self.owner.urls[self.node % len(self.owner.urls)])

    def on_blocked(self, _conn: Any, _frame: Any) -> None:
        self.blocked = True
        self.problem = f"{self.node_shown()} blocks publishing: a memory or disk alarm is in effect"
        logger.warning("broker.blocked", broker=self.node_shown(), reason="memory or disk alarm")

    def on_unblocked(self, _conn: Any, _frame: Any) -> None:
        self.blocked = False
        self.problem = "not confirmed in time"

    # --- publishing -------------------------------------------------------------------------

    def want(self, keys: list[str], request: _Publish) -> None:
        """Declare what a waiting publish needs, unless a declaration of it is already under way."""
        planned = {k for d in [*self.declares, *([self.declaring] if self.declaring else [])] for k in d.keys}
        if set(keys) <= planned:
            return
        future: Future[list[Any]] = Future()
        self.declares.append(self.declaration(keys, request.deadline, request.timeout, future))
        self.pump()

    def send(self, request: _Publish) -> None:
        assert self.channel is not None
        exchange, routing_key = request.route()
        self.seq += 1
        self.inflight[self.seq] = request
        request.sent_to = (exchange, routing_key)
        with contextlib.suppress(*_WRONG_STATE):  # its close callback is on the way and will requeue it
            self.channel.basic_publish(exchange, routing_key, request.body, request.properties, mandatory=True)

    def on_return(self, _channel: Channel, method: Any, _properties: Any, body: bytes) -> None:
        # A return comes before the confirm of the same publish: match the first one it fits.
        for request in self.inflight.values():
            if (
                not request.returned
                and request.sent_to == (method.exchange, method.routing_key)
                and body == request.body
            ):
                request.returned = True
                return

    def on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag, ack = method.delivery_tag, isinstance(method, Basic.Ack)
        tags = [t for t in self.inflight if t <= tag] if method.multiple else [tag]
        for t in tags:
            request = self.inflight.pop(t, None)
            if request is None:
                continue
            if not ack:
                self.fail(request, "RabbitMQ refused it (nack): the queue is full or the broker is short of resources")
            elif request.returned:
                self.unroutable(request)
            elif not request.future.done():
                request.future.set_result(None)
        if self.queue:
            self.pump()

    def unroutable(self, request: _Publish) -> None:
        request.returns += 1
        exchange, key = request.sent_to or ("", "")
        if request.returns > _MAX_RETURNS or not request.requires:
            self.fail(request, f"unroutable: nothing is bound for routing key {key!r} on exchange {exchange!r}")
            return
        # Its queue or the ladder is gone: declare them again, then send it again.
        self.forget(self.missing_all(request.requires))
        request.sent_to, request.returned = None, False
        self.queue.appendleft(request)
        self.pump()

    def missing_all(self, keys: Sequence[str]) -> list[str]:
        saved, self.declared = self.declared, set()
        try:
            return self.missing(keys)
        finally:
            self.declared = saved

    def on_channel_closed(self, channel: Channel, exc: BaseException) -> None:
        if channel is not self.channel:
            return
        self.channel, self.ready = None, False
        code = getattr(exc, "reply_code", 0)
        text = getattr(exc, "reply_text", str(exc))
        self.problem = f"RabbitMQ closed the channel: {code} {text}"
        requests = list(self.inflight.values())
        if code == 404:  # an exchange it was sent to is gone: declare what they need again
            for request in requests:
                self.forget(self.missing_all(request.requires))
        self.requeue_inflight()
        for request in requests:
            request.channel_closes += 1
            if request.channel_closes >= _MAX_CHANNEL_CLOSES:
                self.queue.remove(request)
                self.fail(request, f"RabbitMQ closed the channel each time it was sent: {code} {text}")
        if self.conn is not None and self.conn.is_open:
            self.conn.channel(on_open_callback=self.on_channel_open)

    # --- declaring --------------------------------------------------------------------------

    def start_declaration(self, request: _Declare) -> None:
        if request.keys:
            # Built now, for the version of the node connected to, and only for what is still missing.
            keys = self.missing(request.keys)
            if not keys:
                request.future.set_result([])
                self.pump()
                return
            request.items = []
            for key in keys:
                requirement = self.owner._requirements[key]
                if requirement.probe is not None and key not in self.full:
                    request.items.append((key, requirement.probe()))
                request.items += [(key, step) for step in requirement.steps(self.version)]
        self.declaring = request
        request.results.clear()
        request.index = 0
        self.open_declaration_channel(request)

    def open_declaration_channel(self, request: _Declare) -> None:
        assert self.conn is not None

        def on_open(channel: Channel) -> None:
            if request is not self.declaring:
                channel.close()
                return
            channel.add_on_close_callback(lambda ch, exc: self.on_declaration_channel_closed(request, ch, exc))
            request.channel = channel
            self.run_step(request)

        self.conn.channel(on_open_callback=on_open)

    def run_step(self, request: _Declare) -> None:
        channel = request.channel
        if request is not self.declaring or channel is None:
            return
        if request.index == len(request.items):
            self.declaring, request.channel = None, None
            self.declared.update(request.keys)
            channel.close()
            if not request.future.done():
                request.future.set_result(request.results)
            self.pump()
            return
        _key, step = request.items[request.index]

        def on_ok(frame: Any) -> None:
            if request is self.declaring and request.channel is channel:
                request.results.append(frame)
                request.index += 1
                if step.probe:  # it exists: skip the rest of this requirement's steps
                    while request.index < len(request.items) and request.items[request.index][0] == _key:
                        request.index += 1
                self.run_step(request)

        with contextlib.suppress(*_WRONG_STATE):  # the close callback is on the way
            getattr(channel, step.method)(**step.kwargs, callback=on_ok)

    def on_declaration_channel_closed(self, request: _Declare, channel: Channel, exc: BaseException) -> None:
        if request is not self.declaring or request.channel is not channel:
            return  # closed by us when it was done
        request.channel = None
        key, step = request.items[request.index]
        code = getattr(exc, "reply_code", 0)
        text = getattr(exc, "reply_text", "")
        if code in step.ok_codes and step.ok_if in text and self.conn is not None and self.conn.is_open:
            if step.note:
                logger.warning("topology.kept_as_is", step=step.describe(), detail=text, hint=step.note)
            request.results.append(None)
            request.index += 1
            self.open_declaration_channel(request)
            return
        if isinstance(exc, pika.exceptions.ChannelClosedByBroker):
            self.refused(request, key, step, code, text)
        # Otherwise the connection went with the channel, and lost() puts the declaration back.

    def refused(self, request: _Declare, key: str | None, step: Step, code: int, text: str) -> None:
        """RabbitMQ refused a declaration: it will not change by itself, so fail it and what needs it."""
        self.declaring = None
        requirement = self.owner._requirements.get(key) if key else None
        if requirement is not None and requirement.explain is not None:
            error: JobflowError = requirement.explain(step, code, text)
        else:
            error = ConfigurationError(f"RabbitMQ ({self.owner.shown}) refused {step.describe()}: {code} {text}")
        if not request.future.done():
            request.future.set_exception(error)
        if key is not None:
            for waiting in [r for r in self.queue if key in self.missing(r.requires)]:
                self.queue.remove(waiting)
                if not waiting.future.done():
                    waiting.future.set_exception(error)
        self.pump()

    # --- deadlines --------------------------------------------------------------------------

    def sweep(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        for request in [r for r in self.queue if r.deadline <= now]:
            self.queue.remove(request)
            self.fail(request, self.problem)
        overdue = [t for t, r in self.inflight.items() if r.deadline <= now]
        for tag in overdue:
            self.fail(self.inflight.pop(tag), self.problem)
        for declare in [d for d in self.declares if d.deadline <= now]:
            self.declares.remove(declare)
            self.fail_declare(declare)
        if self.declaring is not None and self.declaring.deadline <= now:
            self.fail_declare(self.declaring)
            self.declaring = None
            if self.conn is not None and not self.blocked:
                self.give_up_connection("a declaration was not answered in time")
        if overdue and self.conn is not None and not self.blocked:
            # A confirm overdue on a connection RabbitMQ does not block: the node is frozen or gone.
            self.give_up_connection(f"{self.node_shown()} did not confirm in time")
        if self.has_work():
            self.pump()
        self.ioloop.call_later(_SWEEP_S, self.sweep)

    def fail(self, request: _Publish, problem: str) -> None:
        if request.future.done():
            return
        request.future.set_exception(
            BrokerUnavailableError(
                f"{request.what} was not confirmed by {self.owner.shown} within {request.timeout:g} s: {problem}",
                broker=redact_url(",".join(self.owner.urls)),
                **request.ident,
            )
        )

    def fail_declare(self, request: _Declare) -> None:
        if request.future.done():
            return
        what = ", ".join(request.keys) or (request.items[0][1].describe() if request.items else "nothing")
        request.future.set_exception(
            BrokerUnavailableError(
                f"declaring {what} on {self.owner.shown} did not finish within {request.timeout:g} s: {self.problem}",
                broker=redact_url(",".join(self.owner.urls)),
            )
        )

    def fail_everything(self) -> None:
        while self.queue:
            self.fail(self.queue.popleft(), self.problem)
        while self.declares:
            self.fail_declare(self.declares.popleft())

    def shutdown(self) -> None:
        self.stopping = True
        self.problem = "the broker was closed"
        self.fail_everything()
        for request in self.inflight.values():
            self.fail(request, self.problem)
        self.inflight.clear()
        conn, self.conn = self.conn, None
        if conn is not None and not (conn.is_closing or conn.is_closed):
            conn.close()
        self.ioloop.call_later(0.2, self.ioloop.stop)


def explain_failure(exc: BaseException) -> str:
    """What a connection failure means, in words an operator can act on."""
    # pika wraps the cause: AMQPConnectionError(AMQPConnectionWorkflowFailed([phase errors])).
    cause = exc.args[0] if isinstance(exc, pika.exceptions.AMQPConnectionError) and exc.args else None
    if isinstance(cause, workflow.AMQPConnectionWorkflowFailed) and cause.exceptions:
        exc = cause.exceptions[-1]
    if isinstance(exc, workflow.AMQPConnectorPhaseErrorBase):
        exc = exc.exception  # the phase's own error says more
    for types, words in _FAILURE_WORDS:
        if isinstance(exc, types):
            return words
    if isinstance(exc, pika.exceptions.ConnectionClosedByBroker):
        return f"the broker closed the connection ({exc.reply_code} {exc.reply_text})"
    return f"{type(exc).__name__}: {exc}"


_FAILURE_WORDS: list[tuple[type[BaseException] | tuple[type[BaseException], ...], str]] = [
    (
        (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError),
        "the broker refused the login: check the user name and password",
    ),
    (
        pika.exceptions.ProbableAccessDeniedError,
        "the broker refused access to the vhost: check that it exists and the user may use it",
    ),
    (
        workflow.AMQPConnectorStackTimeout,
        "no AMQP handshake in time (is the broker frozen, or something else listening on the port?)",
    ),
    (ConnectionRefusedError, "connection refused: is RabbitMQ running there?"),
    (socket.gaierror, "the host name does not resolve"),
    (pika.exceptions.StreamLostError, "the connection was lost"),
    (TimeoutError, "the connection timed out"),
]
