"""jobflow's Prometheus series (``jobflow_*``): what each counts, its labels and its buckets.

One set per process, in prometheus_client's default registry, made on first use: a producer's
schedules are counted too, and show wherever that process exposes its registry. A ``dramatiq``
worker with ``JOBFLOW_METRICS_PORT`` switches prometheus_client to multiprocess mode before that
first use (:mod:`jobflow.metrics_server`), so one ``/metrics`` sums all its processes.

Labels are the job's (or command's) name and version and its queue, never its data. A plain
Dramatiq actor's messages count under ``kind="actor"`` and the actor's name.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

from dramatiq.common import q_name
from prometheus_client import Counter, Gauge, Histogram

from jobflow.broker.names import KINDS
from jobflow.envelope import envelope_identity

LABELS = ("kind", "name", "version", "queue")
Labels = tuple[str, str, str, str]

#: Seconds. From a trivial job to past the default 10-minute time limit.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, math.inf)
#: Seconds. A ladder hop costs about 1.5 ms and p99 is tens of ms; a backlog or an outage, minutes.
LATENESS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    math.inf,
)
#: A name read from the wire is cut to this, so one odd producer cannot make huge series.
MAX_NAME_CHARS = 200


def labels_of(message: Any) -> Labels:
    """The labels of a Dramatiq message (or a worker's proxy of one); lenient, as it may be poison."""
    queue = q_name(str(message.queue_name))
    kind = KINDS.get(message.actor_name)
    if kind is None:
        return "actor", str(message.actor_name)[:MAX_NAME_CHARS], "", queue
    name, version = envelope_identity(message.args)
    return kind, (name or "")[:MAX_NAME_CHARS], "" if version is None else str(version), queue


@dataclass(frozen=True)
class Instruments:
    """The series of one process."""

    scheduled: Counter
    started: Counter
    succeeded: Counter
    retried: Counter
    dead_lettered: Counter
    poison_refused: Counter
    cancelled: Counter
    duration: Histogram
    lateness: Histogram
    in_progress: Gauge


_lock = threading.Lock()
_instruments: Instruments | None = None


def _make() -> Instruments:
    def counter(name: str, doc: str) -> Counter:
        return Counter(f"jobflow_{name}", doc, LABELS)

    return Instruments(
        scheduled=counter("jobs_scheduled", "Messages published by this process: schedules, commands, sends."),
        started=counter("jobs_started", "Attempts started (each retry is one more)."),
        succeeded=counter("jobs_succeeded", "Attempts that returned without an exception."),
        retried=counter("jobs_retried", "Failed attempts whose retry the broker confirmed."),
        dead_lettered=counter("jobs_dead_lettered", "Messages moved to their dead-letter queue (.XQ) by a worker."),
        poison_refused=Counter(
            "jobflow_poison_refused",
            "Deliveries refused before reaching a job (not a message, undecodable, too large), dead-lettered.",
            ("queue", "reason"),
        ),
        cancelled=counter("jobs_cancelled", "Messages skipped, and acknowledged, because their job was cancelled."),
        duration=Histogram(
            "jobflow_job_duration_seconds", "How long each attempt ran.", LABELS, buckets=DURATION_BUCKETS
        ),
        lateness=Histogram(
            "jobflow_job_lateness_seconds",
            "How long after its due time each attempt started (a retry is due when its backoff ends).",
            LABELS,
            buckets=LATENESS_BUCKETS,
        ),
        in_progress=Gauge("jobflow_jobs_in_progress", "Attempts running now.", LABELS, multiprocess_mode="livesum"),
    )


def instruments() -> Instruments:
    """This process's series, made on first use."""
    global _instruments  # noqa: PLW0603  (one set per process: prometheus_client refuses a second)
    with _lock:
        if _instruments is None:
            _instruments = _make()
        return _instruments


@dataclass(frozen=True)
class Attempts:
    """The children of one label set that every attempt touches, looked up once per label set:
    prometheus_client's ``labels()`` validates and locks on each call, five times per job."""

    started: Counter
    succeeded: Counter
    in_progress: Gauge
    duration: Histogram
    lateness: Histogram


_attempts: dict[Labels, Attempts] = {}


def attempts(labels: Labels) -> Attempts:
    """The per-attempt series of ``labels`` (one entry per label set, as prometheus_client keeps)."""
    found = _attempts.get(labels)
    if found is None:
        series = instruments()
        found = Attempts(
            started=series.started.labels(*labels),
            succeeded=series.succeeded.labels(*labels),
            in_progress=series.in_progress.labels(*labels),
            duration=series.duration.labels(*labels),
            lateness=series.lateness.labels(*labels),
        )
        _attempts[labels] = found  # a race makes the same children twice: labels() returns the same ones
    return found


def made() -> bool:
    """Whether this process has made its series (multiprocess mode must be chosen before)."""
    return _instruments is not None
