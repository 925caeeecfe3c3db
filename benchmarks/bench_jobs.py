"""The jobflow job the benchmarks schedule; importable by producers and workers alike."""

from __future__ import annotations

from dramatiq.middleware import CurrentMessage

import jobflow
from jobflow.middleware.due_time import DUE_OPTION
from recording import record

#: Set by the worker's Arrival middleware, before jobflow's early guard can hold the message back.
ARRIVED_OPTION = "bench_arrived_ms"


class BenchDelay(jobflow.Job, name="BenchDelay", version=1):
    """Records when it started against the ``due_ms`` its message carries (what ``job.started`` logs)."""

    tag: str
    n: int

    def execute(self, ctx: jobflow.JobContext) -> None:
        message = CurrentMessage.get_current_message()
        options = message.options if message is not None else {}
        due = options.get(DUE_OPTION)
        if isinstance(due, int):
            due_ms = float(due)
        elif ctx.due_at is not None:
            due_ms = ctx.due_at.timestamp() * 1000
        else:
            raise RuntimeError("a benchmark job without a due time")
        record("jobflow", self.tag, self.n, due_ms, options.get(ARRIVED_OPTION))
