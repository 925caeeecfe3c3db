"""The RabbitMQ side of the failure path: a consumer that screens poison, and dead-letter publishing.

The consumer keeps each delivery's body and headers with the message, so a dead letter is the body
byte for byte. A delivery the screen refuses (see :mod:`jobflow.poison`) never reaches a worker
thread: its dead letter is published, confirmed, from the consumer thread, then it is acked; if
that publish fails it is rejected and RabbitMQ dead-letters it by itself. Either way the consumer
moves on to the next message.
"""

from __future__ import annotations

from typing import Any

import pika
import pika.exceptions
import structlog
from dramatiq.brokers.rabbitmq import RabbitmqBroker, _RabbitmqConsumer, _RabbitmqMessage
from dramatiq.common import q_name
from dramatiq.errors import ConnectionClosed
from dramatiq.message import Message

from jobflow.dead_letter import HEADER, DeadLetter, dead_letter_queue
from jobflow.middleware.failures import new_record
from jobflow.middleware.time_limit import CONSUMER_HEADROOM_BYTES
from jobflow.poison import Poison, screen
from jobflow.settings import DEFAULT_MAX_PAYLOAD_BYTES

logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("jobflow")

#: Attempts at a dead-letter publish, each on a fresh connection after a connection error.
DEAD_LETTER_PUBLISH_ATTEMPTS = 3

_AMQP_ERRORS = (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError)


def publish_dead_letter(
    broker: RabbitmqBroker,
    source_queue: str,
    body: bytes,
    record: DeadLetter,
    headers: dict[str, Any] | None = None,
) -> None:
    """Publish ``body`` to the dead-letter queue of ``source_queue`` and wait for the broker's confirm.

    Raises ``ConnectionClosed`` when no attempt was confirmed. A confirm lost with its connection
    may mean a second copy: dead letters are at least once, like every delivery here.
    """
    canonical = q_name(source_queue)
    properties = pika.BasicProperties(delivery_mode=2, headers={**(headers or {}), HEADER: record.to_header()})
    for attempt in range(1, DEAD_LETTER_PUBLISH_ATTEMPTS + 1):
        try:
            broker.declare_queue(canonical, ensure=True)
            broker.channel.basic_publish(
                exchange="",
                routing_key=dead_letter_queue(canonical),
                body=body,
                properties=properties,
                mandatory=True,
            )
            return
        except _AMQP_ERRORS as exc:
            del broker.connection
            if isinstance(exc, pika.exceptions.UnroutableError):
                broker.queues_pending.add(canonical)  # the .XQ was deleted: declare it again
            if attempt == DEAD_LETTER_PUBLISH_ATTEMPTS:
                raise _closed(exc) from None


def declare_dead_letter_queue(broker: RabbitmqBroker, queue_name: str, arguments: dict[str, Any] | None = None) -> Any:
    """Declare ``<queue>.XQ`` durable and without a TTL: dead letters wait for an operator.

    A ``.XQ`` that plain Dramatiq declared (7-day TTL) cannot be redeclared without one: it is used
    as it is, with a warning, until an operator moves its messages and deletes it.
    """
    name = dead_letter_queue(queue_name)
    try:
        return broker.channel.queue_declare(queue=name, durable=True, arguments=arguments)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:  # PRECONDITION_FAILED: it exists with other arguments
            raise
        del broker.channel
        logger.warning(
            "dead_letter_queue.has_other_arguments",
            queue=name,
            detail=str(exc),
            hint="its messages may expire; move them and delete the queue so jobflow declares it without a TTL",
        )
        return broker.channel.queue_declare(queue=name, passive=True)


def _closed(exc: BaseException) -> ConnectionClosed:
    return ConnectionClosed(exc)


class JobflowMessage(_RabbitmqMessage):
    """A delivery as the worker sees it, with the body and headers it arrived with."""

    def __init__(
        self, redelivered: bool, tag: int, message: Message[Any], *, body: bytes, headers: dict[str, Any] | None
    ) -> None:
        super().__init__(redelivered, tag, message)  # type: ignore[no-untyped-call]
        self.body = body
        self.headers = headers


class JobflowConsumer(_RabbitmqConsumer):
    """Dramatiq's RabbitMQ consumer, screening each delivery and dead-lettering poison itself."""

    def __next__(self) -> JobflowMessage | None:
        try:
            method, properties, body = next(self.iterator)
            if method is None:
                return None
        except (AssertionError, *_AMQP_ERRORS) as e:
            # As Dramatiq does: a deleted queue is declared again when the consumer restarts.
            if getattr(e, "reply_code", None) == 404:
                self.broker.queues_pending.add(q_name(self.queue_name))
            raise _closed(e) from None
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
        log = logger.bind(queue=self.queue_name, reason=poison.reason, size=len(body))
        try:
            publish_dead_letter(self.broker, self.queue_name, body, record, headers)
        except Exception as exc:
            log.error("dead_letter.publish_failed", error_type=type(exc).__name__, error=str(exc), outcome="rejected")
            self._settle(self.channel.basic_nack, tag, requeue=False)
            return
        self._settle(self.channel.basic_ack, tag)
        log.error("message.dead_lettered", error_type=poison.error_type, error=record.error_message)

    def _settle(self, method: Any, tag: int, **kwargs: Any) -> None:
        # Called on the consumer thread, which owns this connection: no need for a threadsafe callback.
        try:
            method(tag, **kwargs)
        except _AMQP_ERRORS as e:
            raise _closed(e) from None
