"""Recurring jobs on a real RabbitMQ: one elected worker drives them, another takes over when it dies.

Two ``dramatiq jobflow.actors tests.recurring_app`` workers run a schedule due every second. The
driving one is SIGKILLed: every second's occurrence still runs, once (a job the killed worker ran
but had not acknowledged runs again: at-least-once, counted), and on time. Then no worker runs for
a while: with ``missed="once"`` the latest missed occurrence runs once when a worker is back.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pika
import pytest
from click.testing import CliRunner

import jobflow
from jobflow import JobRegistry, Settings
from jobflow.broker.names import schedules_state_queue, schedules_status_queue
from jobflow.broker.rabbitmq import JobflowRabbitmqBroker
from jobflow.broker.schedules import ScheduleDriver, read_state
from jobflow.cli import main
from jobflow.cli.schedules import read_state as cli_read_state

from .helpers import eventually
from .worker_process import WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
SCHEDULE = "probe-every-second"


class Worker(WorkerProcess):
    """``dramatiq jobflow.actors tests.recurring_app -p 1 -t 4``, driving two-second-ahead schedules."""

    def __init__(self, settings: Settings, results: Path, log: Path) -> None:
        env = {
            "JOBFLOW_BROKER_URL": settings.broker_url,
            "JOBFLOW_QUEUE_PREFIX": settings.queue_prefix,
            "JOBFLOW_SCHEDULE_AHEAD": "2",
            "RECURRING_RESULTS": str(results),
        }
        super().__init__("tests.recurring_app", env, log, threads=4)

    def drives(self) -> bool:
        return len(self.events("schedules.driving")) > len(self.events("schedules.resigned"))


@pytest.fixture
def started(amqp_settings: Settings) -> Iterator[list[Worker]]:
    workers: list[Worker] = []
    yield workers
    for worker in workers:
        worker.stop()


def runs(results: Path) -> list[dict[str, Any]]:
    if not results.exists():
        return []
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return [{**r, "due_ms": round(r["due_ms"])} for r in rows]


def schedules_list(settings: Settings) -> dict[str, Any]:
    result = CliRunner().invoke(
        main,
        ["schedules", "list", "--json", "--broker", settings.broker_url, "--prefix", settings.queue_prefix],
    )
    assert result.exit_code == 0, result.output
    listed: dict[str, Any] = json.loads(result.stdout)
    return listed


def test_a_schedule_survives_its_driver_being_killed(
    amqp_settings: Settings, started: list[Worker], tmp_path: Path
) -> None:
    results = tmp_path / "results.jsonl"
    started += [Worker(amqp_settings, results, tmp_path / f"worker{i}.log") for i in range(2)]
    eventually(lambda: any(w.drives() for w in started), timeout=60, what="a worker driving the schedule")
    eventually(lambda: len(runs(results)) >= 10, timeout=40, what="ten occurrences running")
    driver = next(w for w in started if w.drives())
    other = next(w for w in started if w is not driver)
    assert not other.drives(), "two workers drive at once"

    killed_ms = time.time() * 1000
    driver.kill()
    eventually(other.drives, timeout=15, what="the other worker taking over")
    took_over = other.events("schedules.driving")[-1]
    took_over_ms = datetime.fromisoformat(took_over["timestamp"].replace("Z", "+00:00")).timestamp() * 1000
    first = min(r["due_ms"] for r in runs(results))
    window = [first + 1000 * k for k in range(20)]  # the 20 s, the kill about midway
    eventually(
        lambda: max(r["due_ms"] for r in runs(results)) >= window[-1] + 2_000,
        timeout=40,
        what="occurrences 20 s after the first",
    )
    rows = [r for r in runs(results) if r["due_ms"] <= window[-1]]
    due = [r["due_ms"] for r in rows]
    missing = [d for d in window if d not in due]
    twice = sorted({d for d in due if due.count(d) > 1})
    late = {d: max(r["started_ms"] - r["due_ms"] for r in rows if r["due_ms"] == d) for d in window if d in due}
    after = [ms for d, ms in late.items() if d > killed_ms]
    print(
        f"\nrecurring failover: {len(set(due))} of {len(window)} occurrences due every 1 s ran, {len(rows)} runs;"
        f" driver SIGKILLed {(killed_ms - first) / 1000:.1f} s in, taken over {took_over_ms - killed_ms:.0f} ms"
        f" later; ran twice {len(twice)} (redelivered from the killed worker); lateness max before the kill"
        f" {max(v for d, v in late.items() if d <= killed_ms):.0f} ms, after {max(after):.0f} ms"
    )
    assert missing == []
    assert len(set(due)) == len(window)
    # Twice only where the killed worker had the job (it ran it, then died before acknowledging).
    assert all(killed_ms - 2_000 <= d <= killed_ms + 2_000 for d in twice), twice
    assert len({r["job_id"] for r in rows}) == len(window)  # one id per occurrence, a rerun has the same
    assert max(after) < 2_000

    listed = schedules_list(amqp_settings)
    (row,) = [r for r in listed["schedules"] if r["name"] == SCHEDULE]
    assert row["driven"]
    assert (row["job"], row["schedule"]) == ("RecurringProbe", "every 1 s")
    assert row["next"] > row["last_run"]
    assert listed["driver"] == took_over["driver"]


def test_occurrences_missed_while_no_worker_ran_run_once(
    amqp_settings: Settings, started: list[Worker], tmp_path: Path
) -> None:
    results = tmp_path / "results.jsonl"
    first = Worker(amqp_settings, results, tmp_path / "first.log")
    started.append(first)
    eventually(lambda: len(runs(results)) >= 3, timeout=60, what="the first occurrences running")
    first.stop()
    connection = pika.BlockingConnection(pika.URLParameters(amqp_settings.broker_url))
    try:
        last_ms = cli_read_state(connection, amqp_settings.queue_prefix)["schedules"][SCHEDULE]["last_ms"]
    finally:
        connection.close()
    time.sleep(6)  # six or more occurrences come due with no worker running
    stopped_ms = time.time() * 1000
    started.append(Worker(amqp_settings, results, tmp_path / "second.log"))
    eventually(
        lambda: max(r["due_ms"] for r in runs(results)) >= stopped_ms + 4_000,
        timeout=60,
        what="occurrences after the restart",
    )
    rows = runs(results)
    due = sorted({r["due_ms"] for r in rows})
    resumed = [d for d in due if d > last_ms]
    catch_up = resumed[0]
    ran_late = [r["started_ms"] - r["due_ms"] for r in rows if r["due_ms"] == catch_up]
    print(
        f"\nrecurring missed=once: occurrences published up to {last_ms - due[0]:.0f} ms after the first;"
        f" no worker for {(stopped_ms - last_ms) / 1000:.1f} s after that; the latest missed ran once,"
        f" due {catch_up - last_ms:.0f} ms after the last published, {ran_late[0]:.0f} ms late"
    )
    # Everything published before the stop ran (from the ladder, when a worker was back) ...
    assert due[: due.index(last_ms) + 1] == list(range(due[0], last_ms + 1, 1000))
    # ... of the occurrences that came due while none ran, only the latest, once ...
    assert catch_up >= stopped_ms - 1_000
    assert len(ran_late) == 1
    # ... and from then on every second again.
    assert [b - a for a, b in itertools.pairwise(resumed)] == [1000] * (len(resumed) - 1)


class SlowReader:
    """A connection whose channels put back what they read 0.3 s late."""

    def __init__(self, connection: pika.BlockingConnection) -> None:
        self.connection = connection

    def channel(self) -> Any:
        channel = self.connection.channel()
        nack = channel.basic_nack

        def slow_nack(*args: Any, **kwargs: Any) -> None:
            time.sleep(0.3)
            nack(*args, **kwargs)

        channel.basic_nack = slow_nack  # type: ignore[method-assign]
        return channel


def test_reading_the_schedules_never_hides_the_drivers_state(amqp_settings: Settings, registry: JobRegistry) -> None:
    """``schedules list`` holds what it reads for a moment; a quorum queue's length limit counts held
    messages, so had it read the driver's own state, a state written meanwhile would be dropped."""

    class Beat(jobflow.Job, name="Beat", registry=registry):
        def execute(self, ctx: jobflow.JobContext) -> None:
            pass

    jobflow.recurring("beat", Beat(), every=timedelta(seconds=1), registry=registry)
    prefix = amqp_settings.queue_prefix
    with jobflow.BrokerJobScheduler(settings=amqp_settings, registry=registry) as scheduler:
        broker = scheduler.broker
        assert isinstance(broker, JobflowRabbitmqBroker)
        driver = ScheduleDriver(broker, registry, step_every_s=0.05)
        connection = pika.BlockingConnection(pika.URLParameters(amqp_settings.broker_url))
        try:
            driver.start()
            eventually(lambda: driver.published >= 3, timeout=20, what="the driver publishing")
            seen = []
            slow = SlowReader(connection)
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:  # a reader over a slow link, holding each read 0.3 s
                seen.append(cli_read_state(slow, prefix).get("at_ms"))
            driver.stop()
            time.sleep(0.3)
            written = driver.written
            assert written is not None
            channel = connection.channel()
            kept = read_state(channel, schedules_state_queue(prefix))
            status = read_state(channel, schedules_status_queue(prefix))
        finally:
            driver.stop()
            connection.close()
    print(f"\nrecurring state: read {len(seen)} times while the driver wrote {driver.published} occurrences")
    assert len(seen) >= 8
    assert seen[-1] is not None
    # The driver's last word, not one a reader held back: its last step, marked released as it stopped.
    assert kept.pop("released") is True
    kept_at = kept.pop("at_ms")
    assert kept_at >= written.pop("at_ms")
    assert kept == written
    # The copy the reader held may have lost the driver's last write: it is for display, and the
    # driver's next write (at least every 10 s) replaces it.
    assert status["at_ms"] <= kept_at
    assert kept["schedules"]["beat"]["last_ms"] >= kept_at
