"""Durability of jobflow's delays: 10,000 delayed jobs across a worker crash and a RabbitMQ restart.

    .venv/bin/python benchmarks/durability.py                       # about 2.5 minutes
    .venv/bin/python benchmarks/durability.py --queue-type quorum   # the ladder on quorum queues
    .venv/bin/python benchmarks/durability.py --no-broker-restart   # the worker crash only

CAUTION: the broker restart is ``rabbitmqctl stop_app`` / ``start_app`` of the machine's only
RabbitMQ: everyone's connections drop for a few seconds. Run it rarely, at a quiet moment.
``start_app`` runs in a ``finally``, whatever happens.

In a vhost of its own: one jobflow worker (``dramatiq jobflow.actors bench_jobflow_worker -p 1 -t 8``);
JOBS jobs with delays spread uniformly over MIN-MAX s, scheduled with ``BrokerJobScheduler.schedule``
(or ``--bulk``: the same bytes, many confirms in flight); KILL_AT s after the last publish the worker
gets SIGKILL (no shutdown, no ack) and a new one starts; OUTAGE_AT s after the last publish
RabbitMQ's application stops for OUTAGE s. Then: did every job run, how often, and how late,
counted from its due time or, for a job the outage caught (due before the outage ended and not
started before it began), from the end of the outage.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
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
from jobflow.broker.names import delay_queues, jobs_queue
from jobflow.broker.queues import QueueType
from jobflow.log_config import configure_logging
from recording import DURABILITY, RecordReader

PREFIX = "durable"
SETTLE_S = 1.5  # rabbitmqctl boots an Erlang VM (about a second of CPU): let the machine settle after it
LATE_MS = 250.0  # the precision bound: later than this beyond its due time (or the outage's end) is "late"


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
    queue_type: QueueType
    wait_s: float


@dataclass
class Window:
    """A span during which jobs could not run: the worker, or the broker, was down."""

    what: str
    how: str
    start_ms: float = 0.0
    end_ms: float = 0.0
    pending: int = 0  # delayed jobs waiting in the ladder just before it began
    unacked: int = 0  # messages held unacknowledged by any consumer just before it began


def now_ms() -> float:
    return time.time() * 1000


@dataclass
class Bench:
    """One run: its vhost, its worker, the outages it caused."""

    cfg: Config
    vhost: str
    url: str
    logs: Path
    windows: list[Window] = field(default_factory=list)
    broker_stopped: bool = False

    @property
    def results(self) -> Path:
        return self.logs / "results.jsonl"

    def settings(self) -> Settings:
        return Settings(
            broker_url=self.url,
            queue_prefix=PREFIX,
            queue_type=self.cfg.queue_type,
            delay_queue_type=self.cfg.queue_type,
        )

    def start_worker(self, index: int) -> WorkerProcess:
        env = {
            "JOBFLOW_BROKER_URL": self.url,
            "JOBFLOW_QUEUE_PREFIX": PREFIX,
            "JOBFLOW_QUEUE_TYPE": self.cfg.queue_type,
            "JOBFLOW_DELAY_QUEUE_TYPE": self.cfg.queue_type,
            "JOBFLOW_LOG_FORMAT": "json",
            "BENCH_RESULTS": str(self.results),
        }
        args = ["jobflow.actors", "bench_jobflow_worker", "-p", "1", "-t", "8"]
        worker = WorkerProcess(args, env, self.logs / f"worker-{index}.log")
        wait_for_consumers(self.url, [jobs_queue(PREFIX)])
        return worker

    def publish(self, delays: list[int]) -> float:
        """Schedule every job; returns jobs per second."""
        t0 = time.perf_counter()
        if self.cfg.bulk:
            bulk_publish(self.url, jobflow_items(PREFIX, DURABILITY, delays), len(delays))
        else:
            with BrokerJobScheduler(settings=self.settings()) as scheduler:
                for n, delay in enumerate(delays):
                    scheduler.schedule(BenchDelay(tag=DURABILITY, n=n), delay=timedelta(milliseconds=delay))
        return len(delays) / (time.perf_counter() - t0)

    def begin(self, window: Window) -> Window:
        """Count what waits in the ladder and what any consumer holds, then start the outage's clock."""
        table = queue_table(self.vhost)
        ladder = set(delay_queues(PREFIX))
        window.pending = sum(q.messages for name, q in table.items() if name in ladder)
        window.unacked = sum(q.unacked for q in table.values())
        time.sleep(SETTLE_S)
        window.start_ms = now_ms()
        self.windows.append(window)
        return window

    def crash_worker(self, worker: WorkerProcess) -> WorkerProcess:
        window = self.begin(Window("worker down", "SIGKILL .. new worker consuming"))
        worker.kill()
        time.sleep(1)
        replacement = self.start_worker(2)
        window.end_ms = now_ms()
        return replacement

    def restart_broker(self) -> None:
        window = self.begin(Window("RabbitMQ down", "stop_app .. start_app and await_startup returned"))
        self.broker_stopped = True
        rabbitmqctl("stop_app")
        time.sleep(self.cfg.outage_s)
        self.ensure_broker()
        window.end_ms = now_ms()

    def ensure_broker(self) -> None:
        if self.broker_stopped:
            rabbitmqctl("start_app")
            rabbitmqctl("await_startup")
            self.broker_stopped = False

    def wait_all(self, reader: RecordReader) -> None:
        deadline = time.monotonic() + self.cfg.max_s + self.cfg.wait_s
        while len({r["n"] for r in reader.poll()}) < self.cfg.jobs and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)  # late duplicates


def sleep_until(t0: float, at_s: float) -> None:
    time.sleep(max(0.0, t0 + at_s - time.monotonic()))


@dataclass
class Outcome:
    records: list[dict[str, Any]]
    windows: list[Window]
    rate: float
    leftover: int
    t_last_publish_ms: float


def run(cfg: Config, logs: Path) -> Outcome:
    rng = random.Random(cfg.seed)
    delays = [rng.randint(int(cfg.min_s * 1000), int(cfg.max_s * 1000)) for _ in range(cfg.jobs)]
    with temporary_vhost("bench-durability") as (vhost, url):
        bench = Bench(cfg, vhost, url, logs)
        reader = RecordReader(str(bench.results))
        try:
            BrokerJobScheduler(settings=bench.settings()).close()  # the queue and the ladder
            worker = bench.start_worker(1)
            try:
                rate = bench.publish(delays)
                t0, t_last_publish_ms = time.monotonic(), now_ms()
                print(f"published {cfg.jobs:,} at {rate:,.0f}/s", file=sys.stderr)
                sleep_until(t0, cfg.kill_at - SETTLE_S)
                worker = bench.crash_worker(worker)
                print("worker killed and replaced", file=sys.stderr)
                if cfg.broker_restart:
                    sleep_until(t0, cfg.outage_at - SETTLE_S)
                    bench.restart_broker()
                    print("RabbitMQ restarted", file=sys.stderr)
                bench.wait_all(reader)
                leftover = sum(q.messages for q in queue_table(vhost).values())
            finally:
                worker.stop()
        finally:
            bench.ensure_broker()  # whatever happened, RabbitMQ runs again
    return Outcome(reader.poll(), bench.windows, rate, leftover, t_last_publish_ms)


def _dist(xs: list[float]) -> str:
    if not xs:
        return "none"
    return f"{len(xs):,} jobs: p50 {percentile(xs, 50):,.1f}, p99 {percentile(xs, 99):,.1f}, max {max(xs):,.1f} ms"


def report(cfg: Config, out: Outcome) -> list[str]:
    first: dict[int, dict[str, Any]] = {}
    for rec in sorted(out.records, key=lambda r: r["started_ms"]):
        first.setdefault(rec["n"], rec)
    normal: list[float] = []
    after: dict[str, list[float]] = {w.what: [] for w in out.windows}
    for rec in first.values():
        # Caught by an outage: due before it ended and not started before it began.
        window = next((w for w in out.windows if rec["due_ms"] <= w.end_ms and rec["started_ms"] >= w.start_ms), None)
        if window is None:
            normal.append(rec["started_ms"] - rec["due_ms"])
        else:
            after[window.what].append(rec["started_ms"] - max(rec["due_ms"], window.end_ms))
    late = [x for x in normal + [x for xs in after.values() for x in xs] if x > LATE_MS]
    worst = f" (max {max(late):,.0f} ms)" if late else ""
    rows = [
        ("ran at least once", f"{len(first):,} / {cfg.jobs:,}"),
        ("messages left in the vhost (at the end)", f"{out.leftover:,}"),
        ("executions beyond the first", f"{len(out.records) - len(first):,}"),
        ("started before due", f"{sum(1 for r in first.values() if r['started_ms'] < r['due_ms']):,}"),
        ("not caught by an outage: lateness", _dist(normal)),
        *((f"caught while {w.what}: late beyond its end", _dist(after[w.what])) for w in out.windows),
        (f"late by > {LATE_MS:.0f} ms beyond due or outage end", f"{len(late):,}{worst}"),
    ]
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
    parser.add_argument("--bulk", action="store_true", help="publish with many confirms in flight")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--queue-type", choices=["classic", "quorum"], default="classic", help="jobflow's queues")
    parser.add_argument("--wait", type=float, default=60.0, help="s to wait for stragglers past the last due time")
    a = parser.parse_args(argv)
    return Config(
        jobs=a.jobs,
        min_s=a.min_delay,
        max_s=a.max_delay,
        kill_at=a.kill_at,
        outage_at=a.outage_at,
        outage_s=a.outage,
        broker_restart=not a.no_broker_restart,
        bulk=a.bulk,
        seed=a.seed,
        queue_type=a.queue_type,
        wait_s=a.wait,
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    configure_logging("console", "WARNING")
    logs = Path(tempfile.mkdtemp(prefix="jobflow-durability-"))
    started, load_before = datetime.now(UTC), load_average()
    t0 = time.monotonic()
    out = run(cfg, logs)
    how = "bulk" if cfg.bulk else "BrokerJobScheduler.schedule"
    print(
        f"Durability: jobflow's delay ladder on {cfg.queue_type} queues, {cfg.jobs:,} jobs due"
        f" {cfg.min_s:g}-{cfg.max_s:g} s after publishing -- {started:%Y-%m-%d %H:%M} UTC"
    )
    print(f"load average (1/5/15 min): {load_before} at start, {load_average()} at end; {time.monotonic() - t0:.0f} s")
    print(f"published at {out.rate:,.0f}/s ({how}, confirmed); logs and records in {logs}")
    for w in out.windows:
        start, end = (w.start_ms - out.t_last_publish_ms) / 1000, (w.end_ms - out.t_last_publish_ms) / 1000
        print(
            f"  {w.what} ({w.how}): {start:.1f} .. {end:.1f} s after the last publish ({end - start:.1f} s);"
            f" just before: {w.pending:,} jobs in the ladder, {w.unacked:,} messages unacked"
        )
    print("\n".join(report(cfg, out)))


if __name__ == "__main__":
    main()
