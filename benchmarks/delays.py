"""Delays: jobflow's broker-side TTL ladder against Dramatiq's native ``delay=``, same broker, same run.

    .venv/bin/python benchmarks/delays.py            # 2,000 precision jobs, N = 100,000 (2.5-4 minutes)
    .venv/bin/python benchmarks/delays.py --quick    # 500 jobs over 5 s, N = 10,000 (about 75 s)

For each side in turn, in a vhost of its own on the same RabbitMQ (deleted afterwards), with one
worker process (``dramatiq -p 1 -t THREADS``) started as a separate process:

1. precision: jobs with delays spread uniformly over 0-SPREAD s, published through the side's public
   API (``BrokerJobScheduler.schedule`` / ``actor.send_with_options(delay=)``), one confirm each;
   lateness = when the job started minus when it was due;
2. memory: the worker's RSS (``VmRSS`` of the forked worker process) once settled with no pending
   delayed job, then once settled with N one-hour jobs pending (published in bulk with pika's
   callback API, many confirms in flight, byte for byte the messages the side's ``enqueue`` writes);
3. starvation: a 1 s job scheduled after those N jobs through the public API; its lateness, or
   "did not run" after waiting CAP s past its due time.

Then one side-by-side table.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.common import current_millis, dq_name

from bench_jobs import BenchDelay
from benchlib import (
    Item,
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
from jobflow.broker.names import jobs_queue
from jobflow.broker.queues import QueueType
from jobflow.log_config import configure_logging
from recording import FILLER, PRECISION, PROBE, RAW_ACTOR, RAW_QUEUE, RecordReader

HOUR_MS = 3_600_000
PROBE_DELAY_MS = 1_000
PREFIX = "bench"

# The bounds for jobflow.
P99_BOUND_MS, MAX_BOUND_MS, RSS_BOUND_MB = 50.0, 250.0, 5.0


class Side(Protocol):
    """One delay mechanism under test: its worker, its public scheduling call, its filler messages."""

    name: str
    label: str

    def worker_args(self, threads: int) -> list[str]: ...
    def worker_env(self, url: str, results: Path) -> dict[str, str]: ...
    def consumed_queues(self) -> list[str]: ...
    def open(self, url: str) -> None: ...
    def schedule(self, tag: str, n: int, delay_ms: int) -> None: ...
    def filler(self, count: int, delay_ms: int) -> Iterator[Item]: ...
    def close(self) -> None: ...


class JobflowSide:
    name = "jobflow"

    def __init__(self, queue_type: QueueType = "classic") -> None:
        self.queue_type: QueueType = queue_type
        self.label = "jobflow" if queue_type == "classic" else f"jobflow ({queue_type})"
        self.scheduler: BrokerJobScheduler | None = None

    def worker_args(self, threads: int) -> list[str]:
        return ["jobflow.actors", "bench_jobflow_worker", "-p", "1", "-t", str(threads)]

    def worker_env(self, url: str, results: Path) -> dict[str, str]:
        return {
            "JOBFLOW_BROKER_URL": url,
            "JOBFLOW_QUEUE_PREFIX": PREFIX,
            "JOBFLOW_QUEUE_TYPE": self.queue_type,
            "JOBFLOW_DELAY_QUEUE_TYPE": self.queue_type,
            "JOBFLOW_LOG_FORMAT": "json",
            "BENCH_RESULTS": str(results),
        }

    def consumed_queues(self) -> list[str]:
        return [jobs_queue(PREFIX)]

    def open(self, url: str) -> None:
        self.settings = Settings(
            broker_url=url, queue_prefix=PREFIX, queue_type=self.queue_type, delay_queue_type=self.queue_type
        )
        self.scheduler = BrokerJobScheduler(settings=self.settings)  # declares the queue and the ladder

    def schedule(self, tag: str, n: int, delay_ms: int) -> None:
        assert self.scheduler is not None
        self.scheduler.schedule(BenchDelay(tag=tag, n=n), delay=timedelta(milliseconds=delay_ms))

    def filler(self, count: int, delay_ms: int) -> Iterator[Item]:
        return jobflow_items(PREFIX, FILLER, itertools.repeat(delay_ms, count))

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()


def _never_called(tag: str, n: int, due_ms: int) -> None:
    raise AssertionError("the producer's copy of the raw actor only sends")


class DramatiqSide:
    name, label = "dramatiq", "Dramatiq native"

    def __init__(self) -> None:
        self.broker: RabbitmqBroker | None = None

    def worker_args(self, threads: int) -> list[str]:
        return ["bench_dramatiq_worker", "-p", "1", "-t", str(threads)]

    def worker_env(self, url: str, results: Path) -> dict[str, str]:
        return {"BENCH_BROKER_URL": url, "BENCH_RESULTS": str(results)}

    def consumed_queues(self) -> list[str]:
        return [RAW_QUEUE, dq_name(RAW_QUEUE)]

    def open(self, url: str) -> None:
        self.broker = RabbitmqBroker(url=url, confirm_delivery=True)
        self.actor: dramatiq.Actor[[str, int, int], None] = dramatiq.Actor(
            _never_called, broker=self.broker, actor_name=RAW_ACTOR, queue_name=RAW_QUEUE, priority=0, options={}
        )
        self.broker.declare_queue(RAW_QUEUE)

    def schedule(self, tag: str, n: int, delay_ms: int) -> None:
        self.actor.send_with_options(args=(tag, n, current_millis() + delay_ms), delay=delay_ms or None)

    def filler(self, count: int, delay_ms: int) -> Iterator[Item]:
        """What ``RabbitmqBroker.enqueue(message, delay=)`` publishes: the message on ``<q>.DQ`` with its eta."""
        queue = dq_name(RAW_QUEUE)
        for n in range(count):
            eta = current_millis() + delay_ms
            message: dramatiq.Message[Any] = dramatiq.Message(
                queue_name=queue, actor_name=RAW_ACTOR, args=(FILLER, n, eta), kwargs={}, options={"eta": eta}
            )
            yield "", queue, message.encode()

    def close(self) -> None:
        if self.broker is not None:
            self.broker.close()


@dataclass
class SideResult:
    label: str
    scheduled: int = 0
    ran: int = 0
    lateness: list[float] = field(default_factory=list)
    arrived_early: list[float] = field(default_factory=list)
    precision_publish_rate: float = 0.0
    rss_idle_mb: float = 0.0
    rss_loaded_mb: float = 0.0
    held_unacked: int = 0
    filler_rate: float = 0.0
    probe_lateness: float | None = None


@dataclass(frozen=True)
class Config:
    jobs: int
    spread_ms: int
    filler: int
    cap_s: float
    threads: int
    seed: int
    queue_type: QueueType


def wait_records(reader: RecordReader, tag: str, count: int, deadline: float) -> dict[int, dict[str, Any]]:
    """The first execution of each job ``n`` with this tag, once ``count`` ran or at ``deadline``."""
    while True:
        first: dict[int, dict[str, Any]] = {}
        for rec in reader.poll():
            if rec["tag"] == tag:
                first.setdefault(rec["n"], rec)
        if len(first) >= count or time.monotonic() > deadline:
            return first
        time.sleep(0.1)


def run_precision(side: Side, reader: RecordReader, delays: list[int], result: SideResult) -> None:
    t0 = time.perf_counter()
    for n, delay in enumerate(delays):
        side.schedule(PRECISION, n, delay)
    result.precision_publish_rate = len(delays) / (time.perf_counter() - t0)
    ran = wait_records(reader, PRECISION, len(delays), time.monotonic() + max(delays) / 1000 + 30)
    result.scheduled, result.ran = len(delays), len(ran)
    result.lateness = [r["started_ms"] - r["due_ms"] for r in ran.values()]
    result.arrived_early = [r["due_ms"] - r["arrived_ms"] for r in ran.values() if r["arrived_ms"] < r["due_ms"]]


def run_side(side: Side, cfg: Config, delays: list[int], logs: Path) -> SideResult:
    result = SideResult(label=side.label)
    print(f"[{side.name}] load {load_average()}", file=sys.stderr)
    with temporary_vhost(f"bench-{side.name}") as (vhost, url):
        results = logs / f"{side.name}-results.jsonl"
        reader = RecordReader(str(results))
        side.open(url)
        log_path = logs / f"{side.name}-worker.log"
        worker = WorkerProcess(side.worker_args(cfg.threads), side.worker_env(url, results), log_path)
        try:
            wait_for_consumers(url, side.consumed_queues())
            print(f"[{side.name}] precision: {cfg.jobs} jobs over 0-{cfg.spread_ms} ms", file=sys.stderr)
            run_precision(side, reader, delays, result)
            result.rss_idle_mb = worker.settled_rss_mib() * 1.048576
            print(f"[{side.name}] publishing {cfg.filler:,} one-hour jobs", file=sys.stderr)
            result.filler_rate = bulk_publish(url, side.filler(cfg.filler, HOUR_MS), cfg.filler)
            result.rss_loaded_mb = worker.settled_rss_mib() * 1.048576
            result.held_unacked = sum(q.unacked for q in queue_table(vhost).values())
            print(f"[{side.name}] starvation probe (1 s), waiting up to {cfg.cap_s:.0f} s", file=sys.stderr)
            side.schedule(PROBE, 0, PROBE_DELAY_MS)
            probe = wait_records(reader, PROBE, 1, time.monotonic() + PROBE_DELAY_MS / 1000 + cfg.cap_s)
            if probe:
                result.probe_lateness = probe[0]["started_ms"] - probe[0]["due_ms"]
        finally:
            worker.stop()
            side.close()
    return result


def _ms(value: float) -> str:
    return f"{value:,.1f}"


def _stat(r: SideResult, p: float | None) -> str:
    if not r.lateness:
        return "n/a"
    return _ms(max(r.lateness) if p is None else percentile(r.lateness, p))


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def _rows(cfg: Config, a: SideResult, b: SideResult) -> list[tuple[str, str, str, str]]:
    def probe(r: SideResult) -> str:
        return _ms(r.probe_lateness) if r.probe_lateness is not None else f"did not run within {cfg.cap_s:.0f} s"

    p99 = percentile(a.lateness, 99) if a.lateness else float("inf")
    top = max(a.lateness) if a.lateness else float("inf")
    early_a, early_b = (sum(1 for x in r.lateness if x < 0) for r in (a, b))
    delta_a, delta_b = a.rss_loaded_mb - a.rss_idle_mb, b.rss_loaded_mb - b.rss_idle_mb
    probe_ok = a.probe_lateness is not None and 0 <= a.probe_lateness <= P99_BOUND_MS
    n = f"{cfg.filler:,}"
    return [
        ("precision: ran / scheduled", f"{a.ran}/{a.scheduled}", f"{b.ran}/{b.scheduled}", "all"),
        ("precision: lateness p50 (ms)", _stat(a, 50), _stat(b, 50), ""),
        ("precision: lateness p99 (ms)", _stat(a, 99), _stat(b, 99),
         f"<= {P99_BOUND_MS:.0f}: {_verdict(p99 <= P99_BOUND_MS)}"),
        ("precision: lateness max (ms)", _stat(a, None), _stat(b, None),
         f"<= {MAX_BOUND_MS:.0f}: {_verdict(top <= MAX_BOUND_MS)}"),
        ("precision: started early (count)", str(early_a), str(early_b), f"0: {_verdict(early_a == 0)}"),
        ("precision: handed to a thread early (count / max ms)",
         f"{len(a.arrived_early)} / {_ms(max(a.arrived_early, default=0))}", "-", ""),
        (f"starvation: 1 s job behind {n} 1 h jobs (ms)", probe(a), probe(b),
         f"<= {P99_BOUND_MS:.0f}: {_verdict(probe_ok)}"),
        ("memory: worker RSS, 0 pending (MB)", f"{a.rss_idle_mb:.1f}", f"{b.rss_idle_mb:.1f}", ""),
        (f"memory: worker RSS, {n} pending (MB)", f"{a.rss_loaded_mb:.1f}", f"{b.rss_loaded_mb:.1f}", ""),
        ("memory: difference (MB)", f"{delta_a:+.1f}", f"{delta_b:+.1f}",
         f"<= {RSS_BOUND_MB:.0f}: {_verdict(abs(delta_a) <= RSS_BOUND_MB)}"),
        ("memory: messages held unacked by the worker", f"{a.held_unacked:,}", f"{b.held_unacked:,}", "0"),
        ("publish: precision jobs, public API (msg/s)", f"{a.precision_publish_rate:,.0f}",
         f"{b.precision_publish_rate:,.0f}", ""),
        (f"publish: {n} fillers, bulk (msg/s)", f"{a.filler_rate:,.0f}", f"{b.filler_rate:,.0f}", ""),
    ]  # fmt: skip


def print_table(cfg: Config, a: SideResult, b: SideResult, header: list[str]) -> None:
    rows = [("", a.label, b.label, "bound (jobflow)"), *_rows(cfg, a, b)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print("\n".join(header))
    for i, row in enumerate(rows):
        print(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}")
        if i == 0:
            print("-" * (sum(widths) + 6))


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="500 jobs over 5 s, N = 10,000, cap 20 s")
    parser.add_argument("--jobs", type=int, help="precision jobs (default 2,000)")
    parser.add_argument("--spread", type=float, help="precision delays spread over 0..SPREAD s (default 10)")
    parser.add_argument("-n", "--filler", type=int, help="one-hour jobs pending (default 100,000)")
    parser.add_argument("--cap", type=float, help="seconds to wait for the 1 s job past its due time (default 60)")
    parser.add_argument("--threads", type=int, default=8, help="worker threads (default 8, Dramatiq's default)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--queue-type", choices=["classic", "quorum"], default="classic", help="jobflow's queues")
    args = parser.parse_args(argv)
    quick = args.quick
    return Config(
        jobs=args.jobs or (500 if quick else 2_000),
        spread_ms=int((args.spread or (5 if quick else 10)) * 1000),
        filler=args.filler or (10_000 if quick else 100_000),
        cap_s=args.cap or (20 if quick else 60),
        threads=args.threads,
        seed=args.seed,
        queue_type=args.queue_type,
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    configure_logging("console", "WARNING")  # not a job.scheduled line per published job
    rng = random.Random(cfg.seed)
    delays = [rng.randint(0, cfg.spread_ms) for _ in range(cfg.jobs)]
    logs = Path(tempfile.mkdtemp(prefix="jobflow-bench-"))
    started, load_before = datetime.now(UTC), load_average()
    t0 = time.monotonic()
    jobflow_result = run_side(JobflowSide(cfg.queue_type), cfg, delays, logs)
    dramatiq_result = run_side(DramatiqSide(), cfg, delays, logs)
    version = rabbitmqctl("eval", "rabbit_misc:version().").strip().strip('"')
    header = [
        f"Delays: jobflow (TTL ladder in RabbitMQ) vs Dramatiq native delay= -- {started:%Y-%m-%d %H:%M} UTC",
        f"RabbitMQ {version} on 127.0.0.1, jobflow on {cfg.queue_type} queues, one vhost per side;"
        f" workers: dramatiq -p 1 -t {cfg.threads} (Dramatiq's delay-queue prefetch: {cfg.threads * 1000:,})",
        f"precision: {cfg.jobs:,} jobs, delays uniform over 0-{cfg.spread_ms / 1000:g} s (seed {cfg.seed});"
        f" starvation and memory: N = {cfg.filler:,} pending one-hour jobs",
        f"load average (1/5/15 min): {load_before} at start, {load_average()} at end; {time.monotonic() - t0:.0f} s;"
        f" {sys.platform}, worker logs and records in {logs}",
        "",
    ]
    print_table(cfg, jobflow_result, dramatiq_result, header)


if __name__ == "__main__":
    main()
