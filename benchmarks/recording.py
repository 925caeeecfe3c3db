"""What the benchmark jobs share: their names, and one JSON line per execution in ``BENCH_RESULTS``.

Imported by the worker processes (jobflow's and raw Dramatiq's) and by the orchestrating scripts,
so it imports nothing heavy.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

#: The raw Dramatiq side's actor and queue.
RAW_ACTOR = "bench_delay"
RAW_QUEUE = "rawbench"

#: What each execution is: a precision job, a starvation probe, a one-hour filler, a durability job.
PRECISION, PROBE, FILLER, DURABILITY = "p", "s", "f", "d"


def record(side: str, tag: str, n: int, due_ms: float, arrived_ms: float | None = None) -> None:
    """Append one execution: when it was due, when the worker took it, when the job started."""
    started_ms = time.time() * 1000
    line = json.dumps(
        {
            "side": side,
            "tag": tag,
            "n": n,
            "due_ms": due_ms,
            "arrived_ms": started_ms if arrived_ms is None else arrived_ms,
            "started_ms": started_ms,
            "pid": os.getpid(),
        }
    )
    # O_APPEND writes of one short line are atomic between threads and processes.
    fd = os.open(os.environ["BENCH_RESULTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


class RecordReader:
    """Reads the records appended since the last call (a torn last line waits for the next call)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._offset = 0
        self.records: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return self.records
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        for line in chunk[:end].splitlines():
            if line.strip():
                self.records.append(json.loads(line))
        return self.records
