"""The jobs of the throughput benchmark, importable by its producer and by jobflow's worker
(``dramatiq jobflow.actors tp_jobs``); and the raw Dramatiq side's actor and queue names."""

from __future__ import annotations

import os
import time

import jobflow

RAW_SYNC, RAW_ASYNC, RAW_LATENCY = "tp_raw_sync", "tp_raw_async", "tp_raw_latency"


def record_latency(side: str, sent_ms: float) -> None:
    """One line per execution: how long after ``schedule_now``/``send`` began the code started."""
    line = f"{side} {time.time() * 1000 - sent_ms:.3f}\n"
    fd = os.open(os.environ["BENCH_RESULTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one short O_APPEND write: atomic between threads
    finally:
        os.close(fd)


class TpSync(jobflow.Job, name="TpSync"):
    n: int

    def execute(self, ctx: jobflow.JobContext) -> None:
        pass


class TpAsync(jobflow.Job, name="TpAsync"):
    n: int

    async def execute(self, ctx: jobflow.JobContext) -> None:
        pass


class TpLatency(jobflow.Job, name="TpLatency"):
    sent_ms: float

    def execute(self, ctx: jobflow.JobContext) -> None:
        record_latency("jobflow", self.sent_ms)
