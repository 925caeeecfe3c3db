"""Prometheus metrics: the counts a worker's ``/metrics`` serves, in memory and from `dramatiq -p 2`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest

import jobflow
from jobflow import JobRegistry, RetryPolicy, Settings
from jobflow.broker.names import commands_queue, jobs_queue
from jobflow.metrics import LABELS
from jobflow.metrics_server import _incarnation, _LiveCollector, master_dir
from jobflow.middleware import DueTime, Failures, JobTimeLimit, Metrics, stack

from .faults import consumer_count, publish_raw
from .helpers import eventually
from .metrics_helpers import Series, free_port, job_labels, scrape, value

ROOT = Path(__file__).resolve().parent.parent
FAST = RetryPolicy(max_attempts=4, backoff=timedelta(milliseconds=10), max_backoff=timedelta(milliseconds=50))
T = TypeVar("T")
TWICE = RetryPolicy(max_attempts=2, backoff=timedelta(milliseconds=10), max_backoff=timedelta(milliseconds=50))


Counts = dict[tuple[str, int, str], float]


def counts(series: Series, metric: str, expected: Counts) -> Counts:
    """The served value of ``metric`` for each (name, version, queue) of ``expected`` (0 when not served)."""
    return {
        key: value(series, metric, job_labels(*key, kind="command" if key[2].endswith(".commands") else "job")) or 0
        for key in expected
    }


def settled(read: Callable[[], T], expected: T, timeout: float = 30.0) -> T:
    """What ``read`` returns once it equals ``expected``, or at ``timeout`` (for the assertion's diff)."""
    deadline = time.monotonic() + timeout
    got = read()
    while got != expected and time.monotonic() < deadline:
        time.sleep(0.1)
        got = read()
    return got


class TestStack:
    def test_metrics_sees_failures_before_they_are_retried(self) -> None:
        """Metrics follows Failures and DueTime: it marks a failure before its retry, and skips early messages."""
        names = [type(m) for m in stack()]
        assert names.index(Failures) < names.index(Metrics)
        assert names.index(DueTime) < names.index(Metrics) < names.index(JobTimeLimit)


class TestMasterDir:
    def test_directories_of_gone_masters_are_deleted(self, tmp_path: Path) -> None:
        """A worker keeps its master's directory and live masters', and deletes those of masters that are gone."""
        me = os.getpid()
        dead = tmp_path / "master-99999999-1-abcdef01"  # above Linux's pid_max: never a live process
        reused = tmp_path / f"master-{me}-0-00000000"  # a live pid, but another (earlier) process's
        live = tmp_path / f"master-{me}-{_incarnation(me)}"
        other = tmp_path / "not-a-master"
        for d in (dead, reused, live, other):
            d.mkdir()
        mine = master_dir(tmp_path)
        assert mine.is_dir()
        assert mine.name == f"master-{os.getppid()}-{_incarnation(os.getppid())}"
        assert not dead.exists()
        assert not reused.exists()
        assert live.exists()
        assert other.exists()


def write_live_gauge(directory: Path, pid: int, name: str, count: float) -> None:
    """What a worker process writes for ``jobflow_jobs_in_progress`` in multiprocess mode."""
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    store = MmapedDict(str(directory / f"gauge_livesum_{pid}.db"))  # type: ignore[no-untyped-call]
    metric = "jobflow_jobs_in_progress"
    key = mmap_key(metric, metric, list(LABELS), ["job", name, "1", "q.jobs"], "Attempts running now.")
    store.write_value(key, count, 0.0)  # type: ignore[no-untyped-call]
    store.close()  # type: ignore[no-untyped-call]


class TestServing:
    def test_dead_processes_leave_the_in_progress_gauge(self, tmp_path: Path) -> None:
        """At a scrape, a process that died without saying so stops counting its jobs as in progress."""
        from prometheus_client import CollectorRegistry, generate_latest

        dead = 99999999  # above Linux's pid_max: never a live process
        write_live_gauge(tmp_path, dead, "Gone", 3)
        write_live_gauge(tmp_path, os.getpid(), "Here", 2)
        registry = CollectorRegistry()
        _LiveCollector(registry, tmp_path)
        text = generate_latest(registry).decode()
        assert 'jobflow_jobs_in_progress{kind="job",name="Here",queue="q.jobs",version="1"} 2.0' in text
        assert "Gone" not in text
        assert not (tmp_path / f"gauge_livesum_{dead}.db").exists()

    def test_one_process_serves_and_another_takes_over(self, tmp_path: Path) -> None:
        """Of two processes of one master, one serves /metrics; when it is killed, the other does."""
        port = free_port()
        write_live_gauge(tmp_path, os.getpid(), "Shared", 1)
        code = (
            "import sys, time; from pathlib import Path; from jobflow.metrics_server import serve_elected;"
            " serve_elected(Path(sys.argv[1]), '127.0.0.1', int(sys.argv[2])); time.sleep(60)"
        )
        logs = [tmp_path / f"p{i}.log" for i in range(2)]
        outputs = [log.open("w") for log in logs]
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(tmp_path), str(port)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )
            for out in outputs
        ]
        shared = job_labels("Shared", 1, "q.jobs")

        def serving() -> list[int]:
            return [p.pid for p, log in zip(procs, logs, strict=True) if "metrics.serving" in log.read_text()]

        try:
            eventually(lambda: len(serving()) == 1, 20, "one process serving")
            assert value(scrape(port), "jobflow_jobs_in_progress", shared) == 1
            time.sleep(0.5)
            first = serving()
            assert len(first) == 1
            assert not [log for log in logs if "bind_failed" in log.read_text()]  # the other waits on the lock
            os.kill(first[0], signal.SIGKILL)
            eventually(lambda: len(serving()) == 2, 20, "the other process serving")
            eventually(lambda: value(scrape(port), "jobflow_jobs_in_progress", shared) == 1, 20, "served again")
        finally:
            for proc, out in zip(procs, outputs, strict=True):
                proc.kill()
                proc.wait(10)
                out.close()


class TestInProcess:
    def test_served_counts_match_the_jobs_run(self, registry: JobRegistry) -> None:
        """An in-process worker's /metrics counts each job's schedule, starts, retries, successes and dead letters."""
        prefix = f"m-{uuid.uuid4().hex[:10]}"
        port = free_port()
        settings = Settings(
            broker_url=f"memory://{prefix}", queue_prefix=prefix, metrics_port=port, metrics_host="127.0.0.1"
        )
        release = threading.Event()

        class Ok(jobflow.Job, name="Ok", version=1, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        class OkV2(jobflow.Job, name="Ok", version=2, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        class Flaky(jobflow.Job, registry=registry, retry=FAST):
            def execute(self, ctx: jobflow.JobContext) -> None:
                if ctx.attempt <= 2:
                    raise jobflow.TransientError(f"attempt {ctx.attempt}")

        class Broken(jobflow.Job, registry=registry, retry=FAST):
            def execute(self, ctx: jobflow.JobContext) -> None:
                raise jobflow.PermanentError("never")

        class Exhausted(jobflow.Job, registry=registry, retry=TWICE):
            def execute(self, ctx: jobflow.JobContext) -> None:
                raise jobflow.TransientError("always")

        class Blocks(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                assert release.wait(20)

        class Hello(jobflow.Command, registry=registry):
            pass

        @jobflow.command_handler(Hello)
        def hello(command: Hello, ctx: jobflow.CommandContext) -> None:
            pass

        jobs, commands = jobs_queue(prefix), commands_queue(prefix)
        scheduler = jobflow.BrokerJobScheduler(settings=settings, registry=registry)
        with jobflow.InProcessWorker(scheduler.broker, registry=registry, settings=settings):
            scheduler.schedule_now(Blocks())
            try:
                eventually(
                    lambda: value(scrape(port), "jobflow_jobs_in_progress", job_labels("Blocks", 1, jobs)) == 1,
                    what="Blocks in progress",
                )
            finally:
                release.set()
            for _ in range(3):
                scheduler.schedule_now(Ok())
            # Due in 300 ms, it reaches the in-memory worker at once: early, it is delayed again (not re-counted).
            scheduler.schedule(Ok(), delay=timedelta(milliseconds=300))
            for job in (OkV2(), Flaky(), Broken(), Exhausted(), jobflow.PublishCommandJob.create(Hello())):
                scheduler.schedule_now(job)

            started: Counts = {
                ("Ok", 1, jobs): 4,
                ("Ok", 2, jobs): 1,
                ("Flaky", 1, jobs): 3,
                ("Broken", 1, jobs): 1,
                ("Exhausted", 1, jobs): 2,
                ("Blocks", 1, jobs): 1,
                ("PublishCommand", 2, jobs): 1,
                ("Hello", 1, commands): 1,
            }
            expected: dict[str, Counts] = {
                "jobflow_jobs_scheduled_total": {**dict.fromkeys(started, 1), ("Ok", 1, jobs): 4},
                "jobflow_jobs_started_total": started,
                "jobflow_jobs_succeeded_total": {
                    **started,
                    ("Flaky", 1, jobs): 1,
                    ("Broken", 1, jobs): 0,
                    ("Exhausted", 1, jobs): 0,
                },
                "jobflow_jobs_retried_total": {
                    **dict.fromkeys(started, 0),
                    ("Flaky", 1, jobs): 2,
                    ("Exhausted", 1, jobs): 1,
                },
                "jobflow_jobs_dead_lettered_total": {
                    **dict.fromkeys(started, 0),
                    ("Broken", 1, jobs): 1,
                    ("Exhausted", 1, jobs): 1,
                },
                "jobflow_job_duration_seconds_count": started,
                "jobflow_job_lateness_seconds_count": started,
                "jobflow_jobs_in_progress": dict.fromkeys(started, 0),
            }

            def served() -> dict[str, Counts]:
                series = scrape(port)
                return {metric: counts(series, metric, want) for metric, want in expected.items()}

            assert settled(served, expected) == expected
            time.sleep(0.5)  # nothing more comes: the counts are exact, not lower bounds
            assert served() == expected
            series = scrape(port)
            assert (value(series, "jobflow_job_duration_seconds_sum", job_labels("Blocks", 1, jobs)) or 0) > 0
        assert len(scheduler.broker.dead_letters) == 2  # type: ignore[attr-defined]


def two_consumers(url: str, queue: str) -> bool:
    return consumer_count(url, queue) == 2


@pytest.fixture
def metrics_worker(amqp_settings: Settings, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """`dramatiq jobflow.actors tests.metrics_app -p 2` serving /metrics on a free port; yields (port, log)."""
    port = free_port()
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env |= {
        "JOBFLOW_BROKER_URL": amqp_settings.broker_url,
        "JOBFLOW_QUEUE_PREFIX": amqp_settings.queue_prefix,
        "JOBFLOW_LOG_FORMAT": "json",
        "JOBFLOW_METRICS_PORT": str(port),
        "JOBFLOW_METRICS_HOST": "127.0.0.1",
        "TMPDIR": str(tmp_path / "tmp"),  # the masters' metrics directories live here
    }
    log_path = tmp_path / "worker.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "jobflow.actors", "tests.metrics_app", "-p", "2", "-t", "2"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for queue in (jobs_queue(amqp_settings.queue_prefix), commands_queue(amqp_settings.queue_prefix)):
            eventually(partial(two_consumers, amqp_settings.broker_url, queue), 60, f"2 consumers of {queue}")
        yield port, log_path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


class TestWorkerProcesses:
    def test_one_metrics_endpoint_sums_both_processes(
        self, amqp_settings: Settings, metrics_worker: tuple[int, Path], tmp_path: Path
    ) -> None:
        """A `dramatiq -p 2` worker's /metrics shows the exact counts of the jobs both processes ran."""
        from prometheus_client import REGISTRY

        from .metrics_app import (
            MetricsBlocks,
            MetricsBroken,
            MetricsExhausted,
            MetricsFlaky,
            MetricsNote,
            MetricsOk,
            MetricsOkV2,
        )

        port, log_path = metrics_worker
        jobs, commands = jobs_queue(amqp_settings.queue_prefix), commands_queue(amqp_settings.queue_prefix)
        pids, release, running = tmp_path / "pids", tmp_path / "release", tmp_path / "running"
        pids.mkdir()
        blocks = job_labels("MetricsBlocks", 1, jobs)
        with jobflow.BrokerJobScheduler(settings=amqp_settings) as scheduler:
            scheduler.schedule_now(MetricsBlocks(release=str(release), started=str(running)))
            try:
                eventually(running.exists, what="MetricsBlocks running")
                eventually(lambda: value(scrape(port), "jobflow_jobs_in_progress", blocks) == 1, what="in progress")
            finally:
                release.touch()
            batch: list[jobflow.Job] = [
                *(MetricsOk(pids=str(pids)) for _ in range(3)),
                *(MetricsOkV2(pids=str(pids)) for _ in range(2)),
                MetricsFlaky(pids=str(pids), failures=2),
                MetricsBroken(pids=str(pids)),
                MetricsExhausted(pids=str(pids)),
                jobflow.PublishCommandJob.create(MetricsNote(text="hello")),
            ]
            for job in batch:
                scheduler.schedule_now(job)
        publish_raw(amqp_settings.broker_url, jobs, [b"\xff not json", b'{"not": "a message"}'])

        started: Counts = {
            ("MetricsBlocks", 1, jobs): 1,
            ("MetricsOk", 1, jobs): 3,
            ("MetricsOk", 2, jobs): 2,
            ("MetricsFlaky", 1, jobs): 3,
            ("MetricsBroken", 1, jobs): 1,
            ("MetricsExhausted", 1, jobs): 2,
            ("PublishCommand", 2, jobs): 1,
            ("MetricsNote", 1, commands): 1,
        }
        none: Counts = dict.fromkeys(started, 0)
        expected: dict[str, Counts] = {
            # The worker published only the command; the jobs were scheduled by this process.
            "jobflow_jobs_scheduled_total": {**none, ("MetricsNote", 1, commands): 1},
            "jobflow_jobs_started_total": started,
            "jobflow_jobs_succeeded_total": {
                **started,
                ("MetricsFlaky", 1, jobs): 1,
                ("MetricsBroken", 1, jobs): 0,
                ("MetricsExhausted", 1, jobs): 0,
            },
            "jobflow_jobs_retried_total": {**none, ("MetricsFlaky", 1, jobs): 2, ("MetricsExhausted", 1, jobs): 1},
            "jobflow_jobs_dead_lettered_total": {
                **none,
                ("MetricsBroken", 1, jobs): 1,
                ("MetricsExhausted", 1, jobs): 1,
            },
            "jobflow_job_duration_seconds_count": started,
            "jobflow_job_lateness_seconds_count": started,
            "jobflow_jobs_in_progress": none,
        }
        poison = {"undecodable": 1.0, "not_a_message": 1.0}

        def served() -> tuple[dict[str, Counts], dict[str, float]]:
            series = scrape(port)
            refused = {
                reason: value(series, "jobflow_poison_refused_total", {"queue": jobs, "reason": reason}) or 0
                for reason in poison
            }
            return {metric: counts(series, metric, want) for metric, want in expected.items()}, refused

        assert settled(served, (expected, poison), timeout=60) == (expected, poison)
        time.sleep(1.0)  # nothing more comes: the counts are exact, not lower bounds
        assert served() == (expected, poison)

        series = scrape(port)
        ok = job_labels("MetricsOk", 1, jobs)
        # Run on an idle worker, each started within 10 s of its due time (lateness is in seconds, not ms).
        assert value(series, "jobflow_job_lateness_seconds_bucket", {**ok, "le": "10.0"}) == 3
        assert (value(series, "jobflow_job_duration_seconds_sum", blocks) or 0) >= 0.02
        assert value(series, "jobflow_job_duration_seconds_bucket", {**blocks, "le": "0.001"}) == 0
        # Both processes ran jobs, and one endpoint counted them all.
        assert len({p.read_text() for p in pids.iterdir()}) == 2
        # The producer counted what it scheduled, in its own registry.
        for (name, version), n in {("MetricsOk", 1): 3, ("MetricsOk", 2): 2, ("MetricsFlaky", 1): 1}.items():
            assert REGISTRY.get_sample_value("jobflow_jobs_scheduled_total", job_labels(name, version, jobs)) == n
        # Exactly one process served.
        events = [line for line in log_path.read_text().splitlines() if '"metrics.' in line]
        assert len([e for e in events if '"metrics.serving"' in e]) == 1, events
        assert not [e for e in events if "bind_failed" in e], events
