"""A worker's consumer: Dramatiq's, screening every delivery for poison before a thread sees it.

It keeps each delivery's body and headers with the message, so a dead letter is the body byte for
byte. Poison (see :mod:`jobflow.poison`) is handed to the broker's publisher and the consumer goes
on at once: its dead letter is confirmed on the publisher's thread, and only then is the delivery
acked (or, if that publish failed, rejected so that RabbitMQ dead-letters it by itself), back on
the consumer's thread. The consumer never waits for a publish, so it keeps answering heartbeats
and RabbitMQ never drops it (and redelivers its prefetched jobs) while poison is being filed.
"""

from __future__ import annotations

from concurrent.futures import Future
from functools import partial
from typing import Any

import pika.exceptions
import structlog
from dramatiq.common import q_name
from dramatiq.errors import ConnectionClosed
from dramatiq.message import Message

from jobflow.broker._dramatiq import RabbitmqConsumer, RabbitmqMessage, delivery_tag, pending_queues
from jobflow.dead_letter import new_record
from jobflow.log_config import get_logger
from jobflow.metrics import instruments
from jobflow.poison import CONSUMER_HEADROOM_BYTES, Poison, screen
from jobflow.settings import DEFAULT_MAX_PAYLOAD_BYTES

logger: structlog.typing.FilteringBoundLogger = get_logger()

_AMQP_ERRORS = (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError)


class JobflowMessage(RabbitmqMessage):
    """A delivery as the worker sees it, with the body and headers it arrived with."""

    def __init__(
        self, redelivered: bool, tag: int, message: Message[Any], *, body: bytes, headers: dict[str, Any] | None
    ) -> None:
        super().__init__(redelivered, tag, message)  # type: ignore[no-untyped-call]
        self.body = body
        self.headers = headers
        self.withheld = False

    def withhold(self) -> None:
        """Neither ack nor reject this delivery (a stopping worker's): RabbitMQ redelivers it when the
        consumer's connection closes, as it does the prefetched messages Dramatiq leaves at a stop."""
        self.withheld = True


class JobflowConsumer(RabbitmqConsumer):
    """Dramatiq's RabbitMQ consumer, screening each delivery and dead-lettering poison off its thread."""

    def ack(self, message: Any) -> None:
        """As Dramatiq's (handed to the consumer's thread, the one owning the channel), but the ack is
        queued on the connection, not flushed then and there: ``BlockingChannel.basic_ack`` runs the
        I/O loop until its frame is written, which was the largest cost per job in a drain profile.
        The consumer's thread polls the connection all the time, so queued acks go out within one
        poll, several in one write; they precede any later frame, a close included."""
        if getattr(message, "withheld", False):
            return
        tag = delivery_tag(message)
        try:
            self.known_tags.remove(tag)
        except KeyError:
            logger.warning("message.ack_skipped", reason="not a delivery of this consumer's channel", tag=tag)
            return
        try:
            self.connection.add_callback_threadsafe(partial(self._queue_ack, tag))
        except _AMQP_ERRORS as exc:
            raise ConnectionClosed(exc) from None

    def _queue_ack(self, tag: int) -> None:
        # On the consumer's thread. A closed channel raises here, out of the consumer's poll: Dramatiq
        # then restarts the consumer, and RabbitMQ redelivers what was not acked.
        self.channel._impl.basic_ack(delivery_tag=tag)  # type: ignore[attr-defined]

    def nack(self, message: Any) -> None:
        if not getattr(message, "withheld", False):
            super().nack(message)  # type: ignore[no-untyped-call]

    def __next__(self) -> JobflowMessage | None:
        try:
            method, properties, body = next(self.iterator)
            if method is None:
                return None
        except (AssertionError, *_AMQP_ERRORS) as e:
            if getattr(e, "reply_code", None) == 404:  # the queue was deleted: declare it when restarting
                canonical = q_name(self.queue_name)
                pending_queues(self.broker).add(canonical)
                self.broker.publisher.forget(f"queue:{canonical}")
            raise ConnectionClosed(e) from None
        headers = properties.headers if properties is not None else None
        screened = screen(body, queue_name=self.queue_name, actors=self.broker.actors, max_bytes=self._max_bytes())
        if isinstance(screened, Poison):
            self._dead_letter(method.delivery_tag, body, headers, screened)
            return None
        self.known_tags.add(method.delivery_tag)
        return JobflowMessage(method.redelivered, method.delivery_tag, screened, body=body, headers=headers)

    def _max_bytes(self) -> int:
        settings = getattr(self.broker, "settings", None)
        limit = settings.max_payload_bytes if settings is not None else DEFAULT_MAX_PAYLOAD_BYTES
        return int(limit) + CONSUMER_HEADROOM_BYTES

    def _dead_letter(self, tag: int, body: bytes, headers: dict[str, Any] | None, poison: Poison) -> None:
        record = new_record(
            reason=poison.reason,
            source_queue=self.queue_name,
            error_type=poison.error_type,
            error_message=poison.error_message,
            message_id=poison.message_id,
            kind=poison.kind,
            name=poison.name,
            version=poison.version,
            previous_headers=headers,
        )
        log = logger.bind(queue=self.queue_name, reason=poison.reason, size=len(body), message_id=poison.message_id)
        future: Future[None] = self.broker.publish_dead_letter_async(self.queue_name, body, record, headers)
        connection = self.connection

        def settle_on_consumer_thread(done: Future[None]) -> None:
            # Runs on the publisher's thread: hand the ack (or reject) back to the thread owning the channel.
            try:
                connection.add_callback_threadsafe(partial(self._settle, tag, done, log, poison))
            except Exception:
                # The connection is gone: RabbitMQ puts the delivery back, and it is screened again.
                log.warning("poison.settle_skipped", reason="the consumer's connection closed first")

        future.add_done_callback(settle_on_consumer_thread)

    def _settle(self, tag: int, done: Future[None], log: Any, poison: Poison) -> None:
        exc = done.exception()
        try:
            if exc is None:
                self.channel.basic_ack(tag)
                log.error("message.dead_lettered", error=poison.error_message)
            else:
                self.channel.basic_nack(tag, requeue=False)
                log.error(
                    "dead_letter.publish_failed", error_type=type(exc).__name__, error=str(exc), outcome="rejected"
                )
        except _AMQP_ERRORS:
            log.warning("poison.settle_skipped", reason="the consumer's channel closed first")
            return
        # Counted once settled: a delivery put back (its channel closed first) is screened again.
        instruments().poison_refused.labels(q_name(self.queue_name), poison.reason).inc()
