"""Logging: one event per step, each with the job's identity, one stream, and no secret ever shown."""

from __future__ import annotations

import io
import json
import logging
import threading
from datetime import UTC, datetime
from typing import Any

import dramatiq
import pytest
import structlog
from structlog.testing import capture_logs

import jobflow
from jobflow import JobRegistry
from jobflow.log_config import DRAMATIQ_FAILURE, DRAMATIQ_WORKER_THREAD, reset_logging
from jobflow.runner import HeldCommands, JobRunner, run_coroutine_here

FIELDS = ("job_id", "job_name", "job_version", "attempt", "queue")

CARD = "4929-5550-1234-0071"
KEY = "sk_live_9yWq2ZtR7uVb"
PASSWORD = "Pg-h0rse-battery-77"
SECRETS = (CARD, KEY, PASSWORD)


@pytest.fixture(autouse=True)
def _reset_structlog() -> Any:
    # The CLI, run in-process by other tests, quiets these libraries' loggers for the whole process.
    libraries = [logging.getLogger(name) for name in ("dramatiq", "pika")]
    levels = [library.level for library in libraries]
    for library in libraries:
        library.setLevel(logging.NOTSET)
    reset_logging()
    yield
    reset_logging()
    for library, level in zip(libraries, levels, strict=True):
        library.setLevel(level)


def charge_card(registry: JobRegistry, error: BaseException) -> Any:
    """A job whose data and services hold secrets, and whose ``execute`` keeps them in locals."""
    registry.services["payments_db"] = f"postgresql://payments:{PASSWORD}@db.internal/payments"

    class ChargeCard(jobflow.Job, name="ChargeCard", registry=registry):
        card_number: str
        api_key: str

        def execute(self, ctx: jobflow.JobContext) -> None:
            dsn, card, key = ctx.services["payments_db"], self.card_number, self.api_key
            assert all((dsn, card, key, repr(ctx)))
            raise error

    return ChargeCard


def fail_instantly(registry: JobRegistry, error: BaseException) -> None:
    job = charge_card(registry, error)(card_number=CARD, api_key=KEY)
    with pytest.raises(type(error)):
        jobflow.InstantJobScheduler(registry).schedule(job)


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} was logged"


class RecordingStream(io.StringIO):
    """Keeps every ``write`` call apart, to check that each record is written whole, once."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


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


class TestNoSecrets:
    @pytest.mark.parametrize("log_format", ["json", "console"])
    def test_failed_job_logs_no_data_services_or_locals(self, registry: JobRegistry, log_format: Any) -> None:
        """A failing job's traceback carries no local variables: no job data, no ctx.services, in either format."""
        out = io.StringIO()
        jobflow.configure_logging(log_format, stream=out)
        fail_instantly(registry, RuntimeError("the gateway declined the charge"))
        text = out.getvalue()
        assert "job.failed" in text
        assert "the gateway declined the charge" in text
        assert_no_secret(text)
        if log_format == "json":
            failed = next(e for e in map(json.loads, text.splitlines()) if e["event"] == "job.failed")
            frames = failed["exception"][0]["frames"]
            assert [f["name"] for f in frames][-1] == "execute"
            assert all("locals" not in frame for frame in frames)
        else:
            assert text.count("Traceback (most recent call last)") == 1

    def test_unconfigured_app_logs_to_stderr_only(
        self, registry: JobRegistry, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """InstantJobScheduler in an app that configured no logging writes to stderr, never stdout, without locals."""
        fail_instantly(registry, RuntimeError("the gateway declined the charge"))
        captured = capsys.readouterr()
        assert captured.out == ""
        assert "job.failed" in captured.err
        assert "RuntimeError: the gateway declined the charge" in captured.err
        assert len(captured.err.splitlines()) < 20
        assert_no_secret(captured.err)

    def test_context_repr_hides_services(self) -> None:
        """The repr of a job's or command's context names the job but not its services."""
        dsn = f"postgresql://payments:{PASSWORD}@db.internal/payments"
        job_ctx = jobflow.JobContext(
            job_id="j-1",
            job_name="ChargeCard",
            job_version=1,
            attempt=1,
            due_at=None,
            queue="q",
            log=structlog.get_logger(),
            command_bus=HeldCommands(),
            services={"payments_db": dsn},
        )
        command_ctx = jobflow.CommandContext(
            command_id="c-1",
            command_name="Refund",
            command_version=1,
            attempt=1,
            queue="q",
            job_id=None,
            log=structlog.get_logger(),
            services={"payments_db": dsn},
        )
        for ctx in (job_ctx, command_ctx):
            assert PASSWORD not in repr(ctx)
            assert "services" not in repr(ctx)
            assert "_id='" in repr(ctx)

    def test_job_data_only_on_request(self) -> None:
        """Job data is in no event by default; JOBFLOW_LOG_JOB_DATA (job_data=True) shows it, for development."""
        for shown in (False, True):
            out = io.StringIO()
            jobflow.configure_logging("json", stream=out, job_data=shown)
            fail_instantly(JobRegistry(), RuntimeError("declined"))
            events = {e["event"]: e for e in map(json.loads, out.getvalue().splitlines())}
            assert ("data" in events["job.started"]) is shown
            assert ("data" in events["job.failed"]) is shown
            assert (CARD in out.getvalue()) is shown
            assert PASSWORD not in out.getvalue()

    def test_rejected_data_is_not_quoted(self, registry: JobRegistry) -> None:
        """Data the job type rejects is described by field, without its value (pydantic's message quotes it)."""

        class Charge(jobflow.Job, registry=registry):
            amount_cents: int

            def execute(self, ctx: jobflow.JobContext) -> None: ...

        envelope = jobflow.JobEnvelope(
            name="Charge",
            version=1,
            data={"amount_cents": CARD},
            job_id="j-1",
            scheduled_at=datetime.now(UTC),
            due_at=datetime.now(UTC),
        )
        with pytest.raises(jobflow.InvalidPayloadError) as info:
            JobRunner(registry, HeldCommands()).run_job(
                envelope, attempt=1, queue="q", run_coroutine=run_coroutine_here
            )
        assert "amount_cents" in str(info.value)
        assert CARD not in str(info.value)
        assert info.value.__cause__ is None
        with pytest.raises(jobflow.InvalidPayloadError) as parsed:
            jobflow.JobEnvelope.parse({"name": "Charge", "version": "one", "data": {"card": CARD}})
        assert "version" in str(parsed.value)
        assert CARD not in str(parsed.value)


class TestOneStream:
    def test_stdlib_records_are_structlog_json(self) -> None:
        """Dramatiq's and pika's stdlib records come out as JSON lines like jobflow's own events."""
        out = io.StringIO()
        jobflow.configure_logging("json", stream=out)
        logging.getLogger("dramatiq.worker.Worker").info("Shutting down...")
        logging.getLogger("pika.adapters").warning("connection %s lost", "c1")
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [(e["event"], e["logger"], e["level"]) for e in lines] == [
            ("Shutting down...", "dramatiq.worker.Worker", "info"),
            ("connection c1 lost", "pika.adapters", "warning"),
        ]

    def test_replaces_dramatiqs_plain_handler(self) -> None:
        """The plain handler Dramatiq's basicConfig installed is replaced: no record is written twice."""
        plain = logging.StreamHandler(io.StringIO())
        logging.getLogger().addHandler(plain)
        out = io.StringIO()
        jobflow.configure_logging("json", stream=out)
        logging.getLogger("dramatiq.worker.Worker").warning("once")
        assert plain not in logging.getLogger().handlers
        assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["once"]

    def test_every_record_is_one_whole_write(self) -> None:
        """From many threads, structlog events and stdlib records each reach the stream as one line in one write."""
        out = RecordingStream()
        jobflow.configure_logging("json", stream=out)

        def emit(n: int) -> None:
            for i in range(200):
                structlog.get_logger().info("structlog.event", thread=n, i=i)
                logging.getLogger("dramatiq.worker.Worker").info("stdlib record %d %d", n, i)

        threads = [threading.Thread(target=emit, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(out.writes) == 4 * 200 * 2
        for write in out.writes:
            assert write.endswith("\n")
            assert write.count("\n") == 1
            json.loads(write)

    def test_expected_transient_error_is_one_line(self, registry: JobRegistry) -> None:
        """A TransientError is an expected failure: job.failed is one warning line, without a traceback."""
        out = io.StringIO()
        jobflow.configure_logging("console", stream=out)
        fail_instantly(registry, jobflow.TransientError("the gateway timed out"))
        failed = [line for line in out.getvalue().splitlines() if "job.failed" in line]
        assert len(failed) == 1
        assert "warning" in failed[0]
        assert "Traceback" not in out.getvalue()
        assert len(out.getvalue().splitlines()) == 2  # job.started, job.failed


class TestDramatiqRecords:
    @staticmethod
    def message(actor: str, *args: Any) -> dramatiq.Message[Any]:
        return dramatiq.Message(queue_name="q", actor_name=actor, args=args, kwargs={}, options={}, message_id="m-1")

    @staticmethod
    def failure(message: dramatiq.Message[Any]) -> None:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger(DRAMATIQ_WORKER_THREAD).error(DRAMATIQ_FAILURE, message, exc_info=True)

    def test_jobflow_failure_line_is_dropped(self) -> None:
        """Dramatiq's "Failed to process message" for a jobflow job is dropped: jobflow logged job.failed."""
        out = io.StringIO()
        jobflow.configure_logging("json", stream=out)
        envelope = {"name": "ChargeCard", "version": 1, "data": {"card_number": CARD}}
        self.failure(self.message("jobflow.run_job", envelope))
        assert out.getvalue() == ""

    def test_plain_actor_failure_shows_actor_and_id_not_args(self) -> None:
        """A plain actor's failure is kept, with its traceback, naming the message by actor and id, not its args."""
        out = io.StringIO()
        jobflow.configure_logging("json", stream=out)
        self.failure(self.message("send_receipt", CARD))
        (line,) = [json.loads(line) for line in out.getvalue().splitlines()]
        assert line["event"] == "Failed to process message send_receipt(id=m-1) with unhandled exception."
        assert line["exception"][0]["exc_type"] == "RuntimeError"
        assert CARD not in out.getvalue()

    def test_worker_thread_filtered_under_any_logging_setup(
        self, registry: JobRegistry, memory_settings: jobflow.Settings
    ) -> None:
        """Declaring jobflow's actors filters Dramatiq's worker-thread logger itself, whatever handler the app set."""
        theirs = io.StringIO()
        handler = logging.StreamHandler(theirs)
        thread_logger = logging.getLogger(DRAMATIQ_WORKER_THREAD)
        thread_logger.addHandler(handler)
        try:
            jobflow.declare_actors(jobflow.create_broker(memory_settings), registry=registry)
            thread_logger.warning("Message %s was skipped.", self.message("jobflow.run_job", {"data": {"k": CARD}}))
        finally:
            thread_logger.removeHandler(handler)
        assert "Message jobflow.run_job(id=m-1) was skipped." in theirs.getvalue()
        assert CARD not in theirs.getvalue()
