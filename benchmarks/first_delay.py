"""The first delayed job of a fresh process: is it as punctual as the rest?

    .venv/bin/python benchmarks/first_delay.py [--rounds 10]

Each round, in a vhost of this run's own, a fresh Python process opens a ``BrokerJobScheduler`` on a
new queue prefix (so it connects and declares the whole ladder first, the worst case) and at once
schedules 20 jobs with delays drawn from 0.2-5 s, the first before anything is connected. This
process reads the jobs queue (raw pika, no worker in between) and records, per job, the time it
arrived minus the ``due_ms`` it carries. The first job of each process against all the others.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid

import pika
from dramatiq.common import current_millis

from benchlib import ROOT, load_average, percentile, temporary_vhost
from jobflow.broker.ladder import DelayTopology
from jobflow.broker.names import jobs_queue
from jobflow.middleware.due_time import DUE_OPTION

PRODUCER = """
import random, sys
from datetime import timedelta
import jobflow
from bench_jobs import BenchDelay
settings = jobflow.Settings(broker_url=sys.argv[1], queue_prefix=sys.argv[2])
rng = random.Random(int(sys.argv[3]))
with jobflow.BrokerJobScheduler(settings=settings) as scheduler:
    for n in range(20):
        scheduler.schedule(BenchDelay(tag="first" if n == 0 else "rest", n=n),
                           delay=timedelta(milliseconds=rng.randint(200, 5000)))
"""


def one_round(url: str, seed: int, *, declared: bool) -> tuple[float, list[float]]:
    prefix = f"fd-{uuid.uuid4().hex[:8]}"
    queue = jobs_queue(prefix)
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    try:
        if declared:  # as in a deployment: a worker declared the ladder when it booted
            DelayTopology(prefix).declare(channel)
        subprocess.run(
            [sys.executable, "-c", PRODUCER, url, prefix, str(seed)],
            cwd=ROOT / "benchmarks",
            check=True,
            timeout=120,
            env={"JOBFLOW_LOG_LEVEL": "WARNING", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "benchmarks")},
        )
        first: float | None = None
        rest: list[float] = []
        deadline = time.monotonic() + 30
        for method, _properties, body in channel.consume(queue, inactivity_timeout=1):
            if method is not None and body is not None:
                arrived = current_millis()
                message = json.loads(body)
                late = arrived - message["options"][DUE_OPTION]
                if message["args"][0]["data"]["tag"] == "first":
                    first = late
                else:
                    rest.append(late)
                channel.basic_ack(int(method.delivery_tag or 0))
            if (first is not None and len(rest) == 19) or time.monotonic() > deadline:
                break
        channel.cancel()
        assert first is not None, "the first job never arrived"
        return first, rest
    finally:
        # 40 quorum queues a round: delete them, a small broker (1,024 open files) holds few hundred.
        channel = connection.channel()
        for name in (queue, f"{queue}.XQ", f"{queue}.DQ"):
            channel.queue_delete(name)
        DelayTopology(prefix).delete(channel)
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    table: list[str] = []
    with temporary_vhost("bench-first-delay") as (_vhost, url):
        for declared in (True, False):
            firsts: list[float] = []
            rests: list[float] = []
            for seed in range(args.rounds):
                first, rest = one_round(url, seed, declared=declared)
                firsts.append(first)
                rests.extend(rest)
                print(
                    f"ladder {'declared' if declared else 'absent'}, round {seed}: first job {first:.0f} ms late,"
                    f" the others p50 {percentile(rest, 50):.0f} ms",
                    flush=True,
                )
            label = "ladder declared by a worker" if declared else "no ladder yet (the producer declares it)"
            for what, values in (("first job", firsts), ("the other 19", rests)):
                table.append(
                    f"| {label} | {what} ({len(values)}) | {percentile(values, 50):.0f} |"
                    f" {percentile(values, 99):.0f} | {max(values):.0f} |"
                )
    print(f"\nload average {load_average()}\n")
    print("| | jobs | lateness p50 ms | p99 ms | max ms |\n|---|---|---|---|---|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
