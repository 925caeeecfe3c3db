"""Stopping a worker: running jobs drain, no job starts once the stop began, the process exits.

The worker-process tests send the signals as `timeout` (the real command), a process-group kill and
`docker stop` do, to `dramatiq jobflow.actors tests.shutdown_app`, whose only job is async (so the
AsyncIO middleware's event loop runs). Each job appends its start and end, with the time and the
process, to a file; one worker thread makes "started after the stop" unambiguous.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from dramatiq.asyncio import get_event_loop_thread, set_event_loop_thread
from dramatiq.broker import MessageProxy
from dramatiq.middleware import AsyncIO, SkipMessage

import jobflow
from jobflow import Settings
from jobflow.broker.names import jobs_queue
from jobflow.middleware import DaemonAsyncIO, Shutdown, stack
from jobflow.middleware.shutdown import DUPLICATE_SIGNAL_WINDOW, EXIT_KILLED

from .faults import message_count, wait_for_consumer
from .helpers import eventually
from .shutdown_app import Hold

ROOT = Path(__file__).resolve().parent.parent
#: One process; by default one thread: while a held job runs, no other job can have started before the stop.
WORKER = [sys.executable, "-m", "dramatiq", "jobflow.actors", "tests.shutdown_app", "-p", "1"]


class Workers:
    """Worker processes of one test, each in a process group of its own; all killed at the end."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.settings = settings
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []
        self.jobs = tmp_path / "jobs.jsonl"

    def start(
        self, *prefix: str, shutdown_timeout: float | None = None, name: str = "worker", threads: int = 1
    ) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "JOBFLOW_BROKER_URL": self.settings.broker_url,
            "JOBFLOW_QUEUE_PREFIX": self.settings.queue_prefix,
            "JOBFLOW_LOG_FORMAT": "json",
        }
        if shutdown_timeout is not None:
            env["JOBFLOW_SHUTDOWN_TIMEOUT"] = str(shutdown_timeout)
        with (self.tmp_path / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [*prefix, *WORKER, "-t", str(threads)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def consuming(self) -> None:
        wait_for_consumer(self.settings.broker_url, jobs_queue(self.settings.queue_prefix))

    def schedule(self, *labels: str, release: Path) -> None:
        with jobflow.BrokerJobScheduler(settings=self.settings) as scheduler:
            for label in labels:
                scheduler.schedule_now(Hold(log=str(self.jobs), label=label, release=str(release)))

    def records(self) -> list[dict[str, Any]]:
        if not self.jobs.exists():
            return []
        return [json.loads(line) for line in self.jobs.read_text().splitlines()]

    def wait_for(self, label: str, event: str, *, count: int = 1, timeout: float = 30.0) -> None:
        eventually(
            lambda: sum(r["label"] == label and r["event"] == event for r in self.records()) >= count,
            timeout,
            f"{label} {event} x{count}",
        )

    def stopping(self, name: str = "worker", timeout: float = 30.0) -> float:
        """Wait until Dramatiq's worker process logs that it stops; the time it was seen."""
        eventually(
            lambda: "Stopping worker process" in (self.tmp_path / f"{name}.log").read_text(errors="replace"),
            timeout,
            f"the stop in {name}.log",
        )
        return time.time()

    def log_event(self, name: str, event: str, timeout: float = 30.0) -> dict[str, Any]:
        """The first structlog event ``event`` in worker ``name``'s log, waiting for it."""
        found: list[dict[str, Any]] = []

        def logged() -> bool:
            for line in (self.tmp_path / f"{name}.log").read_text(errors="replace").splitlines():
                if line.startswith("{") and json.loads(line).get("event") == event:
                    found.append(json.loads(line))
                    return True
            return False

        eventually(logged, timeout, f"{event} in {name}.log")
        return found[0]

    def queued(self) -> int:
        return message_count(self.settings.broker_url, jobs_queue(self.settings.queue_prefix))

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


@pytest.fixture
def workers(amqp_settings: Settings, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(amqp_settings, tmp_path)
    try:
        yield w
    finally:
        w.kill_all()


def at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def started(records: list[dict[str, Any]]) -> list[str]:
    return [r["label"] for r in records if r["event"] == "start"]


def run_the_rest(workers: Workers, release: Path, labels: list[str]) -> list[dict[str, Any]]:
    """A second worker runs what the first left in the queue; its records. Stopped by one SIGTERM."""
    before = len(workers.records())
    release.touch()
    proc = workers.start(name="next")
    eventually(
        lambda: {r["label"] for r in workers.records()[before:] if r["event"] == "end"} >= set(labels),
        60,
        f"{labels} run by the next worker",
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    return workers.records()[before:]


class TestTimeoutCommand:
    def test_timeout_drains_the_running_job_and_starts_no_other(self, workers: Workers, tmp_path: Path) -> None:
        """`timeout 10 dramatiq …`: the running job finishes, the queued ones stay queued, exit within 15 s."""
        release = tmp_path / "release"
        t0 = time.monotonic()
        proc = workers.start("timeout", "-k", "30", "10", shutdown_timeout=30)
        workers.consuming()
        workers.schedule("A", release=release)
        workers.wait_for("A", "start")
        workers.schedule(
            "B", "C", release=release
        )  # prefetched behind A: only a worker that ignores the stop runs them
        seen = workers.stopping()
        time.sleep(DUPLICATE_SIGNAL_WINDOW + 0.5)  # timeout's second copy and the master's: no forced exit
        assert proc.poll() is None
        release.touch()
        assert proc.wait(timeout=15) == 124  # timeout's status: the command ended after its SIGTERM, not SIGKILLed
        assert time.monotonic() - t0 < 15
        records = workers.records()
        assert [(r["label"], r["event"]) for r in records] == [("A", "start"), ("A", "end")]
        assert all(r["at"] < seen for r in records if r["event"] == "start")
        eventually(lambda: workers.queued() == 2, 30, "B and C back in the queue, A acked")

    def test_past_the_shutdown_timeout_the_running_job_is_redelivered(self, workers: Workers, tmp_path: Path) -> None:
        """A job still running when JOBFLOW_SHUTDOWN_TIMEOUT ends is not lost: the next worker runs it."""
        release = tmp_path / "release"
        t0 = time.monotonic()
        proc = workers.start("timeout", "-k", "30", "10", shutdown_timeout=2)
        workers.consuming()
        workers.schedule("A", release=release)
        workers.wait_for("A", "start")
        workers.schedule("B", release=release)
        workers.stopping()
        assert proc.wait(timeout=15) == 124
        assert time.monotonic() - t0 < 15
        stop = workers.log_event("worker", "worker.shutdown_started")
        forced = workers.log_event("worker", "worker.shutdown_forced")
        assert forced["reason"] == "shutdown timeout"
        assert at(forced) - at(stop) >= 2 - 0.05  # wall-clock stamps of a monotonic wait
        assert [(r["label"], r["event"]) for r in workers.records()] == [("A", "start")]
        eventually(lambda: workers.queued() == 2, 30, "A and B back in the queue")
        rest = run_the_rest(workers, release, ["A", "B"])
        assert sorted((r["label"], r["event"]) for r in rest) == [
            ("A", "end"),
            ("A", "start"),
            ("B", "end"),
            ("B", "start"),
        ]
        assert workers.queued() == 0


class TestProcessGroupKill:
    def test_second_sigterm_exits_at_once_and_loses_nothing(self, workers: Workers, tmp_path: Path) -> None:
        """`kill -TERM -- -PGID` twice: the first drains, the second exits at once; nothing ran or was lost.

        Two threads: A1 ends just after the first signal and frees one, which must take neither B nor
        C; A2 is still running at the second signal and goes back to the queue.
        """
        early, release = tmp_path / "early", tmp_path / "release"
        # JOBFLOW_SHUTDOWN_TIMEOUT's default: only the second signal ends the drain.
        proc = workers.start(threads=2)
        workers.consuming()
        workers.schedule("A1", release=early)
        workers.schedule("A2", release=release)
        workers.wait_for("A1", "start")
        workers.wait_for("A2", "start")
        workers.schedule("B", "C", release=release)
        os.killpg(proc.pid, signal.SIGTERM)
        sent = time.time()
        # A1 ends at once: its thread is free before Dramatiq's main loop (1 s naps) stops the threads.
        early.touch()
        workers.stopping()
        workers.wait_for("A1", "end")
        time.sleep(DUPLICATE_SIGNAL_WINDOW + 0.5)  # and room for that thread to take B, were the gate open
        assert proc.poll() is None  # the group's copy and the master's forwarded one are one stop; A2 drains
        os.killpg(proc.pid, signal.SIGTERM)
        t1 = time.monotonic()
        assert proc.wait(timeout=10) == EXIT_KILLED
        assert time.monotonic() - t1 < 10
        assert workers.log_event("worker", "worker.shutdown_forced")["reason"] == "second signal"
        records = workers.records()
        assert sorted(started(records)) == ["A1", "A2"]
        assert [r["label"] for r in records if r["event"] == "end"] == ["A1"]
        assert all(r["at"] < sent for r in records if r["event"] == "start")
        eventually(lambda: workers.queued() == 3, 30, "A2, B and C back in the queue")
        rest = run_the_rest(workers, release, ["A2", "B", "C"])
        assert sorted(started(rest)) == ["A2", "B", "C"]
        assert workers.queued() == 0


class TestDrain:
    def test_running_job_completes_and_is_acked_once(self, workers: Workers, tmp_path: Path) -> None:
        """One SIGTERM to the master (`docker stop`): the running job finishes, is acked, and the worker exits 0."""
        release = tmp_path / "release"
        proc = workers.start()
        workers.consuming()
        workers.schedule("A", release=release)
        workers.wait_for("A", "start")
        proc.send_signal(signal.SIGTERM)
        workers.stopping()
        release.touch()
        assert proc.wait(timeout=30) == 0
        assert [(r["label"], r["event"]) for r in workers.records()] == [("A", "start"), ("A", "end")]
        assert workers.queued() == 0  # no consumer left: an unacked A would be back in the queue
        log = (tmp_path / "worker.log").read_text()
        assert "PRECONDITION_FAILED" not in log  # an ack sent twice closes the channel with this
        assert "worker.shutdown_forced" not in log


# In-process checks, without RabbitMQ.


class TestInProcess:
    def test_stack_puts_the_gate_first_and_the_loop_on_a_daemon(self) -> None:
        """Shutdown sees a message before any other middleware; Dramatiq's AsyncIO is replaced."""
        built = stack([AsyncIO(), dramatiq.middleware.Retries()])
        assert isinstance(built[0], Shutdown)
        assert sum(isinstance(m, Shutdown) for m in built) == 1
        assert [type(m) for m in built if isinstance(m, AsyncIO)] == [DaemonAsyncIO]

    def test_event_loop_thread_does_not_keep_the_process_alive(self) -> None:
        middleware = DaemonAsyncIO()
        broker = jobflow.create_broker(Settings(broker_url="memory://shutdown-loop"))
        middleware.before_worker_boot(broker, None)
        try:
            thread = get_event_loop_thread()
            assert thread is not None
            assert thread.daemon
        finally:
            middleware.after_worker_shutdown(broker, None)  # type: ignore[no-untyped-call]
            set_event_loop_thread(None)

    def test_signals_of_one_stop_count_once_and_a_later_one_forces_the_exit(
        self, memory_settings: Settings, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The real handlers in this process, with Dramatiq's stand-in before them and a recorded exit."""
        calls: list[int] = []
        exits: list[int] = []
        exited = threading.Event()

        def dramatiq_handler(signum: int, frame: object) -> None:
            calls.append(signum)

        def fake_exit(code: int) -> None:
            exits.append(code)
            exited.set()

        previous = signal.signal(signal.SIGTERM, dramatiq_handler)
        try:
            shutdown = Shutdown(timeout=600, exit_process=fake_exit)
            shutdown.after_process_boot(jobflow.create_broker(memory_settings))
            assert not shutdown.closed
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # the copy a group kill's forwarding makes
            eventually(lambda: shutdown.closed, 5, "the gate closed")
            assert calls == [signal.SIGTERM]
            time.sleep(0.2)
            assert not exited.is_set()
            later = time.monotonic() + DUPLICATE_SIGNAL_WINDOW
            monkeypatch.setattr(time, "monotonic", lambda: later)
            os.kill(os.getpid(), signal.SIGTERM)
            assert exited.wait(5)
            assert exits == [EXIT_KILLED]
            assert calls == [signal.SIGTERM]
        finally:
            signal.signal(signal.SIGTERM, previous)

    def test_shutdown_timeout_forces_the_exit(self, memory_settings: Settings) -> None:
        exits: list[int] = []
        exited = threading.Event()
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
        try:

            def fake_exit(code: int) -> None:
                exits.append(code)
                exited.set()

            shutdown = Shutdown(timeout=0.3, exit_process=fake_exit)
            shutdown.after_process_boot(jobflow.create_broker(memory_settings))
            os.kill(os.getpid(), signal.SIGTERM)
            assert exited.wait(5)
            assert exits == [EXIT_KILLED]
        finally:
            signal.signal(signal.SIGTERM, previous)

    def test_no_handler_to_chain_leaves_the_signals_alone(self, memory_settings: Settings) -> None:
        """Outside a Dramatiq worker process (no Python handler installed) nothing is wrapped."""
        previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            Shutdown(exit_process=lambda code: None).after_process_boot(jobflow.create_broker(memory_settings))
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        finally:
            signal.signal(signal.SIGTERM, previous)

    def test_default_timeout_is_the_setting(self, monkeypatch: pytest.MonkeyPatch) -> None:
        assert Settings().shutdown_timeout == 600
        monkeypatch.setenv("JOBFLOW_SHUTDOWN_TIMEOUT", "12.5")
        assert Settings().shutdown_timeout == 12.5

    def test_gate_puts_a_message_back_once_the_stop_began(self, memory_settings: Settings) -> None:
        """On the in-memory broker a refused message goes back into its queue: neither run nor acked away."""
        broker = jobflow.create_broker(memory_settings)
        queue = jobs_queue(memory_settings.queue_prefix)
        broker.declare_queue(queue)
        message = MessageProxy(dramatiq.Message(queue_name=queue, actor_name="a", args=(), kwargs={}, options={}))
        shutdown = Shutdown()
        shutdown.before_process_message(broker, message)  # open: it runs
        shutdown.before_worker_shutdown(broker, None)  # what Worker.stop does first
        with pytest.raises(SkipMessage):
            shutdown.before_process_message(broker, message)
        back = broker.queues[queue].get_nowait()
        assert dramatiq.Message.decode(back).message_id == message.message_id
        shutdown.before_worker_boot(broker, None)  # a new in-process worker on this broker: open again
        assert not shutdown.closed
