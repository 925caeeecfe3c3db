"""Job ids that carry their job's due time, so a cancel knows how long to be remembered.

A jobflow job id is a UUID (RFC 9562 version 8, "custom"): 72 bits that make it unique (random for
a scheduled job; a hash of the schedule and the occurrence for a recurring one), then the due time
in epoch milliseconds in the last 48 bits. The random part comes first: the CLI's short ids (the
shortest unique prefix) stay short. Ids of other forms (plain Dramatiq messages, jobs scheduled
before this layout) are valid ids; they just carry no due time.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import datetime

_DUE_BITS = 48
_DUE_MASK = (1 << _DUE_BITS) - 1
_VERSION = 8
#: Marks jobflow's layout inside the version-8 space (the 2 bits after the variant).
_TAG = 0b01


def _compose(unique: int, due_ms: int) -> str:
    """``unique``: 72 bits, in three runs around the version (bits 79-76) and the variant and tag
    (bits 63-60); the due time is bits 47-0."""
    value = (
        ((unique >> 24) << 80)
        | (_VERSION << 76)
        | (((unique >> 12) & 0xFFF) << 64)
        | (0b10 << 62)
        | (_TAG << 60)
        | ((unique & 0xFFF) << 48)
        | due_ms
    )
    return str(uuid.UUID(int=value))


def _fits(due_ms: int) -> int:
    if not 0 <= due_ms <= _DUE_MASK:
        raise ValueError(f"a due time of {due_ms} ms since the epoch does not fit a job id")
    return due_ms


def new_job_id(due_at: datetime) -> str:
    """A fresh id for a job due at ``due_at``."""
    return _compose(secrets.randbits(72), _fits(round(due_at.timestamp() * 1000)))


def occurrence_job_id(schedule: str, due_at: datetime) -> str:
    """The id of a recurring schedule's occurrence: the same for the same schedule and time, so a
    second publication of one occurrence is recognisable as a duplicate."""
    due_ms = _fits(round(due_at.timestamp() * 1000))
    digest = hashlib.sha256(f"{schedule}\x00{due_ms}".encode()).digest()
    return _compose(int.from_bytes(digest[:9], "big"), due_ms)


def due_ms_of(job_id: str) -> int | None:
    """The due time a jobflow job id carries, or None for an id of another form."""
    try:
        value = uuid.UUID(job_id)
    except (ValueError, AttributeError, TypeError):
        return None
    if value.version != _VERSION or (value.int >> 60) & 0b11 != _TAG:
        return None
    return value.int & _DUE_MASK
