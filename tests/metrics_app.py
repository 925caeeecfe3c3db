"""Job types the metrics test's worker processes load: `dramatiq jobflow.actors tests.metrics_app -p 2`.

Each job records the pid of the process that ran it, so the test knows the counts it reads from
one ``/metrics`` came from both processes.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import jobflow

FAST = jobflow.RetryPolicy(max_attempts=4, backoff=timedelta(milliseconds=10), max_backoff=timedelta(milliseconds=50))
TWICE = jobflow.RetryPolicy(max_attempts=2, backoff=timedelta(milliseconds=10), max_backoff=timedelta(milliseconds=50))


def _record(directory: str, ctx: jobflow.JobContext) -> None:
    Path(directory, f"{ctx.job_id}-{ctx.attempt}.pid").write_text(str(os.getpid()))


class MetricsOk(jobflow.Job, name="MetricsOk", version=1):
    pids: str

    def execute(self, ctx: jobflow.JobContext) -> None:
        _record(self.pids, ctx)


class MetricsOkV2(jobflow.Job, name="MetricsOk", version=2):
    pids: str

    def execute(self, ctx: jobflow.JobContext) -> None:
        _record(self.pids, ctx)


class MetricsFlaky(jobflow.Job, name="MetricsFlaky", version=1, retry=FAST):
    """Fails transiently on its first ``failures`` attempts."""

    pids: str
    failures: int

    def execute(self, ctx: jobflow.JobContext) -> None:
        _record(self.pids, ctx)
        if ctx.attempt <= self.failures:
            raise jobflow.TransientError(f"attempt {ctx.attempt}")


class MetricsBroken(jobflow.Job, name="MetricsBroken", version=1, retry=FAST):
    pids: str

    def execute(self, ctx: jobflow.JobContext) -> None:
        _record(self.pids, ctx)
        raise jobflow.PermanentError("never works")


class MetricsExhausted(jobflow.Job, name="MetricsExhausted", version=1, retry=TWICE):
    pids: str

    def execute(self, ctx: jobflow.JobContext) -> None:
        _record(self.pids, ctx)
        raise jobflow.TransientError("always fails")


class MetricsBlocks(jobflow.Job, name="MetricsBlocks", version=1):
    """Runs until ``release`` exists, so the test can see it in progress."""

    release: str
    started: str

    def execute(self, ctx: jobflow.JobContext) -> None:
        Path(self.started).touch()  # the test releases only a job that runs, so it ran ≥ one sleep
        deadline = time.monotonic() + 30
        while not Path(self.release).exists():
            if time.monotonic() > deadline:
                raise jobflow.PermanentError("never released")
            time.sleep(0.02)


class MetricsNote(jobflow.Command, name="MetricsNote", version=1):
    text: str


@jobflow.command_handler(MetricsNote)
def note(command: MetricsNote, ctx: jobflow.CommandContext) -> None:
    ctx.log.info("metrics_note", text=command.text)
