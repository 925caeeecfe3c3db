"""The failure path: retry a failed message per its type's policy, or dead-letter it with the reason.

Replaces Dramatiq's ``Retries`` middleware, which (2.2.1) swallows a failed retry enqueue and lets
the worker ack the message, losing it (its open PR 545), and whose ``.XQ`` keeps the previous
attempt's traceback or none. Here, when a message fails:

- transient, attempts left: the next attempt is enqueued with ``broker.enqueue(message, delay=ms)``,
  which returns once the broker confirmed it; only then does the worker ack the original;
- otherwise: the original body is published, confirmed, to ``<queue>.XQ`` with a
  :class:`~jobflow.dead_letter.DeadLetter` holding the *final* exception, then acked;
- either publish failing: the message is failed, so the worker rejects it without requeueing and
  RabbitMQ dead-letters it to ``.XQ`` by itself (``x-death``; no record, but nothing is lost).

Brokers that cannot publish a dead letter (Dramatiq's in-memory StubBroker) get the record in the
message's options under ``x-jobflow-dead-letter`` and the message failed: it lands in their
``dead_letters``; :func:`dead_letter_record` reads it back.
"""

from __future__ import annotations

import json
import os
import random
import socket
import traceback
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, runtime_checkable

import dramatiq
import structlog
from dramatiq.common import current_millis, q_name
from dramatiq.middleware import Middleware

from jobflow.dead_letter import HEADER, REPLAY_OPTION, DeadLetter, Reason
from jobflow.errors import InvalidPayloadError, UnknownCommandError, UnknownJobError
from jobflow.middleware.targets import Kind, Target, target_of
from jobflow.retry import Verdict, is_time_limit, requested_delay

logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("jobflow")

#: When the first attempt failed (epoch ms), carried by each retry to its dead letter.
FIRST_FAILURE_OPTION = "jobflow_first_failure_ms"

# A dead letter's record rides in one AMQP header frame (128 KiB by default): keep it well under.
_MAX_MESSAGE_CHARS = 4_000
_MAX_TRACEBACK_CHARS = 32_000
_HEADER_BUDGET_BYTES = 64 * 1024

_HOST = socket.gethostname()


@runtime_checkable
class DeadLetterPublisher(Protocol):
    """A broker that publishes dead letters itself (RabbitMQ), confirmed, raising on failure."""

    def publish_dead_letter(
        self, source_queue: str, body: bytes, record: DeadLetter, headers: dict[str, Any] | None = None
    ) -> None: ...


def clip(text: str, limit: int) -> str:
    """``text`` at most ``limit`` characters: its head and tail, with what was cut said between."""
    if len(text) <= limit:
        return text
    head, tail = limit // 4, limit - limit // 4 - 60
    return f"{text[:head]}\n... {len(text) - head - tail} characters omitted ...\n{text[-tail:]}"


def error_type_name(exc: BaseException) -> str:
    """``ValueError``, or ``package.module.Class`` for anything not built in."""
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def attempt_of(message: Any) -> int:
    """Which attempt this delivery is: 1 + Dramatiq's ``retries`` option."""
    retries = message.options.get("retries", 0)
    return 1 + retries if isinstance(retries, int) and not isinstance(retries, bool) and retries >= 0 else 1


def new_record(
    *,
    reason: Reason,
    source_queue: str,
    error_type: str,
    error_message: str,
    traceback_text: str | None = None,
    attempts: int = 1,
    first_failed_at: datetime | None = None,
    message_id: str | None = None,
    kind: Kind | None = None,
    name: str | None = None,
    version: int | None = None,
    previous_headers: dict[str, Any] | None = None,
    replay: Any = None,
) -> DeadLetter:
    """A dead-letter record made here and now, small enough for one header frame.

    ``replay`` is the message's ``jobflow_replay`` option, set when an operator replayed it.
    """
    now = datetime.now(UTC)
    previous = _previous_record(previous_headers)
    replay_count, replayed_at = _replays(previous, replay)
    fields: dict[str, Any] = {
        "reason": reason,
        "source_queue": q_name(source_queue),
        "message_id": message_id,
        "kind": kind,
        "name": name,
        "version": version,
        "error_type": error_type,
        "attempts": attempts,
        "first_failed_at": first_failed_at or now,
        "last_failed_at": now,
        "host": _HOST,
        "pid": os.getpid(),
        "replay_count": replay_count,
        "last_replayed_at": replayed_at,
    }
    record = DeadLetter(
        **fields,
        error_message=clip(error_message, _MAX_MESSAGE_CHARS),
        traceback=clip(traceback_text, _MAX_TRACEBACK_CHARS) if traceback_text else None,
    )
    if len(record.to_header().encode()) > _HEADER_BUDGET_BYTES:
        record = record.model_copy(
            update={
                "error_message": clip(error_message, 1_000),
                "traceback": clip(traceback_text, 8_000) if traceback_text else None,
            }
        )
    return record


def _replays(previous: DeadLetter | None, replay: Any) -> tuple[int, datetime | None]:
    """The higher replay count of the header's record and the body's replay option."""
    count, at = (previous.replay_count, previous.last_replayed_at) if previous else (0, None)
    if isinstance(replay, dict) and isinstance(replay.get("count"), int) and replay["count"] > count:
        count = replay["count"]
        try:
            at = datetime.fromisoformat(str(replay.get("at")))
        except ValueError:
            at = None
    return count, at


def _previous_record(headers: dict[str, Any] | None) -> DeadLetter | None:
    """The record a replayed dead letter still carries, so replay counts survive another failure."""
    try:
        return DeadLetter.from_headers(headers)
    except (ValueError, TypeError):
        return None


def final_reason(exc: BaseException, verdict: Verdict) -> Reason:
    if isinstance(exc, UnknownJobError):
        return "unknown_job"
    if isinstance(exc, UnknownCommandError):
        return "unknown_command"
    if isinstance(exc, InvalidPayloadError):
        # The envelope parser knows no (name, version); the registered type's validation does.
        return "invalid_payload" if exc.name is not None else "invalid_envelope"
    if verdict == "permanent":
        return "permanent_error"
    return "time_limit" if is_time_limit(exc) else "retries_exhausted"


def dead_letter_record(message: Any) -> DeadLetter | None:
    """The record of a message the in-memory broker dead-lettered (in ``broker.dead_letters``)."""
    raw = message.options.get(HEADER)
    return DeadLetter.model_validate(json.loads(raw)) if isinstance(raw, str) else None


def dead_letter(
    broker: dramatiq.Broker, message: Any, record: DeadLetter, log: structlog.typing.FilteringBoundLogger
) -> None:
    """Publish ``message``'s dead letter; on failure, fail the message so the broker dead-letters it."""
    if not isinstance(broker, DeadLetterPublisher):
        message.options[HEADER] = record.to_header()
        message.fail()
    else:
        body = getattr(message, "body", None)
        try:
            broker.publish_dead_letter(
                record.source_queue,
                body if isinstance(body, bytes) else message.encode(),
                record,
                getattr(message, "headers", None),
            )
        except Exception as exc:
            log.error("dead_letter.publish_failed", error_type=type(exc).__name__, error=str(exc), outcome="rejected")
            message.fail()
            return
    log.error(
        f"{record.kind or 'message'}.dead_lettered",
        reason=record.reason,
        error_type=record.error_type,
        error=record.error_message,
        attempts=record.attempts,
    )


class Failures(Middleware):
    """Retries failed messages per their type's :class:`RetryPolicy`, dead-letters the rest.

    ``rng`` draws the jitter (a seeded one makes backoffs reproducible).
    """

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        if exception is None or message.failed:  # failed by another middleware: the broker rejects it
            return
        try:
            self._handle(broker, message, exception)
        except BaseException:
            # A bug here must not turn into an ack: reject, and RabbitMQ dead-letters the message.
            logger.exception("failures.unexpected_error", message_id=message.message_id)
            message.fail()

    def _handle(self, broker: dramatiq.Broker, message: Any, exc: BaseException) -> None:
        target = target_of(broker, message)
        attempt = attempt_of(message)
        policy = target.options.retry
        verdict = policy.verdict(exc)
        # Only a retry carries its first failure; a replayed dead letter starts a new story.
        first = message.options.get(FIRST_FAILURE_OPTION) if attempt > 1 else None
        first_ms = first if isinstance(first, int) and not isinstance(first, bool) else current_millis()
        log = logger.bind(**_log_fields(target, message, attempt))
        if verdict == "transient" and attempt < policy.max_attempts:
            self._retry(broker, message, exc=exc, target=target, attempt=attempt, first_ms=first_ms, log=log)
            return
        record = new_record(
            reason=final_reason(exc, verdict),
            source_queue=message.queue_name,
            error_type=error_type_name(exc),
            error_message=str(exc),
            traceback_text="".join(traceback.format_exception(exc)),
            attempts=attempt,
            first_failed_at=datetime.fromtimestamp(first_ms / 1000, UTC),
            message_id=message.message_id,
            kind=target.kind,
            name=target.name,
            version=target.version,
            previous_headers=getattr(message, "headers", None),
            replay=message.options.get(REPLAY_OPTION),
        )
        dead_letter(broker, message, record, log)

    def _retry(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        exc: BaseException,
        target: Target,
        attempt: int,
        first_ms: int,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        delay = requested_delay(exc)
        if delay is None:
            delay = target.options.retry.delay(attempt, rng=self.rng)
        delay_ms = max(0, int(delay / timedelta(milliseconds=1)))
        retry = message.copy(
            queue_name=q_name(message.queue_name), options={"retries": attempt, FIRST_FAILURE_OPTION: first_ms}
        )
        try:
            broker.enqueue(retry, delay=delay_ms or None)
        except Exception as retry_exc:
            log.error(
                "retry.publish_failed",
                error_type=type(retry_exc).__name__,
                error=str(retry_exc),
                outcome="rejected",
            )
            message.fail()
            return
        log.warning(
            f"{target.kind or 'message'}.retry_scheduled",
            delay_ms=delay_ms,
            next_attempt=attempt + 1,
            error_type=type(exc).__name__,
        )


def _log_fields(target: Target, message: Any, attempt: int) -> dict[str, Any]:
    prefix = target.kind or "message"
    return {
        f"{prefix}_id": message.message_id,
        f"{prefix}_name": target.name,
        f"{prefix}_version": target.version,
        "attempt": attempt,
        "queue": message.queue_name,
    }
