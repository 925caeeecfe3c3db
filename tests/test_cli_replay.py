"""`jobflow dead-letters replay`: back to the queue, attempts reset, at least once and never lost."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import structlog

import jobflow
from jobflow import JobRegistry, Settings
from jobflow.broker.names import DISPATCH_COMMAND_ACTOR, RUN_JOB_ACTOR, commands_queue, jobs_queue
from jobflow.cli.output import progress
from jobflow.dead_letter import dead_letter_queue

from .cli_helpers import ROOT, run_cli, run_json
from .conftest import have_rabbitmqctl
from .dead_letters import DeadLetters, close_cli_connections, dead_letters, job_message, record_for
from .helpers import tracked_worker, wait
from .worker_app import TouchFile


@pytest.fixture(autouse=True)
def _at_project_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(ROOT)
    yield
    structlog.reset_defaults()


@pytest.fixture
def maker(amqp_settings: Settings) -> Iterator[DeadLetters]:
    with dead_letters(amqp_settings) as made:
        yield made


def _replay(settings: Settings, *args: str) -> Any:
    return run_cli("dead-letters", "replay", *args, "-m", "tests.worker_app", settings=settings)


class TestReplay:
    def test_back_in_its_queue_with_attempts_reset(self, amqp_settings: Settings, maker: DeadLetters) -> None:
        """The message returns to its queue under the same id, retries 0, the replay counted and timed."""
        fresh = maker.add(TouchFile(path="/a", text="1"))
        again = maker.add(TouchFile(path="/b", text="2"), replay_count=2)
        before = datetime.now(UTC)
        result = _replay(amqp_settings, fresh, again)
        assert result.exit_code == 0, result.output
        assert "replayed 2 dead letter(s)" in result.stdout
        assert maker.settled(dead_letter_queue(maker.jobs), 0) == 0
        messages = {m["message_id"]: m for m, _ in maker.drain(maker.jobs)}
        assert set(messages) == {fresh, again}
        options = messages[fresh]["options"]
        assert options["retries"] == 0
        assert "traceback" not in options
        assert options["jobflow_replay"]["count"] == 1
        assert datetime.fromisoformat(options["jobflow_replay"]["at"]) >= before
        assert messages[again]["options"]["jobflow_replay"]["count"] == 3
        assert messages[fresh]["args"][0]["data"] == {"path": "/a", "text": "1"}

    def test_a_worker_runs_it_as_a_first_attempt(
        self, amqp_settings: Settings, maker: DeadLetters, tmp_path: Path
    ) -> None:
        """A replayed job runs on a worker with attempt 1."""
        done = tmp_path / "done.json"
        ident = maker.add(TouchFile(path=str(done), text="replayed"), attempts=10)
        assert _replay(amqp_settings, ident).exit_code == 0
        broker = jobflow.create_broker(amqp_settings)
        try:
            with tracked_worker(broker, jobflow.default_registry, amqp_settings) as tracker:
                wait(tracker, lambda t: any(o.message_id == ident for o in t.succeeded(RUN_JOB_ACTOR)), timeout=30)
        finally:
            broker.close()
        record = json.loads(done.read_text())
        assert (record["job_id"], record["attempt"], record["text"]) == (ident, 1, "replayed")

    def test_commands_go_back_to_the_commands_queue(self, amqp_settings: Settings, maker: DeadLetters) -> None:
        """A dead-lettered command is replayed to the command-bus queue."""
        envelope = jobflow.CommandEnvelope(
            command_id="cmd-1", name="WriteFile", version=1, data={"path": "/x", "text": "t"}, sent_at=datetime.now(UTC)
        )
        queue = commands_queue(amqp_settings.queue_prefix)
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue,
            actor_name=DISPATCH_COMMAND_ACTOR,
            args=(envelope.to_wire(),),
            kwargs={},
            options={"retries": 5},
            message_id="cmd-1",
        )
        maker.publish(message.encode(), None, queue)  # no jobflow record: as stock Dramatiq would leave it
        assert _replay(amqp_settings, "cmd-1").exit_code == 0
        (replayed,) = maker.drain(queue)
        assert (replayed[0]["message_id"], replayed[0]["options"]["retries"]) == ("cmd-1", 0)

    def test_dry_run_changes_nothing(self, amqp_settings: Settings, maker: DeadLetters) -> None:
        """--dry-run says what would move and leaves every dead letter, and every queue, as it was."""
        ids = {maker.add(TouchFile(path=f"/{i}", text="x")) for i in range(3)}
        result = _replay(amqp_settings, "--all", "--dry-run")
        assert result.exit_code == 0, result.output
        assert "would replay 3 dead letter(s); nothing changed" in result.stdout
        assert maker.settled(dead_letter_queue(maker.jobs), 3) == 3
        assert maker.settled(maker.jobs, 0) == 0
        listed = run_json("dead-letters", "list", settings=amqp_settings)["dead_letters"]
        assert {row["id"] for row in listed} == ids
        assert all(row["replay_count"] == 0 for row in listed)

    def test_unregistered_and_undecodable_are_refused_and_stay(
        self, amqp_settings: Settings, maker: DeadLetters, registry: JobRegistry
    ) -> None:
        """A job type no longer registered, or a body that is no message, is refused with the reason and stays."""

        class Gone(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None: ...

        gone = maker.add(Gone())
        ok = maker.add(TouchFile(path="/a", text="1"))
        maker.rejected(b"<xml>not a message</xml>")
        result = _replay(amqp_settings, "--all", "--json")
        assert result.exit_code == 1
        doc = json.loads(result.stdout)
        assert doc["replayed"] == 1
        assert [row["id"] for row in doc["dead_letters"]] == [ok]
        reasons = {r["id"]: r["reason"] for r in doc["refused"]}
        assert "unknown job ('Gone', 1)" in reasons[gone]
        assert "not registered by the modules given with -m" in reasons[gone]
        (raw,) = [r for r in reasons if r.startswith("raw-")]
        assert "not a Dramatiq message" in reasons[raw]
        assert "2 dead letter(s) refused" in result.stderr
        left = {row["id"] for row in run_json("dead-letters", "list", settings=amqp_settings)["dead_letters"]}
        assert left == {gone, raw}
        assert [m["message_id"] for m, _ in maker.drain(maker.jobs)] == [ok]

    def test_without_modules_bytes_move_and_with_them_types_are_checked(
        self, amqp_settings: Settings, maker: DeadLetters
    ) -> None:
        """Run as a program with no -m, a replay moves the dead letter back though the CLI knows no type;
        with -m, data the type rejects is refused (it would bounce straight back) unless --force."""
        fits = {maker.add(TouchFile(path=f"/{n}", text="1")) for n in range(200)}
        program = [sys.executable, "-c", "from jobflow.cli import main; main()", "dead-letters", "replay"]
        where = ["--broker", amqp_settings.broker_url, "--prefix", amqp_settings.queue_prefix]

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*program, *args, *where], check=False, cwd=ROOT, capture_output=True, text=True, timeout=60
            )

        without = run("--all")
        assert without.returncode == 0, without.stderr
        assert without.stdout == "replayed 200 dead letter(s)\n"
        assert maker.settled(dead_letter_queue(maker.jobs), 0) == 0
        back = maker.drain(maker.jobs)
        assert {m["message_id"] for m, _ in back} == fits
        assert {m["options"]["retries"] for m, _ in back} == {0}

        with warnings.catch_warnings():  # pydantic warns as it writes the data the type rejects
            warnings.simplefilter("ignore", UserWarning)
            misfit = maker.add(TouchFile.model_construct(path=7, text="x"))  # type: ignore[arg-type]
        checked = run(misfit, "-m", "tests.worker_app")
        assert checked.returncode == 1, checked.stderr
        assert "does not fit TouchFile v1" in checked.stdout
        assert "invalid_payload" in checked.stdout
        assert maker.settled(dead_letter_queue(maker.jobs), 1) == 1
        forced = run(misfit, "-m", "tests.worker_app", "--force")
        assert forced.returncode == 0, forced.stderr
        assert [m["message_id"] for m, _ in maker.drain(maker.jobs)] == [misfit]

    def test_filters_choose(self, amqp_settings: Settings, maker: DeadLetters) -> None:
        """Filters replay only the matching dead letters; --json output parses."""
        key = maker.add(TouchFile(path="/a", text="1"), error_type="KeyError")
        value = maker.add(TouchFile(path="/b", text="2"), error_type="ValueError")
        doc = run_json(
            "dead-letters", "replay", "--error", "KeyError", "-m", "tests.worker_app", settings=amqp_settings
        )
        assert (doc["replayed"], doc["dry_run"], doc["refused"], doc["not_found"]) == (1, False, [], [])
        assert [m["message_id"] for m, _ in maker.drain(maker.jobs)] == [key]
        remaining = run_json("dead-letters", "list", settings=amqp_settings)["dead_letters"]
        assert [row["id"] for row in remaining] == [value]

    def test_says_which(self, amqp_settings: Settings, maker: DeadLetters) -> None:
        """No target, IDs with --all, or too long a delay are usage errors; an unknown id exits 3."""
        maker.add(TouchFile(path="/a", text="1"))
        assert _replay(amqp_settings).exit_code == 2
        assert _replay(amqp_settings, "some-id", "--all").exit_code == 2
        too_long = _replay(amqp_settings, "--all", "--delay", "3000d")
        assert too_long.exit_code == 2
        assert "--delay can be at most" in too_long.stderr
        missing = _replay(amqp_settings, "no-such-id")
        assert missing.exit_code == 3
        assert "no-such-id" in missing.stderr
        assert maker.settled(dead_letter_queue(maker.jobs), 1) == 1

    def test_delay_waits_in_the_broker(self, amqp_settings: Settings, maker: DeadLetters) -> None:
        """--delay sends the job back to wait in the broker: not ready yet, counted as scheduled."""
        maker.add(TouchFile(path="/a", text="1"))
        result = _replay(amqp_settings, "--all", "--delay", "1h")
        assert result.exit_code == 0, result.output
        totals = run_json("status", settings=amqp_settings)["totals"]
        assert (totals["ready"], totals["scheduled"], totals["dead_lettered"]) == (0, 1, 0)


class TestReplayIsLossFree:
    def test_connection_killed_half_way_then_run_again(
        self, amqp_settings: Settings, maker: DeadLetters, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """1,000 dead letters, the CLI's connections closed by the broker half-way: a rerun brings every one back."""
        if not have_rabbitmqctl():
            pytest.skip("closing connections from the server side needs rabbitmqctl")
        message = job_message(TouchFile(path="/x", text="x"), maker.jobs)
        ids = set()
        for i in range(1000):
            copy = message.copy(message_id=f"job-{i:04d}")
            maker.publish(copy.encode(), record_for(copy), maker.jobs)
            ids.add(copy.message_id)
        killed: list[int] = []

        @contextmanager
        def progress_killing_half_way(total: int, label: str) -> Iterator[Callable[[], None]]:
            with progress(total, label) as advance:
                seen = 0

                def step() -> None:
                    nonlocal seen
                    advance()
                    seen += 1
                    if seen == total // 2 and not killed:
                        killed.append(close_cli_connections(amqp_settings.broker_url))

                yield step

        monkeypatch.setattr("jobflow.cli.dead_letters.progress", progress_killing_half_way)
        first = _replay(amqp_settings, "--all")
        assert killed == [2]  # the one reading dead letters and the one publishing them
        assert first.exit_code == 4, first.output
        assert "run the command again" in first.stderr
        left = maker.count(dead_letter_queue(maker.jobs))
        assert 0 < left < 1000
        assert left + maker.count(maker.jobs) >= 1000

        second = _replay(amqp_settings, "--all")
        assert second.exit_code == 0, second.output
        assert maker.settled(dead_letter_queue(maker.jobs), 0) == 0
        arrived = [m["message_id"] for m, _ in maker.drain(jobs_queue(amqp_settings.queue_prefix))]
        assert set(arrived) == ids
        assert len(arrived) - len(ids) <= 1  # a duplicate only for the one in flight when the connection died
