"""Cancelling jobs on a real RabbitMQ: durable, read by every worker, including one started later."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pika
import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

import jobflow
from jobflow import JobRegistry, Settings
from jobflow.broker.cancels import CancelReader
from jobflow.broker.connection import CONSUMER_DEFAULTS, cluster_parameters
from jobflow.broker.names import RUN_JOB_ACTOR, cancel_stream, jobs_queue
from jobflow.cancel import CancelSet
from jobflow.cli import main
from jobflow.job_ids import due_ms_of, new_job_id

from .faults import message_count, wait_for_consumer
from .helpers import eventually, tracked_worker
from .worker_process import WorkerProcess

ROOT = Path(__file__).resolve().parent.parent


def read_stream(settings: Settings, timeout: float = 15.0) -> CancelSet:
    """What a worker started now reads from the cancel stream."""
    cancels = CancelSet()
    reader = CancelReader(
        cluster_parameters([settings.broker_url], CONSUMER_DEFAULTS), cancel_stream(settings.queue_prefix), cancels
    )
    reader.start()
    try:
        assert reader.wait_ready(timeout), "the cancel reader did not catch up"
        return cancels
    finally:
        reader.stop()


def test_a_cancelled_job_is_skipped_and_acknowledged(registry: JobRegistry, amqp_settings: Settings) -> None:
    ran: list[str] = []

    class Probe(jobflow.Job, registry=registry):
        n: int

        def execute(self, ctx: jobflow.JobContext) -> None:
            ran.append(ctx.job_id)

    with jobflow.BrokerJobScheduler(settings=amqp_settings, registry=registry) as scheduler:
        keep = scheduler.schedule(Probe(n=1), delay=timedelta(seconds=1.5))
        drop = scheduler.schedule(Probe(n=2), delay=timedelta(seconds=1.5))
        with capture_logs() as logs, tracked_worker(scheduler.broker, registry, amqp_settings) as tracker:
            # Cancelled through another producer: this worker learns it from the stream alone.
            with jobflow.BrokerJobScheduler(settings=amqp_settings, registry=registry) as other:
                result = other.cancel(drop)
            assert result.recorded
            assert result.pending is None
            eventually(lambda: any(e["event"] == "job.cancelled" for e in logs), timeout=20, what="the skip")
            tracker.wait_for(lambda t: len(t.succeeded(RUN_JOB_ACTOR)) == 1, 20)
        assert ran == [keep]
        skipped = [e for e in logs if e["event"] == "job.cancelled"]
        assert [(e["job_id"], e["job_name"], e["attempt"]) for e in skipped] == [(drop, Probe.job_name, 1)]
        assert message_count(amqp_settings.broker_url, jobs_queue(amqp_settings.queue_prefix)) == 0  # acked
    assert drop in read_stream(amqp_settings)  # durable: a process started later still knows


def test_cancel_from_the_command_line(amqp_settings: Settings) -> None:
    ids = [str(uuid.uuid4()), new_job_id(datetime.now(UTC) + timedelta(days=400))]
    result = CliRunner().invoke(
        main,
        ["cancel", *ids, "--json", "--broker", amqp_settings.broker_url, "--prefix", amqp_settings.queue_prefix],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [row["job_id"] for row in out["cancelled"]] == ids
    assert all(row["recorded"] and row["pending"] is None for row in out["cancelled"])
    cancels = read_stream(amqp_settings)
    assert all(i in cancels for i in ids)


# --- the must-hold: 2,000 delayed, 1,000 cancelled, a worker restarted in between -----------


def worker(settings: Settings, results: Path, log: Path) -> WorkerProcess:
    env = {
        "JOBFLOW_BROKER_URL": settings.broker_url,
        "JOBFLOW_QUEUE_PREFIX": settings.queue_prefix,
        "CLUSTER_RESULTS": str(results),
    }
    return WorkerProcess("tests.cluster_app", env, log)


@pytest.fixture
def workers(amqp_settings: Settings, tmp_path: Path) -> Iterator[tuple[list[WorkerProcess], Path, Path]]:
    started: list[WorkerProcess] = []
    yield started, tmp_path / "results.jsonl", tmp_path / "workers.log"
    for worker in started:
        worker.stop()


def test_cancelled_jobs_never_run_across_a_worker_restart(
    amqp_settings: Settings, workers: tuple[list[WorkerProcess], Path, Path]
) -> None:
    """2,000 jobs delayed 5-30 s, 1,000 of them cancelled while one of two workers is down: that
    worker, started again after the cancels, and the other, running throughout, run none of the 1,000."""
    import tests.cluster_app as app

    started, results, log = workers
    queue = jobs_queue(amqp_settings.queue_prefix)
    started += [worker(amqp_settings, results, log), worker(amqp_settings, results, log)]
    eventually(lambda: _consumers(amqp_settings, queue) == 2, timeout=60, what="two workers consuming")
    started[1].stop()  # one worker down while the jobs are scheduled and cancelled
    rng = random.Random(7)
    with jobflow.BrokerJobScheduler(settings=amqp_settings) as scheduler:
        ids: list[str] = []
        for group in range(50):  # 50 delays between 5 and 30 s, 40 jobs each
            jobs = [app.ClusterProbe(kind="cancel", n=group * 40 + i) for i in range(40)]
            ids += scheduler.schedule_many(jobs, delay=timedelta(seconds=rng.uniform(5, 30)))
        n_of = {job_id: n for n, job_id in enumerate(ids)}
        first_due = min(due_ms_of(i) or 0 for i in ids)
        t0 = time.monotonic()
        cancelled = set(rng.sample(ids, 1000))
        scheduler.cancel_many(sorted(cancelled))
        cancel_s = time.monotonic() - t0
    assert time.time() * 1000 < first_due, "the cancels came after the first job was due: the test proves nothing"
    started.append(worker(amqp_settings, results, log))  # it reads the cancels from the stream's start
    wait_for_consumer(amqp_settings.broker_url, queue)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        done = _done(results)
        if len(done) >= 1000 and message_count(amqp_settings.broker_url, queue) == 0 and _ladder_empty(amqp_settings):
            break
        time.sleep(0.5)
    done = _done(results)
    ran = {n for n, _pid in done}
    cancelled_n = {n_of[i] for i in cancelled}
    pids = {pid for _n, pid in done}
    skipped = sum('"job.cancelled"' in line for line in log.read_text().splitlines())
    print(
        f"\ncancel: 2000 delayed 5-30 s, 1000 cancelled in {cancel_s * 1000:.0f} ms ({1000 / cancel_s:.0f}/s);"
        f" ran {len(ran)} on {len(pids)} worker processes, cancelled that ran {len(ran & cancelled_n)},"
        f" skipped {skipped}, duplicates {len(done) - len(ran)}"
    )
    assert not ran & cancelled_n
    assert ran == set(range(2000)) - cancelled_n
    assert skipped >= 1000  # each cancelled job was skipped, by one worker or the other
    assert len(pids) == 2  # the worker running throughout and the one started after the cancels


def _done(results: Path) -> list[tuple[int, int]]:
    if not results.exists():
        return []
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return [(r["n"], r["pid"]) for r in rows if r["phase"] == "done" and r["kind"] == "cancel"]


def _consumers(settings: Settings, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.consumer_count or 0)
    except pika.exceptions.ChannelClosedByBroker:
        return 0  # not declared yet
    finally:
        connection.close()


def _ladder_empty(settings: Settings) -> bool:
    from jobflow.broker.names import delay_queues

    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    try:
        channel = connection.channel()
        return all(
            channel.queue_declare(q, passive=True).method.message_count == 0
            for q in delay_queues(settings.queue_prefix)
        )
    finally:
        connection.close()
