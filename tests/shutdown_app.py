"""The job a stopping worker process runs in the shutdown tests: `dramatiq jobflow.actors tests.shutdown_app`."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import jobflow


def record(path: str, **fields: object) -> None:
    """Append one JSON line; a single short O_APPEND write, so lines of concurrent writers never mix."""
    with open(path, "a") as f:
        f.write(json.dumps({**fields, "at": time.time(), "pid": os.getpid()}) + "\n")


class Hold(jobflow.Job, name="Hold", version=1):
    """Records its start, waits (async, on the worker's event loop) until ``release`` exists, records its end."""

    log: str
    label: str
    release: str

    async def execute(self, ctx: jobflow.JobContext) -> None:
        record(self.log, label=self.label, event="start", attempt=ctx.attempt)
        # The test creates the file from another process: no asyncio.Event reaches across.
        while not Path(self.release).exists():  # noqa: ASYNC110, ASYNC240
            await asyncio.sleep(0.05)
        record(self.log, label=self.label, event="end", attempt=ctx.attempt)
