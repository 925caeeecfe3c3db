"""A ``dramatiq jobflow.actors <app>`` worker in a process (and session) of its own, for the tests
that kill, stop and restart real workers against a real RabbitMQ."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """``dramatiq jobflow.actors <app> -p 1 -t <threads>``, JSON logs appended to ``log``."""

    def __init__(self, app: str, env: Mapping[str, str], log: Path, *, threads: int = 8) -> None:
        self.log = log
        full = {**os.environ, "JOBFLOW_LOG_FORMAT": "json", "PYTHONPATH": str(ROOT), **env}
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dramatiq", "jobflow.actors", app, "-p", "1", "-t", str(threads)],
                env=full,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        #: The master and the worker processes it forked (the ones that run jobs), once killed.
        self.pids: set[int] = set()

    def events(self, name: str) -> list[dict[str, Any]]:
        """Every JSON event ``name`` this worker's log holds (the log may be shared by several)."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if f'"{name}"' in line:
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line[line.index("{") :]))
        return found

    def kill(self) -> None:
        """SIGKILL the master and its worker processes at once, as the OOM killer or a lost host does."""
        pid = self.process.pid
        with contextlib.suppress(OSError):
            self.pids = {pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())}
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (running jobs finish, the rest is redelivered); SIGKILL after ``timeout``."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
