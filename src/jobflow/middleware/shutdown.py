"""A clean stop for ``dramatiq`` worker processes: drain running jobs, start none, then exit.

Why Dramatiq 2.2.1 alone does not stop: its worker process stops on the first SIGTERM and calls
``sys.exit`` on the second. But ``timeout``, ``kill -- -PGID`` and systemd signal the whole process
group, and the master forwards what it gets, so one stop brings each worker process two or three
SIGTERMs within milliseconds. The second one's ``SystemExit`` leaves the main thread before
``Worker.stop`` ever runs: the consumer and worker threads (daemons) go on taking and running jobs
while the interpreter waits, forever, to join the AsyncIO middleware's event-loop thread, which is
not a daemon.

Here, in a ``dramatiq`` worker process:

- the stop signals (SIGTERM, SIGHUP) arriving within :data:`DUPLICATE_SIGNAL_WINDOW` of the first
  are that same stop;
- the first closes the gate: a worker thread that takes a message after that refuses it and leaves
  it unacknowledged (RabbitMQ gives it to another consumer when this one's connection closes), so
  no job starts once the stop began; then Dramatiq's own handler stops the worker, whose running
  jobs finish and are acked;
- a later stop signal, or ``JOBFLOW_SHUTDOWN_TIMEOUT`` seconds after the first, ends the process at
  once; RabbitMQ puts back every delivery it had not acked, the running jobs' included.

:class:`DaemonAsyncIO` runs the event loop on a daemon thread, so no path out of the main thread can
hang on it. ``Worker.stop`` (an in-process worker's too) closes the gate as well.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from types import FrameType
from typing import Any

import dramatiq
import structlog
from dramatiq.asyncio import EventLoopThread, set_event_loop_thread
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AsyncIO, Middleware, SkipMessage

from jobflow.log_config import get_logger
from jobflow.settings import Settings

logger: structlog.typing.FilteringBoundLogger = get_logger()

#: Signals within this many seconds of the first are copies of it (a process-group kill that the
#: master also forwards); one later than that asks for an exit at once.
DUPLICATE_SIGNAL_WINDOW = 1.0

#: Dramatiq's exit status for a worker process it killed.
EXIT_KILLED = 1

SignalHandler = Callable[[int, FrameType | None], Any]


def _stop_signals() -> list[signal.Signals]:
    """The signals on which Dramatiq's worker process stops (SIGINT is the master's)."""
    return [getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGBREAK") if hasattr(signal, name)]


def _withhold(broker: dramatiq.Broker, message: Any) -> bool:
    """Leave ``message`` for another worker without running, acking or rejecting it; False if impossible."""
    withhold = getattr(message, "withhold", None)
    if callable(withhold):  # jobflow's RabbitMQ delivery: it stays unacknowledged until the connection closes
        withhold()
        return True
    if isinstance(broker, StubBroker):  # the in-memory broker: back into its queue; the ack only counts it done
        broker.queues[message.queue_name].put(message.encode())
        return True
    return False


class Shutdown(Middleware):
    """The stop signals and the gate of the module's docstring.

    ``timeout`` (seconds) bounds the drain; by default the broker's ``shutdown_timeout`` setting.
    ``exit_process`` ends the process (``os._exit``, which works from any thread; tests pass another).
    """

    def __init__(self, *, timeout: float | None = None, exit_process: Callable[[int], object] = os._exit) -> None:
        self.timeout = timeout
        self._exit_process = exit_process
        self._closed = False
        self._first: float | None = None
        self._signal: int | None = None
        self._requested = threading.Event()
        self._forced = threading.Event()

    @property
    def closed(self) -> bool:
        """True once the stop began: no job starts any more."""
        return self._closed

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        # Dramatiq's worker process installed its handlers before it imported the broker's module;
        # outside one (no Python handler to chain to) jobflow leaves the signals alone.
        if threading.current_thread() is not threading.main_thread():
            return
        wrapped = False
        for signum in _stop_signals():
            previous = signal.getsignal(signum)
            if callable(previous):
                signal.signal(signum, partial(self._on_signal, previous))
                wrapped = True
        if wrapped:
            threading.Thread(
                target=self._watch, args=(self._timeout_of(broker),), name="jobflow-shutdown", daemon=True
            ).start()

    def _timeout_of(self, broker: dramatiq.Broker) -> float:
        if self.timeout is not None:
            return self.timeout
        settings = getattr(broker, "settings", None)
        return (settings if isinstance(settings, Settings) else Settings()).shutdown_timeout

    def _on_signal(self, previous: SignalHandler, signum: int, frame: FrameType | None) -> None:
        # On the main thread, between two bytecodes: no logging here (structlog's stream lock is not
        # reentrant); the watcher thread logs and exits.
        now = time.monotonic()
        if self._first is None:
            self._first, self._signal, self._closed = now, signum, True
            self._requested.set()
            previous(signum, frame)  # Dramatiq: "Stopping worker process...", then Worker.stop()
        elif now - self._first >= DUPLICATE_SIGNAL_WINDOW:
            self._forced.set()

    def _watch(self, timeout: float) -> None:
        """Wait for the stop; then, on a second signal or after ``timeout``, end the process at once."""
        self._requested.wait()
        name = signal.Signals(self._signal).name if self._signal is not None else "?"
        logger.info("worker.shutdown_started", signal=name, timeout_s=timeout, outcome="running jobs finish")
        forced = self._forced.wait(timeout)
        logger.warning(
            "worker.shutdown_forced",
            reason="second signal" if forced else "shutdown timeout",
            timeout_s=timeout,
            outcome="exit now; RabbitMQ redelivers every message not acknowledged",
        )
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed or broken log pipe: exit regardless
                stream.flush()
        self._exit_process(EXIT_KILLED)  # whatever other threads still run

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        self._closed = self._first is not None  # a broker may run another in-process worker after a stop

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        self._closed = True

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if not self._closed or not _withhold(broker, message):  # a broker it cannot be left with: run it
            return
        logger.info(
            "message.withheld",
            message_id=message.message_id,
            queue=message.queue_name,
            reason="the worker is shutting down",
            outcome="left for redelivery",
        )
        raise SkipMessage("the worker is shutting down: left unacknowledged for redelivery")


class DaemonAsyncIO(AsyncIO):
    """Dramatiq's AsyncIO middleware, on an event-loop thread that cannot keep the process alive.

    Dramatiq's loop thread is not a daemon: any exit from the worker's main thread that skips
    ``after_worker_shutdown`` (its own second-signal ``sys.exit``) waited for it forever.
    ``after_worker_shutdown`` still stops the loop as Dramatiq does.
    """

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        event_loop_thread = EventLoopThread(self.logger)
        event_loop_thread.daemon = True
        event_loop_thread.start(timeout=1.0)
        set_event_loop_thread(event_loop_thread)
