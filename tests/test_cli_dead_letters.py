"""`jobflow dead-letters list | show | purge`: inspect dead letters without losing any."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import structlog

from jobflow import Settings
from jobflow.broker.names import commands_queue, jobs_queue
from jobflow.dead_letter import dead_letter_queue

from .cli_helpers import ROOT, run_cli, run_json
from .dead_letters import DeadLetters, dead_letters
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


def _xq(settings: Settings) -> str:
    return dead_letter_queue(jobs_queue(settings.queue_prefix))


class TestList:
    def test_rows_and_nothing_removed(self, amqp_settings: Settings, maker: DeadLetters) -> None:
        """Each dead letter is one row with its id, job, error and attempts; listing leaves all of them in place."""
        first = maker.add(
            TouchFile(path="/a", text="1"), error_type="ValueError", error_message="bad value", attempts=4
        )
        second = maker.add(TouchFile(path="/b", text="2"), error_type="KeyError", error_message="'k'")
        doc = run_json("dead-letters", "list", settings=amqp_settings)
        assert doc["total"] == 2
        rows = {row["id"]: row for row in doc["dead_letters"]}
        assert set(rows) == {first, second}
        row = rows[first]
        assert (row["job"], row["version"], row["kind"], row["queue"]) == (
            "TouchFile",
            1,
            "job",
            jobs_queue(amqp_settings.queue_prefix),
        )
        assert (row["error_type"], row["error_message"], row["attempts"], row["reason"]) == (
            "ValueError",
            "bad value",
            4,
            "retries_exhausted",
        )
        assert datetime.fromisoformat(row["failed_at"]) <= datetime.now(UTC)
        assert maker.settled(_xq(amqp_settings), 2) == 2
        again = run_json("dead-letters", "list", settings=amqp_settings)
        assert {row["id"] for row in again["dead_letters"]} == {first, second}
        assert maker.settled(_xq(amqp_settings), 2) == 2

    def test_table(self, amqp_settings: Settings, maker: DeadLetters) -> None:
        """Without --json a table shows the rows, each within 80 columns, by a short id that `show` accepts."""
        ident = maker.add(TouchFile(path="/a", text="1"), error_type="ValueError", error_message="bad value")
        result = run_cli("dead-letters", "list", settings=amqp_settings, env={"COLUMNS": "80"})  # a terminal's
        assert result.exit_code == 0, result.output
        assert ident[:8] in result.stdout
        assert ident not in result.stdout  # the full UUID wraps an 80-column row
        assert max(len(line) for line in result.stdout.splitlines()) <= 80, result.stdout
        assert "ValueError: bad value" in result.stdout
        assert "1 dead letter(s)" in result.stdout
        shown = run_cli("dead-letters", "show", ident[:8], settings=amqp_settings)
        assert shown.exit_code == 0, shown.output
        assert ident in shown.stdout

    def test_raw_dead_letters_are_listed_with_what_is_known(self, amqp_settings: Settings, maker: DeadLetters) -> None:
        """A body RabbitMQ dead-lettered itself shows its x-death reason and size; `show` has its first bytes."""
        maker.rejected(b"\xff\xfenot json at all")
        doc = run_json("dead-letters", "list", settings=amqp_settings)
        (row,) = doc["dead_letters"]
        assert row["id"].startswith("raw-")
        assert (row["reason"], row["size"], row["jobflow_record"], row["job"]) == ("rabbitmq:rejected", 17, False, None)
        assert row["body_head"] == "\\xff\\xfenot json at all"
        shown = run_json("dead-letters", "show", row["id"], settings=amqp_settings)
        assert shown["body_head"] == "\\xff\\xfenot json at all"
        assert shown["x_death"][0]["reason"] == "rejected"
        assert shown["x_death"][0]["queue"] == jobs_queue(amqp_settings.queue_prefix)
        result = run_cli("dead-letters", "list", settings=amqp_settings)
        assert "rabbitmq:rejected (17 bytes, x-death count 1, starts b'\\xff\\xfenot json at all')" in result.stdout

    def test_filters(self, amqp_settings: Settings, maker: DeadLetters) -> None:
        """--job, --error, --since, --queue and --limit narrow the rows; `total` counts every match."""
        old = datetime.now(UTC) - timedelta(days=3)
        a = maker.add(TouchFile(path="/a", text="1"), error_type="app.errors.Boom", failed_at=old)
        b = maker.add(TouchFile(path="/b", text="2"), error_type="ValueError")
        c = maker.add(
            TouchFile(path="/c", text="3"), error_type="ValueError", queue=commands_queue(amqp_settings.queue_prefix)
        )

        def ids(*args: str) -> set[str]:
            return {
                row["id"] for row in run_json("dead-letters", "list", *args, settings=amqp_settings)["dead_letters"]
            }

        assert ids() == {a, b, c}
        assert ids("--error", "Boom") == {a}
        assert ids("--error", "app.errors.Boom") == {a}
        assert ids("--error", "errors.Boom") == set()
        assert ids("--error", "ValueError", "--queue", "jobs") == {b}
        assert ids("--queue", commands_queue(amqp_settings.queue_prefix)) == {c}
        assert ids("--since", "1d") == {b, c}
        assert ids("--since", (old - timedelta(minutes=1)).isoformat()) == {a, b, c}
        assert ids("--job", "TouchFile") == {a, b, c}
        assert ids("--job", "Other") == set()
        limited = run_json("dead-letters", "list", "--limit", "1", settings=amqp_settings)
        assert (limited["total"], len(limited["dead_letters"])) == (3, 1)

    def test_queue_takes_any_routed_queue_but_no_bad_name(self, amqp_settings: Settings) -> None:
        """--queue names a queue of the prefix (routed ones too); a name no queue can have is a usage error."""
        result = run_cli("dead-letters", "list", "--queue", "not a queue", settings=amqp_settings)
        assert result.exit_code == 2
        assert "is not a queue name" in result.stderr
        doc = run_json("dead-letters", "list", "--queue", "nope", settings=amqp_settings)
        assert (doc["total"], doc["dead_letters"]) == (0, [])


class TestShow:
    def test_everything(self, amqp_settings: Settings, maker: DeadLetters) -> None:
        """`show ID --json` has the traceback, the job's data and the full record."""
        ident = maker.add(TouchFile(path="/a", text="data!"), error_type="ValueError", error_message="bad value")
        doc = run_json("dead-letters", "show", ident, settings=amqp_settings)
        assert doc["id"] == ident
        assert doc["data"] == {"path": "/a", "text": "data!"}
        assert doc["traceback"].endswith("ValueError: bad value\n")
        assert doc["record"]["host"]
        assert doc["copies"] == 1
        assert doc["message"]["message_id"] == ident
        result = run_cli("dead-letters", "show", ident, settings=amqp_settings)
        assert result.exit_code == 0, result.output
        assert "Traceback (most recent call last)" in result.stdout
        assert '"text": "data!"' in result.stdout
        assert maker.settled(_xq(amqp_settings), 1) == 1

    def test_not_found(self, amqp_settings: Settings, maker: DeadLetters) -> None:
        """An id no dead letter has exits 3."""
        maker.add(TouchFile(path="/a", text="1"))
        result = run_cli("dead-letters", "show", "no-such-id", settings=amqp_settings)
        assert result.exit_code == 3
        assert "no dead letter with id 'no-such-id'" in result.stderr


class TestPurge:
    def test_asks_first(self, amqp_settings: Settings, maker: DeadLetters) -> None:
        """Without --yes purge asks; "n" (or no answer) keeps everything, "y" deletes."""
        maker.add(TouchFile(path="/a", text="1"))
        maker.add(TouchFile(path="/b", text="2"))
        declined = run_cli("dead-letters", "purge", "--all", settings=amqp_settings, input="n\n")
        assert declined.exit_code == 1
        assert "Purge 2 dead letter(s) for good?" in declined.output
        no_answer = run_cli("dead-letters", "purge", "--all", settings=amqp_settings, input="")
        assert no_answer.exit_code == 1
        assert maker.settled(_xq(amqp_settings), 2) == 2
        accepted = run_cli("dead-letters", "purge", "--all", settings=amqp_settings, input="y\n")
        assert accepted.exit_code == 0, accepted.output
        assert "purged 2 dead letter(s)" in accepted.stdout
        assert maker.settled(_xq(amqp_settings), 0) == 0

    def test_by_id_and_filter(self, amqp_settings: Settings, maker: DeadLetters) -> None:
        """Purge removes exactly the chosen dead letters: by id, or by filter; --json parses."""
        a = maker.add(TouchFile(path="/a", text="1"), error_type="KeyError")
        b = maker.add(TouchFile(path="/b", text="2"), error_type="ValueError")
        c = maker.add(TouchFile(path="/c", text="3"), error_type="ValueError")
        doc = run_json("dead-letters", "purge", a, "--yes", settings=amqp_settings)
        assert (doc["purged"], doc["not_found"]) == (1, [])
        assert [row["id"] for row in doc["dead_letters"]] == [a]
        left = run_json("dead-letters", "list", settings=amqp_settings)["dead_letters"]
        assert {row["id"] for row in left} == {b, c}
        doc = run_json("dead-letters", "purge", "--error", "ValueError", "--yes", settings=amqp_settings)
        assert doc["purged"] == 2
        assert maker.settled(_xq(amqp_settings), 0) == 0

    def test_missing_ids_and_no_target(self, amqp_settings: Settings, maker: DeadLetters) -> None:
        """An id not there exits 3 (the others are purged); no IDs, --all or filter is a usage error."""
        a = maker.add(TouchFile(path="/a", text="1"))
        result = run_cli("dead-letters", "purge", a, "not-there", "--yes", settings=amqp_settings)
        assert result.exit_code == 3
        assert "not-there" in result.stderr
        assert maker.settled(_xq(amqp_settings), 0) == 0
        bare = run_cli("dead-letters", "purge", "--yes", settings=amqp_settings)
        assert bare.exit_code == 2
        assert "IDs, --all, or filters" in bare.stderr
