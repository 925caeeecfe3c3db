"""Durability of jobflow's delays: 10,000 delayed jobs across a worker crash and a RabbitMQ restart.

    .venv/bin/python benchmarks/durability.py                       # about 2 minutes
    .venv/bin/python benchmarks/durability.py --no-broker-restart   # the worker crash only

CAUTION: the broker restart is ``rabbitmqctl stop_app`` / ``start_app`` of the machine's only
RabbitMQ: everyone's connections drop for a few seconds. Run it rarely, at a quiet moment.
``start_app`` runs in a ``finally``, whatever happens.

In a vhost of its own: one jobflow worker (``dramatiq jobflow.actors bench_jobflow_worker -p 1 -t 8``);
JOBS jobs with delays spread uniformly over MIN-MAX s, scheduled with ``BrokerJobScheduler.schedule``
(or ``--bulk``: the same bytes, many confirms in flight); KILL_AT s after the last publish the worker
gets SIGKILL (no shutdown, no ack) and a new one starts; OUTAGE_AT s after the last publish
RabbitMQ's application stops for OUTAGE s.
Then: did every job run, how often, and how late, counted from its due time or, for a job due
while the worker or the broker was down, from the moment it came back.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench_jobs import BenchDelay
from benchlib import (
    WorkerProcess,
    bulk_publish,
    jobflow_items,
    load_average,
    percentile,
    queue_table,
    rabbitmqctl,
    temporary_vhost,
    wait_for_consumers,
)
from jobflow import BrokerJobScheduler, Settings
from jobflow.log_config import configure_logging
from jobflow.names import delay_queues, jobs_queue
from recording import DURABILITY, RecordReader

PREFIX = "durable"
SETTLE_S = 1.5  # after a snapshot
LATE_MS = 250.0  # the precision bound: later than this beyond its due time (or the outage's end) is "late"


@dataclass
class Window:
    """A span during which jobs could not run: the worker, or the broker, was down."""

    what: str
    how: str
    start_ms: float
    end_ms: float = 0.0
    pending: int = 0  # delayed jobs waiting in the ladder when it began
    unacked: int = 0  # messages held unacknowledged by any consumer when it began


def now_ms() -> float:
    return time.time() * 1000


def snapshot(vhost: str) -> tuple[int, int]:
    """(messages waiting in the delay ladder, messages unacknowledged anywhere in the vhost).

    ``rabbitmqctl`` boots an Erlang VM (about a second of CPU): let the machine settle before acting.
    """
    table = queue_table(vhost)
    time.sleep(SETTLE_S)
    ladder = set(delay_queues(PREFIX))
    pending = sum(ready + unacked for name, (ready, unacked, _) in table.items() if name in ladder)
    return pending, sum(unacked for _, unacked, _ in table.values())


def start_worker(url: str, results: Path, logs: Path, index: int) -> WorkerProcess:
    env = {
        "JOBFLOW_BROKER_URL": url,
        "JOBFLOW_QUEUE_PREFIX": PREFIX,
        "JOBFLOW_LOG_FORMAT": "json",
        "BENCH_RESULTS": str(results),
    }
    args = ["jobflow.actors", "bench_jobflow_worker", "-p", "1", "-t", "8"]
    worker = WorkerProcess(args, env, logs / f"worker-{index}.log")
    wait_for_consumers(url, [jobs_queue(PREFIX)])
    return worker


@contextmanager
def broker_guard() -> Iterator[list[bool]]:
    """Whatever happens inside, RabbitMQ's application is running again afterwards."""
    stopped = [False]
    try:
        yield stopped
    finally:
        if stopped[0]:
            rabbitmqctl("start_app")
            rabbitmqctl("await_startup")


def restart_broker(vhost: str, outage_s: float, stopped: list[bool]) -> Window:
    pending, unacked = snapshot(vhost)
    window = Window("RabbitMQ down", "stop_app .. start_app returned", now_ms(), pending=pending, unacked=unacked)
    stopped[0] = True
    rabbitmqctl("stop_app")
    time.sleep(outage_s)
    rabbitmqctl("start_app")
    rabbitmqctl("await_startup")
    stopped[0] = False
    window.end_ms = now_ms()
    return window


def crash_worker(worker: WorkerProcess, vhost: str, url: str, results: Path, logs: Path) -> tuple[Window, Any]:
    pending, unacked = snapshot(vhost)
    window = Window("worker down", "SIGKILL .. new worker consuming", now_ms(), pending=pending, unacked=unacked)
    worker.kill()
    time.sleep(1)
    replacement = start_worker(url, results, logs, 2)
    window.end_ms = now_ms()
    return window, replacement


def sleep_until(t0: float, at_s: float) -> None:
    time.sleep(max(0.0, t0 + at_s - time.monotonic()))


@dataclass(frozen=True)
class Config:
    jobs: int
    min_s: float
    max_s: float
    kill_at: float
    outage_at: float
    outage_s: float
    broker_restart: bool
    bulk: bool
    seed: int


def publish(cfg: Config, url: str, delays: list[int]) -> float:
    """Schedule every job; returns jobs per second."""
    t0 = time.perf_counter()
    if cfg.bulk:
        bulk_publish(url, jobflow_items(PREFIX, DURABILITY, delays), cfg.jobs)
    else:
        with BrokerJobScheduler(settings=Settings(broker_url=url, queue_prefix=PREFIX)) as scheduler:
            for n, delay in enumerate(delays):
                scheduler.schedule(BenchDelay(tag=DURABILITY, n=n), delay=timedelta(milliseconds=delay))
    return cfg.jobs / (time.perf_counter() - t0)


def run(cfg: Config, logs: Path) -> tuple[list[dict[str, Any]], list[Window], float, float]:
    rng = random.Random(cfg.seed)
    delays = [rng.randint(int(cfg.min_s * 1000), int(cfg.max_s * 1000)) for _ in range(cfg.jobs)]
    results = logs / "results.jsonl"
    reader = RecordReader(str(results))
    windows: list[Window] = []
    with temporary_vhost("bench-durability") as (vhost, url), broker_guard() as stopped:
        BrokerJobScheduler(settings=Settings(broker_url=url, queue_prefix=PREFIX)).close()  # queue and ladder
        worker = start_worker(url, results, logs, 1)
        try:
            rate = publish(cfg, url, delays)
            t0 = time.monotonic()
            print(f"published {cfg.jobs:,} at {rate:,.0f}/s", file=sys.stderr)
            sleep_until(t0, cfg.kill_at - SETTLE_S)
            window, worker = crash_worker(worker, vhost, url, results, logs)
            windows.append(window)
            print(f"worker killed and replaced ({window.pending:,} pending)", file=sys.stderr)
            if cfg.broker_restart:
                sleep_until(t0, cfg.outage_at - SETTLE_S)
                windows.append(restart_broker(vhost, cfg.outage_s, stopped))
                print(f"RabbitMQ restarted ({windows[-1].pending:,} pending)", file=sys.stderr)
            deadline = time.monotonic() + cfg.max_s + 60
            while len({r["n"] for r in reader.poll()}) < cfg.jobs and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(2)  # late duplicates
            leftover = sum(sum(row[:2]) for row in queue_table(vhost).values())
        finally:
            worker.stop()
    return reader.poll(), windows, rate, leftover


def report(cfg: Config, records: list[dict[str, Any]], windows: list[Window], leftover: float) -> list[str]:
    first: dict[int, dict[str, Any]] = {}
    for rec in sorted(records, key=lambda r: r["started_ms"]):
        first.setdefault(rec["n"], rec)
    normal: list[float] = []
    after: dict[str, list[float]] = {w.what: [] for w in windows}
    for rec in first.values():
        # Hit by an outage: due before it ended and not started before it began.
        window = next((w for w in windows if rec["due_ms"] <= w.end_ms and rec["started_ms"] >= w.start_ms), None)
        if window is None:
            normal.append(rec["started_ms"] - rec["due_ms"])
        else:
            after[window.what].append(rec["started_ms"] - max(rec["due_ms"], window.end_ms))
    late = [x for x in normal + [x for xs in after.values() for x in xs] if x > LATE_MS]

    def dist(xs: list[float]) -> str:
        if not xs:
            return "none"
        return f"{len(xs):,} jobs: p50 {percentile(xs, 50):,.1f}, p99 {percentile(xs, 99):,.1f}, max {max(xs):,.1f} ms"

    rows = [
        ("ran at least once", f"{len(first):,} / {cfg.jobs:,}"),
        ("messages left in the vhost", f"{leftover:,.0f}"),
        ("executions beyond the first", f"{len(records) - len(first):,}"),
        ("started before due", f"{sum(1 for r in first.values() if r['started_ms'] < r['due_ms']):,}"),
        ("not hit by an outage: lateness", dist(normal)),
    ]
    rows += [(f"pending or due while {w.what}: late beyond its end", dist(after[w.what])) for w in windows]
    worst = f" (max {max(late):,.0f} ms)" if late else ""
    rows.append((f"late by > {LATE_MS:.0f} ms beyond due or outage end", f"{len(late):,}{worst}"))
    width = max(len(label) for label, _ in rows)
    return [f"{label:<{width}}  {value}" for label, value in rows]


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--min-delay", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument("--max-delay", type=float, default=40.0, help="seconds (default 40)")
    parser.add_argument("--kill-at", type=float, default=4.0, help="worker SIGKILL, s after the last publish")
    parser.add_argument("--outage-at", type=float, default=12.0, help="stop_app, s after the last publish")
    parser.add_argument("--outage", type=float, default=4.0, help="seconds between stop_app and start_app")
    parser.add_argument("--no-broker-restart", action="store_true", help="skip stop_app/start_app")
    parser.add_argument(
        "--bulk", action="store_true", help="publish with many confirms in flight instead of BrokerJobScheduler"
    )
    parser.add_argument("--seed", type=int, default=1)
    a = parser.parse_args(argv)
    return Config(
        a.jobs, a.min_delay, a.max_delay, a.kill_at, a.outage_at, a.outage, not a.no_broker_restart, a.bulk, a.seed
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    configure_logging("console", "WARNING")
    logs = Path(tempfile.mkdtemp(prefix="jobflow-durability-"))
    started, load_before = datetime.now(UTC), load_average()
    t0 = time.monotonic()
    records, windows, rate, leftover = run(cfg, logs)
    base = windows[0].start_ms - cfg.kill_at * 1000  # the last publish
    print(f"Durability: jobflow delay ladder, {cfg.jobs:,} jobs due {cfg.min_s:g}-{cfg.max_s:g} s after publishing"
          f" -- {started:%Y-%m-%d %H:%M} UTC")  # fmt: skip
    print(f"load average (1/5/15 min): {load_before} at start, {load_average()} at end; {time.monotonic() - t0:.0f} s;"
          f" published at {rate:,.0f}/s ({'bulk' if cfg.bulk else 'BrokerJobScheduler.schedule'}, confirmed);"
          f" logs and records in {logs}; t = the last publish")  # fmt: skip
    for w in windows:
        print(f"  {w.what} ({w.how}): t+{(w.start_ms - base) / 1000:.1f} s .. t+{(w.end_ms - base) / 1000:.1f} s"
              f" ({(w.end_ms - w.start_ms) / 1000:.1f} s); when it began: {w.pending:,} jobs waiting in the ladder,"
              f" {w.unacked:,} messages unacked")  # fmt: skip
    print("\n".join(report(cfg, records, windows, leftover)))


if __name__ == "__main__":
    main()
