"""Cancel latency, cancel throughput and the worker memory held per outstanding cancel.

    .venv/bin/python benchmarks/cancel.py [--url amqp://...] [--latency-n 500] [--bulk-n 10000]

On a real RabbitMQ (default 127.0.0.1:5672, guest; or ``BENCH_AMQP_URL``), under a queue prefix of
its own whose cancel stream it deletes at the end. A :class:`CancelReader` in this process plays a
running worker's part: for each cancel it records when the record reached it.

- *latency*: ``scheduler.cancel(id)`` one at a time; how long the call took (until RabbitMQ
  confirmed the record), and when the reader had it, counted from the call's start;
- *bulk*: ``cancel_many`` of N ids, confirms pipelined;
- *memory*: what a worker's :class:`~jobflow.cancel.CancelSet` holds per outstanding cancel
  (tracemalloc, 100,000 cancels of jobflow ids due within a day).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pika

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jobflow
from benchlib import load_average, percentile
from jobflow.broker.cancels import CancelReader
from jobflow.broker.names import cancel_stream
from jobflow.cancel import CancelSet
from jobflow.job_ids import new_job_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--latency-n", type=int, default=500)
    parser.add_argument("--bulk-n", type=int, default=10_000)
    args = parser.parse_args()
    jobflow.configure_logging(level="WARNING")  # a line per cancel would measure the terminal
    prefix = f"bench-cancel-{uuid.uuid4().hex[:8]}"
    settings = jobflow.Settings(broker_url=args.url, queue_prefix=prefix)
    seen: dict[str, float] = {}
    cancels = CancelSet()
    scheduler = jobflow.BrokerJobScheduler(settings=settings)
    broker = scheduler.broker
    reader = CancelReader(
        broker.parameters,  # type: ignore[attr-defined]
        cancel_stream(prefix),
        cancels,
        on_record=lambda job_id, _ms: None if job_id in seen else seen.update({job_id: time.perf_counter()}),
    )
    try:
        scheduler.cancel(str(uuid.uuid4()))  # declares the stream
        reader.start()
        assert reader.wait_ready(30), "the reader did not catch up"
        soon = datetime.now(UTC) + timedelta(hours=1)
        calls, visible = [], []
        for _ in range(args.latency_n):
            job_id = new_job_id(soon)
            t0 = time.perf_counter()
            scheduler.cancel(job_id)
            calls.append((time.perf_counter() - t0) * 1000)
            deadline = time.monotonic() + 10
            while job_id not in seen and time.monotonic() < deadline:
                time.sleep(0.0002)
            visible.append((seen.get(job_id, float("nan")) - t0) * 1000)
        ids = [new_job_id(soon) for _ in range(args.bulk_n)]
        t0 = time.perf_counter()
        scheduler.cancel_many(ids)
        bulk_s = time.perf_counter() - t0
        deadline = time.monotonic() + 60
        while not all(i in seen for i in ids[-100:]) and time.monotonic() < deadline:
            time.sleep(0.01)
        bulk_visible_s = max(seen.get(i, float("nan")) for i in ids) - t0
    finally:
        reader.stop()
        with pika.BlockingConnection(pika.URLParameters(args.url)) as connection:
            connection.channel().queue_delete(cancel_stream(prefix))
        scheduler.close()

    per_cancel = memory_per_cancel(100_000)
    print(f"\njobflow cancel benchmark: RabbitMQ at {broker.publisher.shown}, load {load_average()}")  # type: ignore[attr-defined]
    print("| measure | p50 | p99 | max |")
    print("|---|---|---|---|")
    for label, values in (("cancel() call, until confirmed (ms)", calls), ("known to a running worker (ms)", visible)):
        print(f"| {label} | {percentile(values, 50):.2f} | {percentile(values, 99):.2f} | {max(values):.2f} |")
    print(
        f"\ncancel_many({args.bulk_n:,}): {bulk_s * 1000:.0f} ms, {args.bulk_n / bulk_s:,.0f} cancels/s;"
        f" all known to the worker after {bulk_visible_s * 1000:.0f} ms"
    )
    print(f"worker memory per outstanding cancel: {per_cancel:.0f} bytes (100,000 held)")


def memory_per_cancel(count: int) -> float:
    due = datetime.now(UTC) + timedelta(days=1)
    ids = [new_job_id(due) for _ in range(count)]  # the ids arrive as strings in the records
    until = int(due.timestamp() * 1000)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cancels = CancelSet()
    for job_id in ids:
        cancels.add("".join(job_id), until)  # a fresh string, as a decoded record gives
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(cancels) == count
    return (after - before) / count


if __name__ == "__main__":
    main()
