"""Reading one dead letter, with or without jobflow's record, into what an operator sees.

A dead letter jobflow wrote carries a :class:`~jobflow.dead_letter.DeadLetter` header; one that
RabbitMQ dead-lettered by itself (a nack: Dramatiq's consumer rejecting an undecodable body, or
stock Dramatiq after its retries) has only ``x-death``. Both are shown with all that is known.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dramatiq
from dramatiq.common import q_name
from dramatiq.errors import DecodeError
from pydantic import ValidationError

from jobflow.broker.names import DISPATCH_COMMAND_ACTOR, RUN_JOB_ACTOR
from jobflow.cli.amqp import Delivery
from jobflow.dead_letter import REPLAY_OPTION, DeadLetter

_KINDS = {RUN_JOB_ACTOR: "job", DISPATCH_COMMAND_ACTOR: "command"}
HEAD_BYTES = 64


@dataclass(frozen=True)
class DeadLetterView:
    """One dead letter as read from its dead-letter queue, with every field an operator filters on."""

    id: str
    dead_letter_queue: str
    source_queue: str
    record: DeadLetter | None
    message: dramatiq.Message[Any] | None
    body: bytes
    x_death: list[dict[str, Any]]
    #: Why the jobflow header could not be read, when it was there but broken.
    header_problem: str | None = None

    @property
    def envelope(self) -> dict[str, Any] | None:
        args = self.message.args if self.message is not None else ()
        return args[0] if len(args) == 1 and isinstance(args[0], dict) else None

    @property
    def kind(self) -> str | None:
        if self.record is not None and self.record.kind is not None:
            return self.record.kind
        return _KINDS.get(self.message.actor_name) if self.message is not None else None

    @property
    def name(self) -> str | None:
        if self.record is not None and self.record.name is not None:
            return self.record.name
        name = (self.envelope or {}).get("name")
        return name if isinstance(name, str) else None

    @property
    def version(self) -> int | None:
        if self.record is not None and self.record.version is not None:
            return self.record.version
        version = (self.envelope or {}).get("version")
        return version if isinstance(version, int) else None

    @property
    def reason(self) -> str:
        if self.record is not None:
            return self.record.reason
        death = self.x_death[0] if self.x_death else {}
        return f"rabbitmq:{_text(death.get('reason')) or 'unknown'}"

    @property
    def error_type(self) -> str | None:
        if self.record is not None:
            return self.record.error_type
        return _last_traceback_line(self)[0]

    @property
    def error_message(self) -> str | None:
        if self.record is not None:
            return self.record.error_message
        return _last_traceback_line(self)[1]

    @property
    def traceback(self) -> str | None:
        if self.record is not None and self.record.traceback:
            return self.record.traceback
        tb = self.message.options.get("traceback") if self.message is not None else None
        return tb if isinstance(tb, str) else None

    @property
    def attempts(self) -> int | None:
        if self.record is not None:
            return self.record.attempts
        if self.message is None:
            return None
        retries = self.message.options.get("retries", 0)
        return retries + 1 if isinstance(retries, int) else None

    @property
    def failed_at(self) -> datetime | None:
        if self.record is not None:
            return self.record.last_failed_at
        when = self.x_death[0].get("time") if self.x_death else None
        if isinstance(when, datetime):
            return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
        return None

    @property
    def replay_count(self) -> int:
        recorded = self.record.replay_count if self.record is not None else 0
        return max(recorded, int(_replay_option(self).get("count", 0) or 0))

    @property
    def last_replayed_at(self) -> str | None:
        if self.record is not None and self.record.last_replayed_at is not None:
            return self.record.last_replayed_at.isoformat()
        at = _replay_option(self).get("at")
        return at if isinstance(at, str) else None

    @property
    def body_head(self) -> str:
        """The body's first bytes, undecodable ones escaped (``\\xff``)."""
        return self.body[:HEAD_BYTES].decode("utf-8", "backslashreplace")

    def summary(self) -> dict[str, Any]:
        """One row of ``dead-letters list``: JSON-ready."""
        return {
            "id": self.id,
            "queue": self.source_queue,
            "kind": self.kind,
            "job": self.name,
            "version": self.version,
            "reason": self.reason,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "attempts": self.attempts,
            "failed_at": self.failed_at.isoformat() if self.failed_at else None,
            "replay_count": self.replay_count,
            "jobflow_record": self.record is not None,
            "size": len(self.body),
            # What little is known of a body that is not a message: its first bytes.
            "body_head": self.body_head if self.message is None else None,
        }

    def details(self) -> dict[str, Any]:
        """Everything ``dead-letters show`` prints: JSON-ready."""
        return {
            **self.summary(),
            "dead_letter_queue": self.dead_letter_queue,
            "message_id": self.message.message_id if self.message is not None else None,
            "data": (self.envelope or {}).get("data"),
            "traceback": self.traceback,
            "last_replayed_at": self.last_replayed_at,
            "record": self.record.model_dump(mode="json") if self.record is not None else None,
            "header_problem": self.header_problem,
            "message": _jsonable(self.message.asdict()) if self.message is not None else None,
            "x_death": [_jsonable(d) for d in self.x_death],
            "body_head": self.body_head,
        }


def read_dead_letter(dead_letter_queue: str, delivery: Delivery) -> DeadLetterView:
    """Make sense of one delivery from a dead-letter queue; never raises on a strange message."""
    record, problem = _record(delivery.headers)
    message = _decode(delivery.body)
    x_death = [dict(d) for d in delivery.headers.get("x-death") or [] if isinstance(d, dict)]
    if record is not None and record.message_id:
        ident = record.message_id
    elif message is not None:
        ident = message.message_id
    else:
        ident = "raw-" + hashlib.sha256(delivery.body).hexdigest()[:16]
    return DeadLetterView(
        id=ident,
        dead_letter_queue=dead_letter_queue,
        source_queue=_source_queue(dead_letter_queue, record, message, x_death),
        record=record,
        message=message,
        body=delivery.body,
        x_death=x_death,
        header_problem=problem,
    )


def _record(headers: dict[str, Any]) -> tuple[DeadLetter | None, str | None]:
    try:
        return DeadLetter.from_headers(headers), None
    except (ValidationError, ValueError) as exc:
        return None, f"unreadable jobflow dead-letter header: {exc}"


def _decode(body: bytes) -> dramatiq.Message[Any] | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("actor_name"), str):
        return None
    try:
        return dramatiq.Message.decode(body)
    except DecodeError:
        return None


def _source_queue(
    xq: str, record: DeadLetter | None, message: dramatiq.Message[Any] | None, x_death: list[dict[str, Any]]
) -> str:
    if record is not None:
        return q_name(record.source_queue)
    if x_death and _text(x_death[0].get("queue")):
        return q_name(_text(x_death[0].get("queue")))
    if message is not None:
        return q_name(message.queue_name)
    return xq.removesuffix(".XQ")


def _replay_option(view: DeadLetterView) -> dict[str, Any]:
    option = view.message.options.get(REPLAY_OPTION) if view.message is not None else None
    return option if isinstance(option, dict) else {}


def _last_traceback_line(view: DeadLetterView) -> tuple[str | None, str | None]:
    """Stock Dramatiq keeps the previous attempt's traceback in the message: its last line names the error."""
    lines = [line for line in (view.traceback or "").strip().splitlines() if line.strip()]
    if not lines or lines[-1].startswith(" "):
        return None, None
    error_type, _, message = lines[-1].partition(":")
    return error_type.strip(), message.strip()


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else ""


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value
