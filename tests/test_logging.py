"""Logging: one event per step, each with the job's identity, and a password never shown."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

import jobflow
from jobflow import JobRegistry

FIELDS = ("job_id", "job_name", "job_version", "attempt", "queue")


@pytest.fixture(autouse=True)
def _reset_structlog() -> Any:
    yield
    structlog.reset_defaults()


class TestJobEvents:
    def test_started_and_succeeded_carry_identity(self, registry: JobRegistry) -> None:
        """started and succeeded are logged once each with id, name, version, attempt, queue; succeeded has duration."""

        class Hello(jobflow.Job, name="Hello", version=4, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                ctx.log.info("inside", detail=1)

        with capture_logs() as logs:
            job_id = jobflow.InstantJobScheduler(registry).schedule(Hello())
        by_event = {e["event"]: e for e in logs}
        assert [e["event"] for e in logs] == ["job.started", "inside", "job.succeeded"]
        for event in ("job.started", "inside", "job.succeeded"):
            entry = by_event[event]
            assert {k: entry[k] for k in FIELDS} == {
                "job_id": job_id,
                "job_name": "Hello",
                "job_version": 4,
                "attempt": 1,
                "queue": "instant",
            }
        assert by_event["job.succeeded"]["duration_ms"] >= 0
        assert "lateness_ms" in by_event["job.started"]

    def test_failed_event_has_error(self, registry: JobRegistry) -> None:
        """A failing job logs job.failed with the error type and message, and no succeeded."""

        class Broken(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                raise KeyError("missing")

        with capture_logs() as logs, pytest.raises(KeyError):
            jobflow.InstantJobScheduler(registry).schedule(Broken())
        events = [e["event"] for e in logs]
        assert events == ["job.started", "job.failed"]
        failed = logs[-1]
        assert failed["error_type"] == "KeyError"
        assert failed["log_level"] == "error"
        assert failed["job_name"] == "Broken"

    def test_contextvars_reach_other_loggers(self, registry: JobRegistry) -> None:
        """Any structlog logger used inside a job sees the job's fields through contextvars."""
        out = io.StringIO()
        jobflow.configure_logging("json", stream=out)

        class UsesOwnLogger(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                structlog.get_logger("myapp").info("own_logger")

        job_id = jobflow.InstantJobScheduler(registry).schedule(UsesOwnLogger())
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        own = next(line for line in lines if line["event"] == "own_logger")
        assert own["job_id"] == job_id
        assert own["job_name"] == "UsesOwnLogger"
        after = structlog.contextvars.get_contextvars()
        assert "job_id" not in after


class TestFormats:
    def test_json_when_not_a_terminal(self) -> None:
        """auto renders JSON lines when the stream is not a terminal."""
        out = io.StringIO()
        jobflow.configure_logging("auto", stream=out)
        structlog.get_logger().info("hello", n=1)
        assert json.loads(out.getvalue()) | {"timestamp": None} == {
            "event": "hello",
            "n": 1,
            "level": "info",
            "timestamp": None,
        }

    def test_console_on_request(self) -> None:
        """console renders readable lines, not JSON."""
        out = io.StringIO()
        jobflow.configure_logging("console", stream=out)
        structlog.get_logger().info("hello", n=1)
        text = out.getvalue()
        assert "hello" in text
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)

    def test_level_filters(self) -> None:
        """Events below the configured level are dropped."""
        out = io.StringIO()
        jobflow.configure_logging("json", level="WARNING", stream=out)
        structlog.get_logger().info("quiet")
        structlog.get_logger().warning("loud")
        assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["loud"]


class TestRedaction:
    @pytest.mark.parametrize(
        ("url", "shown"),
        [
            ("amqp://guest:s3cret@rabbit:5672/vh", "amqp://guest:***@rabbit:5672/vh"),
            ("amqps://u:p%40ss@host/", "amqps://u:***@host/"),
            ("amqp://host/", "amqp://host/"),
            ("memory://", "memory://"),
        ],
    )
    def test_password_is_masked(self, url: str, shown: str) -> None:
        """redact_url masks the password and nothing else."""
        assert jobflow.redact_url(url) == shown

    def test_bad_scheme_error_hides_password(self) -> None:
        """An unsupported URL is a ConfigurationError that does not show the password."""
        with pytest.raises(jobflow.ConfigurationError) as info:
            jobflow.create_broker(jobflow.Settings(broker_url="redis://u:hunter2@host/"))
        assert "hunter2" not in str(info.value)
        assert "amqp://" in str(info.value)
