"""Cancelling scheduled jobs: what a cancel records, and what a worker remembers of it.

A cancel is a small record (``{"job_id", "at_ms", "until_ms"}``) that a worker keeps in memory
until ``until_ms``: the job's due time, read from its id (:mod:`jobflow.job_ids`), plus
:data:`RETRY_MARGIN` for a job whose retries are still to come. Memory therefore holds only the
cancels whose jobs can still start; once a worker skipped the job it keeps the cancel an hour more. An id of another
form (a plain Dramatiq message) carries no due time and is held for :data:`FOREIGN_HOLD`.
"""

from __future__ import annotations

import heapq
import json
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from dramatiq.common import current_millis

from jobflow.errors import SchedulingError
from jobflow.job_ids import due_ms_of

#: How long past its due time a cancel is still remembered: it stops retries that come later.
RETRY_MARGIN = timedelta(days=7)
#: How long a cancel is still remembered once its job was skipped (a redelivered copy may follow).
AFTER_SKIP = timedelta(hours=1)
#: How long a cancel of an id that carries no due time is remembered.
FOREIGN_HOLD = timedelta(days=30)


@dataclass(frozen=True)
class CancelResult:
    """What a cancel did.

    ``recorded``: the cancel is durable (confirmed by the broker) and every worker will skip the
    job. ``pending``: whether the job was still waiting to start, where the scheduler can tell;
    None where it cannot (the broker does not walk pending jobs to find out).
    """

    job_id: str
    recorded: bool
    pending: bool | None
    #: Until when workers remember the cancel (epoch ms); None where nothing was recorded.
    until_ms: int | None = None


def hold_until_ms(job_id: str, now_ms: int | None = None) -> int:
    """Until when a cancel of ``job_id`` must be remembered, from the due time its id carries."""
    now_ms = current_millis() if now_ms is None else now_ms
    due = due_ms_of(job_id)
    if due is None:
        return now_ms + int(FOREIGN_HOLD.total_seconds() * 1000)
    return max(due, now_ms) + int(RETRY_MARGIN.total_seconds() * 1000)


def check_job_id(job_id: Any) -> str:
    """A job id as a cancel takes it: a non-empty string of at most 255 characters."""
    if not isinstance(job_id, str) or not job_id.strip() or len(job_id) > 255:
        raise SchedulingError(f"a job id to cancel is a non-empty string of at most 255 characters, got {job_id!r}")
    return job_id.strip()


def encode_record(job_id: str, at_ms: int, until_ms: int) -> bytes:
    return json.dumps({"job_id": job_id, "at_ms": at_ms, "until_ms": until_ms}, separators=(",", ":")).encode()


def decode_record(body: bytes) -> tuple[str, int] | None:
    """(job id, until) of a cancel record, or None for anything else (a marker, a stray message)."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(raw, dict):
        return None
    job_id, until = raw.get("job_id"), raw.get("until_ms")
    if not isinstance(job_id, str) or not job_id or not isinstance(until, int) or isinstance(until, bool):
        return None
    return job_id, until


class CancelSet:
    """The cancels a worker remembers: job id -> until (epoch ms), expired ones dropped as it goes."""

    def __init__(self) -> None:
        self._until: dict[str, int] = {}
        self._expiry: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    def add(self, job_id: str, until_ms: int, now_ms: int | None = None) -> bool:
        """Remember a cancel; False if it has expired already (nothing is kept)."""
        now_ms = current_millis() if now_ms is None else now_ms
        if until_ms <= now_ms:
            return False
        with self._lock:
            if self._until.get(job_id, 0) >= until_ms:
                return True
            self._until[job_id] = until_ms
            heapq.heappush(self._expiry, (until_ms, job_id))
            self._expire(now_ms)
        return True

    def take(self, job_id: str) -> bool:
        """Whether ``job_id`` is cancelled. A cancel found is kept only :data:`AFTER_SKIP` longer:
        its job is being skipped, and only a redelivered copy of it can still come."""
        if job_id not in self._until:  # the common case, without the lock
            return False
        now = current_millis()
        with self._lock:
            until = self._until.get(job_id)
            if until is None or until <= now:
                return False
            shorter = now + int(AFTER_SKIP.total_seconds() * 1000)
            if shorter < until:
                self._until[job_id] = shorter
                heapq.heappush(self._expiry, (shorter, job_id))
        return True

    def __contains__(self, job_id: object) -> bool:
        until = self._until.get(job_id) if isinstance(job_id, str) else None
        return until is not None and until > current_millis()

    def __len__(self) -> int:
        return len(self._until)

    def _expire(self, now_ms: int) -> None:
        while self._expiry and self._expiry[0][0] <= now_ms:
            until, job_id = heapq.heappop(self._expiry)
            if self._until.get(job_id) == until:
                del self._until[job_id]
        if len(self._expiry) > 2 * len(self._until) + 64:  # entries superseded or taken: rebuild
            self._expiry = [(u, j) for j, u in self._until.items()]
            heapq.heapify(self._expiry)
