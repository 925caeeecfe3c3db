"""Counting each message's life in jobflow's Prometheus series, and serving them from workers.

Where each count is taken, so that each is exact:

- *scheduled*: every confirmed enqueue of a message that is not the one being processed (a
  retry, or an early message delayed again, is the same message), nor one a worker releases from
  Dramatiq's delay queue;
- *started*, *lateness*, *in progress*: when an attempt starts, after :class:`DueTime` let it (so
  an early message sent back to wait is not counted); lateness is now minus its ``due_ms``;
- *succeeded*, *duration*: when the attempt returns;
- *retried*: when the failed attempt's retry is confirmed (the failure middleware publishes it
  after this middleware's ``after_process_message``, on the same thread);
- *dead-lettered*: when the broker settles the message: a reject (RabbitMQ dead-letters it), or
  an ack of a failed attempt that was not retried (jobflow published its dead letter first).

Poison never reaches a worker thread: the consumer counts it (``jobflow_poison_refused``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any
from wsgiref.simple_server import WSGIServer

import dramatiq
import structlog
from dramatiq.common import current_millis
from dramatiq.middleware import CurrentMessage, Middleware

from jobflow import metrics_server
from jobflow.metrics import Labels, attempts, instruments, labels_of
from jobflow.middleware.due_time import DUE_OPTION
from jobflow.settings import Settings

logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("jobflow")

#: Where a worker's proxy of a message carries its attempt's state, for the ack that may come later.
_RUN_ATTRIBUTE = "_jobflow_metrics_run"


@dataclass
class _Run:
    message_id: str
    labels: Labels
    t0: float
    finished: bool = False
    failed: bool = False
    retried: bool = False


def _settings(broker: dramatiq.Broker) -> Settings:
    settings = getattr(broker, "settings", None)
    return settings if isinstance(settings, Settings) else Settings()


class Metrics(Middleware):
    """Counts messages in the ``jobflow_*`` series; serves ``/metrics`` when ``metrics_port`` is set.

    It must come after :class:`~jobflow.middleware.Failures` and :class:`DueTime` in the broker's
    list (:func:`jobflow.middleware.stack` puts it there).
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        #: Messages a worker holds from a .DQ (the in-memory broker's delays, a plain Dramatiq producer's).
        self._held: set[str] = set()
        self._process_booted = False
        self._directory: Path | None = None
        self._server: WSGIServer | None = None

    # --- serving ------------------------------------------------------------------------------

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        self._process_booted = True
        settings = _settings(broker)
        if settings.metrics_port is None:
            return
        try:
            directory = metrics_server.master_dir(metrics_server.base_dir())
        except OSError as exc:  # metrics never stop a worker from running jobs
            logger.error(
                "metrics.unavailable", error=str(exc), reason="no writable directory for the processes' series"
            )
            return
        metrics_server.enable_multiprocess(directory)
        self._directory = directory
        metrics_server.serve_elected(directory, settings.metrics_host, settings.metrics_port)

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        settings = _settings(broker)
        if self._process_booted or settings.metrics_port is None or self._server is not None:
            return  # a `dramatiq` process serves with its siblings (after_process_boot)
        self._server = metrics_server.serve_here(settings.metrics_host, settings.metrics_port)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._directory is not None:
            metrics_server.mark_dead(self._directory)

    # --- counting -----------------------------------------------------------------------------

    def after_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None) -> None:
        run: _Run | None = getattr(self._local, "run", None)
        if run is not None and run.message_id == message.message_id:
            if run.failed and not run.retried:
                run.retried = True
                instruments().retried.labels(*run.labels).inc()
            return
        current = CurrentMessage.get_current_message()
        if current is not None and current.message_id == message.message_id:
            return  # the message being processed, early, delayed again
        with self._lock:
            if message.message_id in self._held:
                self._held.discard(message.message_id)
                return  # released from Dramatiq's delay queue (.DQ) by the worker: scheduled already
        instruments().scheduled.labels(*labels_of(message)).inc()

    def before_delay_message(self, broker: dramatiq.Broker, message: Any) -> None:
        with self._lock:
            self._held.add(message.message_id)

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        labels = labels_of(message)
        series = attempts(labels)
        series.started.inc()
        series.in_progress.inc()
        due = message.options.get(DUE_OPTION)
        if isinstance(due, int) and not isinstance(due, bool):
            series.lateness.observe(max(0, current_millis() - due) / 1000)
        run = _Run(message.message_id, labels, perf_counter())
        self._local.run = run
        setattr(message, _RUN_ATTRIBUTE, run)

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        run = self._finish(message)
        if run is None:
            return
        series = attempts(run.labels)
        series.duration.observe(perf_counter() - run.t0)
        if exception is None:
            series.succeeded.inc()
        else:
            run.failed = True

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self._finish(message)

    def _finish(self, message: Any) -> _Run | None:
        run: _Run | None = getattr(message, _RUN_ATTRIBUTE, None)
        if run is None or run.finished:
            return None
        run.finished = True
        attempts(run.labels).in_progress.dec()
        return run

    def after_ack(self, broker: dramatiq.Broker, message: Any) -> None:
        run = self._settled(message)
        if run is not None and run.failed and not run.retried:
            instruments().dead_lettered.labels(*run.labels).inc()

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        run = self._settled(message)
        instruments().dead_lettered.labels(*(run.labels if run is not None else labels_of(message))).inc()

    def _settled(self, message: Any) -> _Run | None:
        run: _Run | None = getattr(message, _RUN_ATTRIBUTE, None)
        if getattr(self._local, "run", None) is run:
            self._local.run = None
        return run


__all__ = ["Metrics"]
