"""A broker that cannot take a job: ``schedule()`` raises BrokerUnavailableError within its deadline.

The listeners here are real sockets of the test's own (nothing about AMQP is mocked): a port nobody
listens on, a listener that accepts and never speaks, one that answers with something other than
AMQP. The RabbitMQ faults (a stopped app, a killed or frozen node, a blocked connection) are in
``test_node_faults.py``, on a RabbitMQ node the tests start.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest

import jobflow
from jobflow import Settings

TIMEOUT = 1.5
SECRET = "s3cr3t-pw"


REGISTRY = jobflow.JobRegistry()


class Job(jobflow.Job, name="FaultProbe", version=3, registry=REGISTRY):
    def execute(self, ctx: jobflow.JobContext) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Listener:
    """A TCP listener on 127.0.0.1 that accepts and then stays silent, or writes ``reply``."""

    def __init__(self, reply: bytes | None = None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.reply = reply
        self.accepted: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)
            if self.reply is not None:
                conn.sendall(self.reply)

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture(params=["refused port", "silent listener", "not AMQP"])
def dead_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "refused port":
        yield f"amqp://guest:{SECRET}@127.0.0.1:{_free_port()}/"
        return
    listener = Listener(reply=b"HTTP/1.1 400 Bad Request\r\n\r\n" if request.param == "not AMQP" else None)
    try:
        yield f"amqp://guest:{SECRET}@127.0.0.1:{listener.port}/"
    finally:
        listener.close()


def check(exc: jobflow.BrokerUnavailableError, url: str, job_id: str | None, elapsed: float) -> None:
    assert elapsed <= TIMEOUT + 1.0, f"took {elapsed:.2f} s"
    text = str(exc)
    assert SECRET not in text
    assert SECRET not in (exc.broker or "")
    port = url.rsplit(":", 1)[1].rstrip("/")
    assert f"127.0.0.1:{port}" in text
    assert (exc.name, exc.version) == ("FaultProbe", 3)
    if job_id is not None:
        assert exc.job_id == job_id


def test_schedule_fails_within_its_deadline(dead_url: str) -> None:
    """A fresh scheduler's first schedule() ends in BrokerUnavailableError, not a hang or a pika error."""
    with jobflow.BrokerJobScheduler(
        settings=Settings(broker_url=dead_url, publish_timeout=TIMEOUT), registry=REGISTRY
    ) as scheduler:
        start = time.monotonic()
        with pytest.raises(jobflow.BrokerUnavailableError) as info:
            scheduler.schedule_now(Job())
        check(info.value, dead_url, None, time.monotonic() - start)
        assert info.value.job_id
        assert isinstance(info.value, jobflow.JobflowError)


def test_every_call_keeps_the_deadline(dead_url: str) -> None:
    """A second call, a delayed one and the async twin each fail within the deadline too."""
    with jobflow.BrokerJobScheduler(
        settings=Settings(broker_url=dead_url, publish_timeout=TIMEOUT), registry=REGISTRY
    ) as scheduler:
        with pytest.raises(jobflow.BrokerUnavailableError):
            scheduler.schedule_now(Job())
        calls: dict[str, Callable[[], object]] = {
            "again": lambda: scheduler.schedule_now(Job()),
            "delayed": lambda: scheduler.schedule(Job(), delay=timedelta(minutes=5)),
            "async": lambda: asyncio.run(scheduler.schedule_async(Job())),
        }
        for what, call in calls.items():
            start = time.monotonic()
            with pytest.raises(jobflow.BrokerUnavailableError) as info:
                call()
            elapsed = time.monotonic() - start
            assert elapsed <= TIMEOUT + 1.0, f"{what}: took {elapsed:.2f} s"
            assert SECRET not in str(info.value)
