"""The recurring schedule the recurring-jobs tests run: `dramatiq jobflow.actors tests.recurring_app`.

Each occurrence appends one JSON line to ``RECURRING_RESULTS``: its id, when it was due, when it
started and in which process.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import jobflow


class RecurringProbe(jobflow.Job, name="RecurringProbe", version=1):
    def execute(self, ctx: jobflow.JobContext) -> None:
        started = time.time() * 1000
        due = ctx.due_at.timestamp() * 1000 if ctx.due_at is not None else started
        line = {"job_id": ctx.job_id, "due_ms": due, "started_ms": started, "pid": os.getpid(), "attempt": ctx.attempt}
        fd = os.open(os.environ["RECURRING_RESULTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())  # one short O_APPEND write: atomic
        finally:
            os.close(fd)


jobflow.recurring("probe-every-second", RecurringProbe(), every=timedelta(seconds=1))
