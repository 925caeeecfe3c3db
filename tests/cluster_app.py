"""The job the cluster fault tests run: `dramatiq jobflow.actors tests.cluster_app`.

Each execution appends two JSON lines to ``CLUSTER_RESULTS`` (its start, then its end), so a test
sees which jobs a killed worker had begun and which ran to the end, where and how late.
"""

from __future__ import annotations

import json
import os
import time

import jobflow


def append(record: dict[str, object]) -> None:
    # O_APPEND writes of one short line are atomic between threads and processes.
    fd = os.open(os.environ["CLUSTER_RESULTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


class ClusterProbe(jobflow.Job, name="ClusterProbe", version=1):
    """Records when it started against when it was due; sleeps ``sleep_s`` in between."""

    kind: str
    n: int
    sleep_s: float = 0.0

    def execute(self, ctx: jobflow.JobContext) -> None:
        started = time.time() * 1000
        due = ctx.due_at.timestamp() * 1000 if ctx.due_at is not None else started
        mark = {"kind": self.kind, "n": self.n, "due_ms": due, "started_ms": started, "pid": os.getpid()}
        append({**mark, "phase": "start"})
        if self.sleep_s:
            time.sleep(self.sleep_s)
        append({**mark, "phase": "done"})
