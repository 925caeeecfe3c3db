"""Throughput against raw Dramatiq, in one run on one broker: worker drain, end-to-end latency, publishing.

    .venv/bin/python benchmarks/throughput.py [--n 10000] [--rounds 2] [--latency-n 200] [--no-publish]

- **Worker drain** (jobs/s and the worker's CPU µs per job): a queue is filled with ``--n`` trivial
  messages, then one worker process starts (``dramatiq -p 1 -t 8``, Dramatiq's defaults) and drains
  it. The rate is taken between 10 % and 90 % drained (by the queue's ready count, polled every
  10 ms), so the worker's boot and the tail are left out; CPU is the forked worker process's
  ``utime + stime`` over the same window. jobflow's worker logs at its default level (INFO, JSON,
  two events per job) into a file; raw Dramatiq logs nothing per message. jobflow's queues are
  quorum by default, Dramatiq's classic: a third row runs jobflow on classic queues.
- **Latency**: ``schedule_now`` (Dramatiq: ``send``) to the first line of ``execute`` on an idle
  worker, one job every 20 ms.
- **Publishing**: ``publish.py``'s rows (see there).

Best of ``--rounds`` for each rate. Each run uses a vhost of its own, deleted afterwards with all in it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dramatiq
import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker

import jobflow
import publish
from benchlib import WorkerProcess, bulk_publish, load_average, percentile, temporary_vhost
from jobflow import Settings
from jobflow.log_config import configure_logging
from tp_jobs import RAW_ASYNC, RAW_LATENCY, RAW_SYNC, TpAsync, TpLatency, TpSync

TICK = os.sysconf("SC_CLK_TCK")
THREADS = 8


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class Drain:
    """Rate and CPU of one worker process draining a filled queue, between 10 % and 90 % drained."""

    def __init__(self, url: str, queue: str, total: int) -> None:
        self.url, self.queue, self.total = url, queue, total

    def ready(self, channel: Any) -> int:
        return int(channel.queue_declare(self.queue, passive=True).method.message_count or 0)

    def run(self, worker: WorkerProcess, timeout: float = 120) -> tuple[float, float]:
        pid = worker.consumer_pid()
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            channel = connection.channel()
            edge = self.total // 10
            start: tuple[float, float, int] | None = None
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                ready, now = self.ready(channel), time.perf_counter()
                if start is None and ready <= self.total - edge:
                    start = (now, cpu_seconds(pid), ready)
                elif start is not None and ready <= edge:
                    jobs = start[2] - ready
                    return jobs / (now - start[0]), (cpu_seconds(pid) - start[1]) / jobs * 1e6
                time.sleep(0.01)
            raise TimeoutError(f"{self.queue}: not drained in {timeout} s (see {worker.log_path})")
        finally:
            connection.close()

    def purge(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            connection.channel().queue_purge(self.queue)
        finally:
            connection.close()


class Bench:
    def __init__(self, url: str, n: int, work: Path) -> None:
        self.url, self.n, self.work = url, n, work
        self.results = work / "latency.txt"
        self.raw_broker = RabbitmqBroker(url=url, confirm_delivery=True)
        self.raw_actors = {
            name: dramatiq.actor(actor_name=name, queue_name=name, broker=self.raw_broker)(_nothing)
            for name in (RAW_SYNC, RAW_ASYNC, RAW_LATENCY)
        }

    def jobflow_settings(self, queue_type: str) -> Settings:
        return Settings(broker_url=self.url, queue_prefix=f"tp-{queue_type}", queue_type=queue_type)

    def jobflow_env(self, queue_type: str) -> dict[str, str]:
        return {
            "JOBFLOW_BROKER_URL": self.url,
            "JOBFLOW_QUEUE_PREFIX": f"tp-{queue_type}",
            "JOBFLOW_QUEUE_TYPE": queue_type,
            "JOBFLOW_LOG_FORMAT": "json",
            "BENCH_RESULTS": str(self.results),
        }

    @contextmanager
    def worker(self, args: list[str], env: Mapping[str, str], label: str) -> Iterator[WorkerProcess]:
        process = WorkerProcess([*args, "-p", "1", "-t", str(THREADS)], env, self.work / f"{label}.log")
        try:
            yield process
        finally:
            process.stop()

    def jobflow_worker(self, queue_type: str, label: str) -> Any:
        return self.worker(["jobflow.actors", "tp_jobs"], self.jobflow_env(queue_type), label)

    def raw_worker(self, label: str) -> Any:
        env = {"BENCH_BROKER_URL": self.url, "BENCH_RESULTS": str(self.results)}
        return self.worker(["tp_dramatiq_worker"], env, label)

    def drain_jobflow(self, queue_type: str, job: Callable[[int], jobflow.Job]) -> tuple[float, float]:
        with jobflow.BrokerJobScheduler(settings=self.jobflow_settings(queue_type)) as scheduler:
            scheduler.schedule_many(job(i) for i in range(self.n))
            drain = Drain(self.url, scheduler.queue, self.n)
        try:
            with self.jobflow_worker(queue_type, f"drain-{queue_type}") as process:
                return drain.run(process)
        finally:
            drain.purge()

    def drain_raw(self, queue: str) -> tuple[float, float]:
        self.raw_actors[queue].send(-1)  # Dramatiq declares the queue (and .DQ, .XQ) on its first send
        items = (("", queue, dramatiq.Message(queue, queue, (i,), {}, {}).encode()) for i in range(self.n - 1))
        bulk_publish(self.url, items, self.n - 1)
        drain = Drain(self.url, queue, self.n)
        try:
            with self.raw_worker(f"drain-{queue}") as process:
                return drain.run(process)
        finally:
            drain.purge()

    def latency(self, side: str, count: int) -> list[float]:
        self.results.unlink(missing_ok=True)
        if side == "jobflow":
            with (
                jobflow.BrokerJobScheduler(settings=self.jobflow_settings("quorum")) as scheduler,
                self.jobflow_worker("quorum", "latency-jobflow"),
            ):
                scheduler.schedule_now(TpLatency(sent_ms=time.time() * 1000))  # connected; the worker is up
                self._wait_for(1)
                self.results.unlink()
                for _ in range(count):
                    scheduler.schedule_now(TpLatency(sent_ms=time.time() * 1000))
                    time.sleep(0.02)
                return self._wait_for(count)
        with self.raw_worker("latency-dramatiq"):
            actor = self.raw_actors[RAW_LATENCY]
            actor.send(time.time() * 1000)
            self._wait_for(1)
            self.results.unlink()
            for _ in range(count):
                actor.send(time.time() * 1000)
                time.sleep(0.02)
            return self._wait_for(count)

    def _wait_for(self, count: int, timeout: float = 60) -> list[float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.results.read_text().splitlines() if self.results.exists() else []
            if len(lines) >= count:
                return [float(line.split()[1]) for line in lines]
            time.sleep(0.1)
        raise TimeoutError(f"{count} latency jobs did not all run in {timeout} s (see {self.work})")


def _nothing(*_args: object) -> None:
    """The producer's stand-in for the raw actors: it only sends to them."""


def best(rounds: int, run: Callable[[], tuple[float, float]]) -> tuple[float, float]:
    """The best rate of ``rounds``, with the CPU µs per job of that round."""
    return max((run() for _ in range(rounds)), key=lambda result: result[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10000, help="messages per worker drain")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency-n", type=int, default=200)
    parser.add_argument("--no-publish", action="store_true", help="leave out publish.py's rows")
    args = parser.parse_args()
    configure_logging("json", "INFO", stream=open(os.devnull, "w"))  # noqa: SIM115 (for the whole run)
    work = Path(tempfile.mkdtemp(prefix="jobflow-throughput-"))
    started, load_before = time.monotonic(), load_average()
    rows: list[tuple[str, str, str, str, str]] = []

    def rate_row(label: str, ours: tuple[float, float], theirs: tuple[float, float], goal: str) -> None:
        rows.append(
            (label, f"{ours[0]:,.0f} ({ours[1]:.0f} µs)", f"{theirs[0]:,.0f} ({theirs[1]:.0f} µs)",
             f"{ours[0] / theirs[0]:.2f}", goal)
        )  # fmt: skip

    with temporary_vhost("bench-tp") as (_vhost, url):
        bench = Bench(url, args.n, work)
        try:
            raw_sync = best(args.rounds, lambda: bench.drain_raw(RAW_SYNC))
            raw_async = best(args.rounds, lambda: bench.drain_raw(RAW_ASYNC))
            ours_sync = best(args.rounds, lambda: bench.drain_jobflow("quorum", lambda i: TpSync(n=i)))
            ours_async = best(args.rounds, lambda: bench.drain_jobflow("quorum", lambda i: TpAsync(n=i)))
            ours_classic = best(args.rounds, lambda: bench.drain_jobflow("classic", lambda i: TpSync(n=i)))
            rate_row("worker: sync jobs/s (worker CPU/job)", ours_sync, raw_sync, ">= 0.9")
            rate_row("worker: async jobs/s (worker CPU/job)", ours_async, raw_async, ">= 0.9")
            rate_row("worker: sync, jobflow on classic queues", ours_classic, raw_sync, "")
            ours_latency = bench.latency("jobflow", args.latency_n)
            raw_latency = bench.latency("dramatiq", args.latency_n)
            for p in (50, 99):
                mine, theirs = percentile(ours_latency, p), percentile(raw_latency, p)
                goal = "<= 20 ms" if p == 99 else ""
                rows.append((f"latency to execute p{p} (ms)", f"{mine:.1f}", f"{theirs:.1f}", "", goal))
            rows.append(("latency max (ms)", f"{max(ours_latency):.1f}", f"{max(raw_latency):.1f}", "", ""))
        finally:
            bench.raw_broker.close()
    if not args.no_publish:
        with temporary_vhost("bench-publish") as (_vhost, url):
            published = publish.measure(url, 2000, 10000, args.rounds)
        raw, sent = published[publish.RAW_PIKA], published[publish.DRAMATIQ_SEND]
        for label, bar, goal in [
            (publish.SCHEDULE_NOW, raw, ">= 0.9 x raw pika"),
            (publish.SCHEDULE_DELAYED, raw, ">= 0.9 x raw pika"),
            (publish.MANY_NOW, sent, ">= 5 x Dramatiq send"),
            (publish.MANY_DELAYED, sent, ">= 5 x Dramatiq send"),
        ]:
            _label, rate, micros = published[label]
            rows.append(
                (f"publish: {label} msg/s (CPU/msg)", f"{rate:,.0f} ({micros:.0f} µs)",
                 f"{bar[1]:,.0f} ({bar[2]:.0f} µs) {'raw pika' if bar is raw else 'send'}",
                 f"{rate / bar[1]:.2f}", goal)
            )  # fmt: skip
    print(
        f"jobflow {jobflow.__version__ if hasattr(jobflow, '__version__') else ''} against raw Dramatiq "
        f"{dramatiq.__version__}, {args.n:,} jobs per drain, best of {args.rounds}; load {load_before} -> "
        f"{load_average()}; {time.monotonic() - started:.0f} s; logs in {work}\n"
    )
    header = ("measurement", "jobflow", "Dramatiq / raw", "ratio", "goal")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
