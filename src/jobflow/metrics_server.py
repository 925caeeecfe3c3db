"""Serving ``/metrics`` from workers: every process of one ``dramatiq -p N`` master on one port.

This is prometheus_client's multiprocess mode. Each worker process writes its series to files in a
directory of its master's own; exactly one process serves their sum: whichever holds that
directory's lock. The others wait on the lock, so if the serving process dies the kernel hands the
lock, and the port, to another within moments. The directory's name holds the master's pid, its
start time and the machine's boot id, so a new master (a restarted container is pid 1 again) never
adds up an old one's files; the directories of masters that are gone are deleted when a worker
process starts. Files of worker processes that died are marked dead at every scrape, so the
in-progress gauge never counts their jobs. An in-process worker serves its own registry instead.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import prometheus_client
import structlog
from prometheus_client import values
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from jobflow.metrics import made

logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("jobflow")

ENV = "PROMETHEUS_MULTIPROC_DIR"
#: How often the serving process tries again to bind a port another program holds.
BIND_RETRY_SECONDS = 5.0

_MASTER_DIR = re.compile(r"^master-(\d+)(?:-.*)?$")
_LIVE_GAUGE_FILE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")


def _incarnation(pid: int) -> str | None:
    """``<starttime>-<boot id>`` of a live process (Linux), which no later process shares."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        # The command name (field 2) may hold spaces and parentheses; the start time is field 22.
        return f"{stat.rsplit(')', 1)[1].split()[19]}-{boot[:8]}"
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def base_dir() -> Path:
    """Where masters' directories live: ``$PROMETHEUS_MULTIPROC_DIR`` if the operator set it, else the temp dir."""
    given = os.environ.get(ENV)
    return Path(given) if given else Path(tempfile.gettempdir()) / f"jobflow-metrics-{os.getuid()}"


def master_dir(base: Path) -> Path:
    """This process's master's directory (made), after deleting those of masters that are gone."""
    master = os.getppid()
    incarnation = _incarnation(master)
    name = f"master-{master}" + (f"-{incarnation}" if incarnation else "")
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    for entry in base.iterdir():
        match = _MASTER_DIR.match(entry.name)
        if entry.name == name or match is None or not entry.is_dir():
            continue
        pid = int(match.group(1))
        if not _alive(pid) or (incarnation is not None and entry.name != f"master-{pid}-{_incarnation(pid)}"):
            shutil.rmtree(entry, ignore_errors=True)
    directory = base / name
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory


def enable_multiprocess(directory: Path) -> None:
    """Make this process write its series to ``directory``; before its first series is made.

    prometheus_client picks its value store when it is imported, from the environment: set it,
    and pick again, in case something imported prometheus_client before this process booted.
    """
    os.environ[ENV] = str(directory)
    if made():
        logger.warning("metrics.multiprocess_too_late", reason="series made before process boot stay out of /metrics")
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


class _LiveCollector(MultiProcessCollector):
    """Sums the directory's files, first marking dead the processes that died without saying so."""

    def __init__(self, registry: prometheus_client.CollectorRegistry, path: Path) -> None:
        super().__init__(registry, str(path))  # type: ignore[no-untyped-call]
        self._dir = path

    def collect(self) -> Iterable[Metric]:
        for file in self._dir.glob("gauge_live*.db"):
            match = _LIVE_GAUGE_FILE.match(file.name)
            if match is not None and not _alive(int(match.group(1))):
                mark_process_dead(int(match.group(1)), str(self._dir))  # type: ignore[no-untyped-call]
        # A process that is creating its file has it empty for a moment (prometheus_client grows it
        # after opening): such a file holds no values yet, and reading it fails the whole scrape.
        files = [str(f) for f in self._dir.glob("*.db") if _size(f) >= _MMAP_HEADER_BYTES]
        return self.merge(files, accumulate=True)  # type: ignore[no-untyped-call,no-any-return]


#: An mmap file's used-bytes header: shorter, it is still being created.
_MMAP_HEADER_BYTES = 8


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # marked dead and removed meanwhile
        return 0


def _bind(host: str, port: int, registry: prometheus_client.CollectorRegistry, directory: Path) -> WSGIServer:
    warned = False
    while True:
        try:
            server, _thread = prometheus_client.start_http_server(port, host, registry)
        except OSError as exc:
            if not warned:
                logger.error("metrics.bind_failed", host=host, port=port, error=str(exc), retry_s=BIND_RETRY_SECONDS)
                warned = True
            time.sleep(BIND_RETRY_SECONDS)
            continue
        logger.info("metrics.serving", host=host, port=port, pid=os.getpid(), multiprocess_dir=str(directory))
        return server


def serve_elected(directory: Path, host: str, port: int) -> threading.Thread:
    """Serve the sum of ``directory`` on ``host:port`` once this process holds its lock (a daemon thread)."""

    def run() -> None:
        fd = os.open(directory / "serve.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until this process ends: then another one serves
        registry = prometheus_client.CollectorRegistry()
        _LiveCollector(registry, directory)
        _bind(host, port, registry, directory)

    thread = threading.Thread(target=run, name="jobflow-metrics", daemon=True)
    thread.start()
    return thread


def serve_here(host: str, port: int) -> WSGIServer | None:
    """Serve this process's own registry (an in-process worker); None, and an error logged, if it cannot bind."""
    try:
        server, _thread = prometheus_client.start_http_server(port, host)
    except OSError as exc:
        logger.error("metrics.bind_failed", host=host, port=port, error=str(exc))
        return None
    logger.info("metrics.serving", host=host, port=port, pid=os.getpid())
    return server


def mark_dead(directory: Path) -> None:
    """This process is ending: its in-progress gauge no longer counts (its counters stay)."""
    mark_process_dead(os.getpid(), str(directory))  # type: ignore[no-untyped-call]
