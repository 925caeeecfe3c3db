"""`jobflow jobs` and `jobflow schedule`."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pika
import pytest
import structlog

from jobflow import Settings
from jobflow.broker.names import jobs_queue

from .cli_helpers import ROOT, run_cli, run_json
from .dead_letters import dead_letters


@pytest.fixture(autouse=True)
def _at_project_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(ROOT)
    yield
    structlog.reset_defaults()


class TestJobs:
    def test_json_lists_types_versions_and_schemas(self) -> None:
        """`jobs --json` parses and lists each job and command with its version, schema and handler."""
        doc = run_json("jobs", "-m", "tests.worker_app")
        touch = next(j for j in doc["jobs"] if j["name"] == "TouchFile")
        assert touch["version"] == 1
        assert touch["class"] == "tests.worker_app.TouchFile"
        assert set(touch["schema"]["properties"]) == {"path", "text"}
        assert any(j["name"] == "PublishCommand" for j in doc["jobs"])
        write = next(c for c in doc["commands"] if c["name"] == "WriteFile")
        assert write["handler"] == "tests.worker_app.write_file"

    def test_text_lists_types(self) -> None:
        """Without --json the types are listed one per line with their fields."""
        result = run_cli("jobs", "-m", "tests.worker_app")
        assert result.exit_code == 0, result.output
        assert "TouchFile v1" in result.output
        assert "['path', 'text']" in result.output

    def test_missing_module_is_a_usage_error(self) -> None:
        """An -m module that cannot be imported is a usage error naming it."""
        result = run_cli("jobs", "-m", "no_such_module_here")
        assert result.exit_code == 2
        assert "no_such_module_here" in result.stderr


class TestScheduleValidation:
    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["NoSuchJob", "--data", "{}"], "no job type 'NoSuchJob' is registered"),
            (["TouchFile", "--version", "7", "--data", "{}"], "no version 7"),
            (["TouchFile", "--data", "not json"], "--data is not JSON"),
            (["TouchFile", "--data", "[1]"], "must be a JSON object"),
            (["TouchFile", "--data", '{"path": "/x"}'], "text: Field required"),
            (["TouchFile", "--data", '{"path": "/x", "text": "t", "extra": 1}'], "extra: Extra inputs"),
            (["TouchFile", "--data", '{"path": "/x", "text": "t"}', "--at", "2030-01-01T00:00:00"], "no timezone"),
            (["TouchFile", "--data", '{"path": "/x", "text": "t"}', "--delay", "soon"], "not a duration"),
            (
                ["TouchFile", "--data", '{"path": "/x", "text": "t"}', "--delay", "1h", "--at", "2030-01-01T00:00Z"],
                "not both",
            ),
            (["TouchFile", "--data", '{"path": "/x", "text": "t"}', "--delay", "10000d"], "at most"),
        ],
    )
    def test_usage_errors(self, args: list[str], message: str) -> None:
        """Unknown types, invalid data and bad times are usage errors (exit 2) that say what is wrong."""
        settings = Settings(broker_url="amqp://guest:guest@127.0.0.1:1/", queue_prefix="never-used")
        result = run_cli("schedule", *args, "-m", "tests.worker_app", settings=settings)
        assert result.exit_code == 2, result.output
        assert message in result.stderr

    def test_memory_broker_is_refused(self) -> None:
        """The operators' commands need RabbitMQ: memory:// is a usage error."""
        result = run_cli("status", "--broker", "memory://")
        assert result.exit_code == 2
        assert "needs RabbitMQ" in result.stderr


class TestSchedule:
    def test_publishes_validated_job(self, amqp_settings: Settings) -> None:
        """A valid job is published to the jobs queue; stdout is its id alone."""
        result = run_cli(
            "schedule", "TouchFile", "--data", '{"path": "/x", "text": "hi"}', "-m", "tests.worker_app",
            settings=amqp_settings,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        job_id = result.stdout.strip()
        with dead_letters(amqp_settings) as maker:
            taken = maker.drain(jobs_queue(amqp_settings.queue_prefix))
        assert [m["message_id"] for m, _ in taken] == [job_id]
        envelope = taken[0][0]["args"][0]
        assert (envelope["name"], envelope["version"], envelope["data"]) == (
            "TouchFile",
            1,
            {"path": "/x", "text": "hi"},
        )

    def test_invalid_data_publishes_nothing(self, amqp_settings: Settings) -> None:
        """Data the type rejects is refused before anything reaches the broker."""
        result = run_cli(
            "schedule", "TouchFile", "--data", '{"path": 1}', "-m", "tests.worker_app", settings=amqp_settings
        )
        assert result.exit_code == 2
        connection = pika.BlockingConnection(pika.URLParameters(amqp_settings.broker_url))
        try:
            with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
                connection.channel().queue_declare(jobs_queue(amqp_settings.queue_prefix), passive=True)
        finally:
            connection.close()

    def test_delayed_job_waits_in_the_broker(self, amqp_settings: Settings) -> None:
        """A job scheduled --delay 2h is not ready yet and `status` counts it as scheduled; --json parses."""
        doc = run_json(
            "schedule", "TouchFile", "--data", '{"path": "/x", "text": "later"}', "--delay", "2h",
            "-m", "tests.worker_app", settings=amqp_settings,
        )  # fmt: skip
        assert doc["name"] == "TouchFile"
        assert doc["job_id"]
        status = run_json("status", settings=amqp_settings)
        assert status["totals"]["scheduled"] == 1
        assert status["totals"]["ready"] == 0

    def test_at_a_time(self, amqp_settings: Settings) -> None:
        """--at with a timezone schedules for that time; a past time means now."""
        at = (datetime.now(UTC) + timedelta(hours=3)).astimezone(timezone(timedelta(hours=2))).replace(microsecond=0)
        args = ["schedule", "TouchFile", "--data", '{"path": "/x", "text": "t"}', "-m", "tests.worker_app"]
        later = run_json(*args, "--at", at.isoformat(), settings=amqp_settings)
        assert datetime.fromisoformat(later["due_at"]) == at
        now = run_json(*args, "--at", "2020-01-01T00:00:00+02:00", settings=amqp_settings)
        assert datetime.fromisoformat(now["due_at"]) > datetime(2025, 1, 1, tzinfo=UTC)
        totals = run_json("status", settings=amqp_settings)["totals"]
        assert (totals["ready"], totals["scheduled"]) == (1, 1)
