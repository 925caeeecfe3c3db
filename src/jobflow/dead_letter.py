"""The dead-letter record: why a message could not succeed, kept with the message itself.

A dead letter is the original body, unchanged, published (with confirm) to the dead-letter queue
of its source queue (Dramatiq's ``<queue>.XQ``, declared by jobflow without a TTL: dead letters
never expire unless an operator purges them), carrying a :class:`DeadLetter` as JSON in the
``x-jobflow-dead-letter`` header. Keeping the body as delivered means that even bodies that are not
JSON survive byte for byte; keeping the reason in one versioned header means one parser serves
every kind of failure. Messages RabbitMQ dead-lettered by itself (a nack) have no such header:
their ``x-death`` header is all there is.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import UTC, datetime
from typing import Any, Literal

from dramatiq.common import q_name, xq_name
from pydantic import AwareDatetime, BaseModel, ConfigDict

from jobflow.broker.names import Kind
from jobflow.errors import InvalidPayloadError, UnknownCommandError, UnknownJobError
from jobflow.retry import Verdict, is_time_limit

HEADER = "x-jobflow-dead-letter"

#: Message option where a replay records how often and when (``{"count": n, "at": iso}``); it
#: travels in the body, so it survives retries, delays and another dead-lettering.
REPLAY_OPTION = "jobflow_replay"

#: When the first attempt failed (epoch ms), carried by each retry to its dead letter.
FIRST_FAILURE_OPTION = "jobflow_first_failure_ms"

# A dead letter's record rides in one AMQP header frame (128 KiB by default): keep it well under.
_MAX_MESSAGE_CHARS = 4_000
_MAX_TRACEBACK_CHARS = 32_000
_HEADER_BUDGET_BYTES = 64 * 1024

_HOST = socket.gethostname()

Reason = Literal[
    "retries_exhausted",  # a transient failure on the last allowed attempt
    "permanent_error",  # PermanentError, or an exception the policy says never to retry
    "time_limit",  # the job ran past its time limit on the last allowed attempt
    "undecodable",  # the body is not JSON
    "not_a_message",  # JSON, but not a Dramatiq message
    "invalid_envelope",  # a Dramatiq message whose argument is not a jobflow envelope
    "unknown_job",  # no job type registered under (name, version)
    "unknown_command",  # no command type or handler registered under (name, version)
    "invalid_payload",  # the registered type rejected the data
    "too_large",  # the body is over the size limit
]


def dead_letter_queue(queue_name: str) -> str:
    """The dead-letter queue of a work queue."""
    return xq_name(queue_name)


class DeadLetter(BaseModel):
    """What an operator needs to understand, and replay, one dead-lettered message."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    format: Literal[1] = 1
    reason: Reason
    source_queue: str
    #: Dramatiq's message id (for jobs, the job id); None when the body could not be decoded.
    message_id: str | None = None
    kind: Literal["job", "command"] | None = None
    name: str | None = None
    version: int | None = None
    error_type: str
    error_message: str
    traceback: str | None = None
    attempts: int
    first_failed_at: AwareDatetime
    last_failed_at: AwareDatetime
    host: str
    pid: int
    replay_count: int = 0
    last_replayed_at: datetime | None = None

    def to_header(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_headers(cls, headers: dict[str, Any] | None) -> DeadLetter | None:
        """The record in a delivery's headers, or None for a message RabbitMQ dead-lettered itself."""
        raw = (headers or {}).get(HEADER)
        if raw is None:
            return None
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace")
        return cls.model_validate(json.loads(raw))


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
