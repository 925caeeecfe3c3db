"""Making realistic dead letters on a real RabbitMQ, as the failure handling and RabbitMQ itself do.

A jobflow dead letter is a job's Dramatiq message published to ``<queue>.XQ`` with a
:class:`~jobflow.dead_letter.DeadLetter` in the ``x-jobflow-dead-letter`` header. A raw one is
what RabbitMQ dead-letters by itself when a consumer rejects a message: the body as it was and an
``x-death`` header.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

import dramatiq
import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from pika.adapters.blocking_connection import BlockingChannel

import jobflow
from jobflow import Job, Settings
from jobflow.broker.names import RUN_JOB_ACTOR, commands_queue, jobs_queue
from jobflow.dead_letter import HEADER, DeadLetter, Reason, dead_letter_queue
from jobflow.envelope import make_envelope

from .conftest import have_rabbitmqctl, rabbitmqctl


def job_message(
    job: Job, queue: str, *, retries: int = 2, options: dict[str, Any] | None = None
) -> dramatiq.Message[Any]:
    """The Dramatiq message a scheduler would have published for ``job``, as last delivered."""
    envelope = make_envelope(job, type(job).registry)
    return dramatiq.Message(
        queue_name=queue,
        actor_name=RUN_JOB_ACTOR,
        args=(envelope.to_wire(),),
        kwargs={},
        options={"retries": retries, "traceback": "Traceback ...\nValueError: previous attempt", **(options or {})},
        message_id=envelope.job_id,
        message_timestamp=int(envelope.scheduled_at.timestamp() * 1000),
    )


def record_for(
    message: dramatiq.Message[Any],
    *,
    error_type: str = "ValueError",
    error_message: str = "boom",
    reason: Reason = "retries_exhausted",
    failed_at: datetime | None = None,
    attempts: int = 3,
    replay_count: int = 0,
) -> DeadLetter:
    """The record the failure handling writes beside a dead-lettered job."""
    envelope = message.args[0]
    failed_at = failed_at or datetime.now(UTC)
    return DeadLetter(
        reason=reason,
        source_queue=message.queue_name,
        message_id=message.message_id,
        kind="job",
        name=envelope["name"],
        version=envelope["version"],
        error_type=error_type,
        error_message=error_message,
        traceback=f'Traceback (most recent call last):\n  File "app.py", line 1\n{error_type}: {error_message}\n',
        attempts=attempts,
        first_failed_at=failed_at - timedelta(minutes=5),
        last_failed_at=failed_at,
        host=socket.gethostname(),
        pid=os.getpid(),
        replay_count=replay_count,
    )


class DeadLetters:
    """Publishes dead letters into the queues of one test's prefix, each confirmed by the broker."""

    def __init__(self, settings: Settings, channel: BlockingChannel) -> None:
        self.settings = settings
        self.channel = channel
        self.jobs = jobs_queue(settings.queue_prefix)
        self.commands = commands_queue(settings.queue_prefix)

    def add(self, job: Job, *, queue: str | None = None, **record: Any) -> str:
        """A jobflow dead letter of ``job``; returns its id (the job id)."""
        message = job_message(job, queue or self.jobs)
        self.publish(message.encode(), record_for(message, **record), queue or self.jobs)
        return message.message_id

    def publish(self, body: bytes, record: DeadLetter | None, queue: str) -> None:
        headers = {HEADER: record.to_header()} if record is not None else {}
        self.channel.basic_publish(
            "",
            dead_letter_queue(queue),
            body,
            pika.BasicProperties(delivery_mode=2, headers=headers),
            mandatory=True,
        )

    def rejected(self, body: bytes, queue: str | None = None) -> None:
        """What RabbitMQ dead-letters when a consumer rejects ``body`` (e.g. Dramatiq's undecodable nack)."""
        queue = queue or self.jobs
        self.channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True)
        method, _, got = self.channel.basic_get(queue, auto_ack=False)
        assert method is not None
        assert method.delivery_tag is not None
        assert _bytes(got) == body
        self.channel.basic_nack(method.delivery_tag, requeue=False)

    def count(self, queue: str) -> int:
        return int(self.channel.queue_declare(queue, passive=True).method.message_count or 0)

    def settled(self, queue: str, expected: int, timeout: float = 5.0) -> int:
        """The count once it is ``expected``, or the last one seen after ``timeout``: a quorum queue
        takes back what a closed connection left unacked asynchronously, so a count right after
        a command may not include them yet."""
        deadline = time.monotonic() + timeout
        while (seen := self.count(queue)) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return seen

    def drain(self, queue: str) -> list[tuple[dict[str, Any], pika.BasicProperties]]:
        """Take every message from ``queue`` (decoded as Dramatiq JSON), leaving it empty."""
        taken: list[tuple[dict[str, Any], pika.BasicProperties]] = []
        while True:
            method, properties, body = self.channel.basic_get(queue, auto_ack=True)
            if method is None or properties is None:
                return taken
            taken.append((dramatiq.Message.decode(_bytes(body)).asdict(), properties))


def _bytes(body: Any) -> bytes:
    # types-pika says str; pika hands bytes.
    assert isinstance(body, bytes)
    return body


@contextmanager
def dead_letters(settings: Settings) -> Iterator[DeadLetters]:
    """Declare the test's work queues as Dramatiq does (dead-lettering into ``.XQ``) and yield a maker."""
    broker = jobflow.create_broker(settings)
    assert isinstance(broker, RabbitmqBroker)
    try:
        for queue in (jobs_queue(settings.queue_prefix), commands_queue(settings.queue_prefix)):
            broker.declare_queue(queue, ensure=True)
    finally:
        broker.close()
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        yield DeadLetters(settings, channel)
    finally:
        connection.close()


def close_cli_connections(url: str) -> int:
    """Close, from the server's side, every connection of the command line in ``url``'s vhost."""
    assert have_rabbitmqctl()
    path = urlsplit(url).path
    vhost = unquote(path[1:]) if len(path) > 1 else "/"
    listing = rabbitmqctl("list_connections", "-p", vhost, "pid", "client_properties").stdout
    pids = [line.split("\t", 1)[0] for line in listing.splitlines() if "jobflow-cli" in line]
    for pid in pids:
        rabbitmqctl("close_connection", pid, "test: connection killed half-way")
    return len(pids)
