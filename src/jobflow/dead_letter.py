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
from datetime import datetime
from typing import Any, Literal

from dramatiq.common import xq_name
from pydantic import AwareDatetime, BaseModel, ConfigDict

HEADER = "x-jobflow-dead-letter"

#: Message option where a replay records how often and when (``{"count": n, "at": iso}``); it
#: travels in the body, so it survives retries, delays and another dead-lettering.
REPLAY_OPTION = "jobflow_replay"

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
