"""Job types a worker process loads in the tests: `dramatiq jobflow.actors tests.worker_app`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jobflow


def _write(path: str, record: dict[str, object]) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


class TouchFile(jobflow.Job, name="TouchFile", version=1):
    """Writes what it knows of itself to a file the test reads."""

    path: str
    text: str

    def execute(self, ctx: jobflow.JobContext) -> None:
        _write(self.path, {"text": self.text, "job_id": ctx.job_id, "attempt": ctx.attempt, "at": time.time()})


class RoutedTouchFile(jobflow.Job, name="RoutedTouchFile", version=1, queue="emails"):
    """TouchFile on a queue of its own: ``<prefix>.emails``."""

    path: str
    text: str

    def execute(self, ctx: jobflow.JobContext) -> None:
        _write(self.path, {"text": self.text, "job_id": ctx.job_id, "attempt": ctx.attempt, "at": time.time()})


class AsyncTouchFile(jobflow.Job, name="AsyncTouchFile", version=1):
    path: str

    async def execute(self, ctx: jobflow.JobContext) -> None:
        _write(self.path, {"job_id": ctx.job_id, "at": time.time()})


class WriteFileCommand(jobflow.Command, name="WriteFile", version=1):
    path: str
    text: str


@jobflow.command_handler(WriteFileCommand)
async def write_file(command: WriteFileCommand, ctx: jobflow.CommandContext) -> None:
    _write(command.path, {"text": command.text, "job_id": ctx.job_id, "command_id": ctx.command_id})
