"""What the benchmark scripts share: vhosts, worker processes, RSS, a fast confirmed publisher."""

from __future__ import annotations

import math
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import dramatiq
import pika
import pika.exceptions
import pika.frame
from dramatiq.common import current_millis
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel

from bench_jobs import BenchDelay
from jobflow import default_registry
from jobflow.broker.ladder import entry_level, routing_key
from jobflow.broker.names import RUN_JOB_ACTOR, delay_exchange, jobs_queue
from jobflow.envelope import make_envelope
from jobflow.middleware.due_time import DUE_OPTION

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASE_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")

#: (exchange, routing key, body) of one message to publish.
Item = tuple[str, str, bytes]


def rabbitmqctl(*args: str, timeout: float = 120) -> str:
    result = subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=timeout)
    return result.stdout


@contextmanager
def temporary_vhost(label: str) -> Iterator[tuple[str, str]]:
    """A vhost of this run's own, as ``(name, url)``; deleted afterwards with all it holds, also on failure."""
    vhost = f"{label}-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield vhost, BASE_URL.rstrip("/") + "/" + quote(vhost, safe="")
    finally:
        rabbitmqctl("delete_vhost", vhost)


class QueueCounts(NamedTuple):
    messages: int  # all of them: with quorum queues, also those held back for at-least-once dead-lettering
    ready: int
    unacked: int
    consumers: int


def queue_table(vhost: str) -> dict[str, QueueCounts]:
    """Every queue of the vhost with its counts, as ``rabbitmqctl list_queues`` reports them."""
    columns = ["name", "messages", "messages_ready", "messages_unacknowledged", "consumers"]
    out = rabbitmqctl("list_queues", "-p", vhost, "--no-table-headers", *columns)
    table: dict[str, QueueCounts] = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == len(columns):
            table[parts[0]] = QueueCounts(*(int(p) for p in parts[1:]))
    return table


def consumer_count(url: str, queue: str) -> int:
    """Consumers of ``queue`` (0 when it does not exist yet or the broker does not answer)."""
    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
    except pika.exceptions.AMQPError:
        return 0
    try:
        return connection.channel().queue_declare(queue, passive=True).method.consumer_count or 0
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        with suppress(pika.exceptions.AMQPError):
            connection.close()


def wait_for_consumers(url: str, queues: Iterable[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for queue in queues:
        while consumer_count(url, queue) < 1:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no consumer on {queue} after {timeout} s")
            time.sleep(0.1)


class WorkerProcess:
    """``python -m dramatiq ARGS`` in a session of its own, its output in a log file."""

    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dramatiq", *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(HERE), **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def consumer_pid(self, timeout: float = 30) -> int:
        """The forked worker process (``-p 1``): the one that consumes and holds messages."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            if children:
                return int(children[0])
            time.sleep(0.1)
        raise TimeoutError("the dramatiq main process forked no worker process")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.consumer_pid()}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def settled_rss_mib(self, *, window: int = 6, tolerance_kib: int = 256, timeout: float = 30) -> float:
        """RSS once it stopped moving: ``window`` samples 0.5 s apart within ``tolerance_kib``."""
        samples: list[int] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            samples.append(self.rss_kib())
            recent = samples[-window:]
            if len(recent) == window and max(recent) - min(recent) <= tolerance_kib:
                break
            time.sleep(0.5)
        return statistics.median(samples[-window:]) / 1024

    def kill(self) -> None:
        """SIGKILL to the whole process group: a crash, nothing acknowledged on the way out."""
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        self.kill()


class _ConfirmedPublisher:
    """pika's callback API with up to ``window`` unconfirmed publishes in flight."""

    def __init__(self, url: str, items: Iterator[Item], total: int, window: int, timeout: float) -> None:
        self.items, self.total, self.window, self.timeout = items, total, window, timeout
        self.sent = self.confirmed = self._multiple_upto = 0
        self._acked = bytearray(total + 1)
        self.failures: list[str] = []
        self.channel: Channel | None = None
        self.connection = SelectConnection(
            pika.URLParameters(url),
            on_open_callback=self._on_open,
            on_open_error_callback=lambda _c, exc: self._fail(f"connection failed: {exc!r}"),
            on_close_callback=lambda _c, _exc: self.connection.ioloop.stop(),
        )

    def run(self) -> None:
        self.connection.ioloop.call_later(self.timeout, lambda: self._fail(f"timed out after {self.timeout} s"))
        self.connection.ioloop.start()
        if self.failures:
            raise RuntimeError(f"bulk publish: {self.failures[:3]} ({len(self.failures)} failures)")
        if self.confirmed != self.total:
            raise RuntimeError(f"bulk publish: {self.confirmed} of {self.total} confirmed")

    def _fail(self, reason: str) -> None:
        self.failures.append(reason)
        if self.connection.is_open:
            self.connection.close()
        elif not self.connection.is_closing:
            self.connection.ioloop.stop()

    def _on_open(self, connection: Any) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: Channel) -> None:
        self.channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(lambda _ch, method, _p, _b: self._fail(f"returned: {method.reply_text}"))
        channel.confirm_delivery(self._on_confirm, callback=lambda _frame: self._pump())

    def _on_channel_closed(self, _channel: Channel, exc: Exception) -> None:
        if self.confirmed != self.total:
            self._fail(f"channel closed: {exc!r}")

    def _pump(self) -> None:
        assert self.channel is not None
        props = pika.BasicProperties(delivery_mode=2)
        while self.sent < self.total and self.sent - self.confirmed < self.window:
            exchange, routing_key, body = next(self.items)
            self.channel.basic_publish(exchange, routing_key, body, props, mandatory=True)
            self.sent += 1

    def _on_confirm(self, frame: pika.frame.Method[Any]) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            self.failures.append(f"nack {method.delivery_tag}")
        tag = int(method.delivery_tag)
        tags = range(self._multiple_upto + 1, tag + 1) if method.multiple else (tag,)
        for t in tags:
            if not self._acked[t]:
                self._acked[t] = 1
                self.confirmed += 1
        if method.multiple:
            self._multiple_upto = max(self._multiple_upto, tag)
        if self.confirmed == self.total:
            self.connection.close()
        else:
            self._pump()


def bulk_publish(url: str, items: Iterator[Item], total: int, *, window: int = 1000, timeout: float = 300) -> float:
    """Publish ``total`` persistent, mandatory messages with confirms; returns messages per second."""
    t0 = time.perf_counter()
    _ConfirmedPublisher(url, items, total, window, timeout).run()
    return total / (time.perf_counter() - t0)


def jobflow_items(prefix: str, tag: str, delays: Iterable[int]) -> Iterator[Item]:
    """Byte for byte what ``BrokerJobScheduler.schedule`` publishes through ``JobflowRabbitmqBroker.enqueue``
    (job ``n`` waits ``delays[n]`` ms), each stamped ``due_ms`` just before it is handed to pika.
    """
    queue = jobs_queue(prefix)
    for n, delay_ms in enumerate(delays):
        envelope = make_envelope(BenchDelay(tag=tag, n=n), default_registry, delay=timedelta(milliseconds=delay_ms))
        now = current_millis()
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue,
            actor_name=RUN_JOB_ACTOR,
            args=(envelope.to_wire(),),
            kwargs={},
            options={DUE_OPTION: now + delay_ms},
            message_id=envelope.job_id,
            message_timestamp=now,
        )
        yield delay_exchange(prefix, entry_level(delay_ms)), routing_key(delay_ms, queue), message.encode()


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(p / 100 * len(ordered))))
    return ordered[rank - 1]


def load_average() -> str:
    return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
