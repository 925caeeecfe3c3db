"""The stream of cancels (``<prefix>.cancels``) and the thread of each worker that reads it.

Why a stream: a cancel must reach every worker, including one started after it, and survive
restarts of workers and of RabbitMQ. A stream keeps its records for every reader, durably and
replicated on a cluster; each worker reads it from the first record it still holds, and then
follows it. Nothing walks pending jobs: a worker checks each message it is about to run against
what it read (:class:`~jobflow.cancel.CancelSet`).

A worker starts running jobs only once its reader has caught up: the reader publishes a marker of
its own and waits for it to come back, so every cancel confirmed before the worker started is
known to it. Afterwards a new cancel reaches a running worker within the stream's delivery
latency (milliseconds; ``benchmarks/cancel.py`` measures it).
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import pika
import pika.exceptions
import structlog
from dramatiq.common import current_millis
from pika.adapters.blocking_connection import BlockingChannel

from jobflow.broker.deadline import RpcDeadline
from jobflow.broker.publisher import Step
from jobflow.cancel import CancelSet, decode_record
from jobflow.log_config import get_logger

logger: structlog.typing.FilteringBoundLogger = get_logger()

#: Records older than the longest delay a job can have (8 years) plus its retries can go.
STREAM_MAX_AGE = "3000D"
#: Small segments, so that retention can drop old records (it drops whole segments).
STREAM_SEGMENT_BYTES = 8_000_000

_MARKER_KEY = "jobflow_marker"


def stream_arguments() -> dict[str, Any]:
    return {
        "x-queue-type": "stream",
        "x-max-age": STREAM_MAX_AGE,
        "x-stream-max-segment-size-bytes": STREAM_SEGMENT_BYTES,
    }


def stream_steps(stream: str) -> list[Step]:
    return [Step("queue_declare", {"queue": stream, "durable": True, "arguments": stream_arguments()})]


class CancelReader:
    """Follows the cancel stream into ``cancels``; one daemon thread per worker process."""

    def __init__(
        self,
        parameters: Sequence[pika.URLParameters],
        stream: str,
        cancels: CancelSet,
        *,
        on_record: Callable[[str, int], None] | None = None,
        rpc_timeout_s: float = 10.0,
    ) -> None:
        self.parameters = list(parameters)
        self.stream = stream
        self.cancels = cancels
        self.on_record = on_record
        self.rpc_timeout_s = rpc_timeout_s
        #: Set once the reader has read every cancel confirmed before it started.
        self.ready = threading.Event()
        self.records = 0
        self._next_offset: int | None = None
        self._marker = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="jobflow-cancel-reader", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_ready(self, timeout: float) -> bool:
        return self.ready.wait(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._session()
            except Exception as exc:
                if self._stop.is_set():
                    break
                logger.warning(
                    "cancel.reader_disconnected",
                    stream=self.stream,
                    error_type=type(exc).__name__,
                    error=str(exc),
                    outcome="reconnecting",
                )
                self._stop.wait(1.0)

    def _session(self) -> None:
        connection = pika.BlockingConnection(self.parameters)
        try:
            channel = connection.channel()
            with RpcDeadline(connection, self.rpc_timeout_s)(f"the declaration of {self.stream}"):
                channel.queue_declare(self.stream, durable=True, arguments=stream_arguments())
            channel.basic_qos(prefetch_count=1000)  # a stream consumer needs a prefetch, and acks
            offset: int | str = "first" if self._next_offset is None else self._next_offset
            channel.basic_consume(self.stream, self._on_message, arguments={"x-stream-offset": offset})
            self._marker = uuid.uuid4().hex
            channel.basic_publish("", self.stream, json.dumps({_MARKER_KEY: self._marker}).encode())
            while not self._stop.is_set():
                connection.process_data_events(time_limit=0.5)  # type: ignore[arg-type]  # pika takes a float
        finally:
            with contextlib.suppress(Exception):
                if connection.is_open:
                    connection.close()

    def _on_message(self, channel: BlockingChannel, method: Any, properties: Any, body: bytes) -> None:
        headers = getattr(properties, "headers", None) or {}
        offset = headers.get("x-stream-offset")
        if isinstance(offset, int):
            self._next_offset = offset + 1
        record = decode_record(body)
        if record is not None:
            job_id, until = record
            self.records += 1
            self.cancels.add(job_id, until)
            if self.on_record is not None:
                self.on_record(job_id, current_millis())
        elif not self.ready.is_set() and _marker_of(body) == self._marker:
            self.ready.set()
            logger.info("cancel.reader_ready", stream=self.stream, remembered=len(self.cancels))
        channel.basic_ack(method.delivery_tag)


def _marker_of(body: bytes) -> str | None:
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    marker = raw.get(_MARKER_KEY) if isinstance(raw, dict) else None
    return marker if isinstance(marker, str) else None
