"""Shared test helpers: run an in-process worker and wait for outcomes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import dramatiq

from jobflow import InProcessWorker, JobRegistry, Settings
from jobflow.testing import OutcomeTracker


@contextmanager
def tracked_worker(
    broker: dramatiq.Broker, registry: JobRegistry, settings: Settings, threads: int = 4
) -> Iterator[OutcomeTracker]:
    """An in-process worker on ``broker`` and a tracker of what it processed."""
    tracker = OutcomeTracker()
    broker.add_middleware(tracker)
    with InProcessWorker(broker, registry=registry, settings=settings, threads=threads):
        yield tracker


def wait(tracker: OutcomeTracker, done: Callable[[OutcomeTracker], bool], timeout: float = 20.0) -> None:
    assert tracker.wait_for(done, timeout), f"timed out; outcomes so far: {tracker.outcomes}"


def eventually(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
