"""A real worker's whole output: no secret in it, one stream, one event per failure, JSON lines that parse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog

import jobflow
from jobflow import Settings
from jobflow.broker.names import jobs_queue
from jobflow.dead_letter import DeadLetter, dead_letter_queue

from .cli_helpers import ROOT, run_cli
from .faults import drain, message_count, wait_for_consumer
from .helpers import eventually
from .leaky_app import CARD_NUMBER, DSN_PASSWORD, SECRETS, ChargeCard

DRAMATIQ = [sys.executable, "-m", "dramatiq", "jobflow.actors", "tests.leaky_app", "-p", "1", "-t", "2"]
JOBFLOW_WORKER = [str(Path(sys.executable).parent / "jobflow"), "worker", "tests.leaky_app", "-p", "1", "-t", "2"]

#: What Dramatiq's supervisor process (which never imports jobflow) writes under `dramatiq` itself.
SUPERVISOR = "[dramatiq.MainProcess]"


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@contextmanager
def worker(command: list[str], settings: Settings, log_format: str, log: Path) -> Iterator[None]:
    """A worker process on this test's queues, its stdout and stderr in ``log``; stopped with SIGTERM."""
    env = {
        **os.environ,
        "JOBFLOW_BROKER_URL": settings.broker_url,
        "JOBFLOW_QUEUE_PREFIX": settings.queue_prefix,
        "JOBFLOW_LOG_FORMAT": log_format,
    }
    env.pop("JOBFLOW_LOG_JOB_DATA", None)
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for_consumer(settings.broker_url, jobs_queue(settings.queue_prefix))
            yield
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def charge_until_dead_lettered(settings: Settings) -> str:
    """Schedule the failing ChargeCard and wait until its dead letter is in the jobs' ``.XQ``."""
    with jobflow.BrokerJobScheduler(settings=settings) as scheduler:
        job_id = scheduler.schedule_now(ChargeCard(card_number=CARD_NUMBER, api_key=SECRETS[1]))
    xq = dead_letter_queue(jobs_queue(settings.queue_prefix))
    eventually(lambda: message_count(settings.broker_url, xq) == 1, what="the dead letter")
    return job_id


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} was logged"


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of a JSON-mode worker's output, parsed (a line that is not one JSON object fails)."""
    return [json.loads(line) for line in text.splitlines()]


class TestWorkerOutput:
    @pytest.mark.parametrize("log_format", ["json", "console"])
    def test_no_secret_in_the_log_or_the_dead_letter(
        self, amqp_settings: Settings, tmp_path: Path, log_format: str
    ) -> None:
        """`dramatiq jobflow.actors`: neither data nor services reach the log; the dead letter keeps the data only."""
        log = tmp_path / "worker.log"
        with worker(DRAMATIQ, amqp_settings, log_format, log):
            job_id = charge_until_dead_lettered(amqp_settings)
            shown = run_cli("dead-letters", "show", job_id, settings=amqp_settings)
        text = log.read_text()
        assert "job.dead_lettered" in text, text[-3000:]
        assert_no_secret(text)
        # Dramatiq's own failure line (and traceback) is gone: jobflow's job.failed replaces it.
        assert "Failed to process message" not in text
        assert text.count("job.failed") == 2
        # One traceback, the unexpected error's: the expected TransientError is one line.
        assert text.count("the gateway declined the charge") >= 1
        assert text.count("Traceback (most recent call last)") == (1 if log_format == "console" else 0)
        assert "TransientError: the gateway timed out" not in text
        assert shown.exit_code == 0, shown.output
        assert DSN_PASSWORD not in shown.output
        assert "RuntimeError: the gateway declined the charge" in shown.output
        if log_format == "json":
            lines = [line for line in text.splitlines() if SUPERVISOR not in line]
            events = json_lines("\n".join(lines))
            failed = [e for e in events if e.get("event") == "job.failed"]
            assert [(e["attempt"], e["level"], "exception" in e) for e in failed] == [
                (1, "warning", False),
                (2, "error", True),
            ]
            frames = failed[1]["exception"][0]["frames"]
            assert frames
            assert all("locals" not in frame for frame in frames)
        (letter,) = drain(amqp_settings.broker_url, dead_letter_queue(jobs_queue(amqp_settings.queue_prefix)))
        record = DeadLetter.from_headers(letter.headers)
        assert record is not None
        assert record.traceback is not None
        assert "RuntimeError: the gateway declined the charge" in record.traceback
        assert DSN_PASSWORD not in json.dumps(letter.headers, default=str)
        assert DSN_PASSWORD not in letter.body.decode()
        assert CARD_NUMBER in letter.body.decode()  # the job's own data stays in the body, for a replay

    def test_jobflow_worker_prints_only_json_lines(self, amqp_settings: Settings, tmp_path: Path) -> None:
        """`jobflow worker`: every line of the whole output, Dramatiq's supervisor's included, is one JSON object."""
        log = tmp_path / "worker.log"
        with worker(JOBFLOW_WORKER, amqp_settings, "json", log):
            charge_until_dead_lettered(amqp_settings)
        text = log.read_text()
        assert_no_secret(text)
        events = json_lines(text)
        by_logger = {e.get("logger") for e in events}
        assert {"dramatiq.MainProcess", "dramatiq.worker.Worker"} <= by_logger
        (started,) = [e for e in events if e["event"] == "worker.started"]
        prefix = amqp_settings.queue_prefix
        assert started["jobs"]["ChargeCard"] == [1]
        assert jobs_queue(prefix) in started["queues"]
        assert f"{prefix}.commands" in started["queues"]
        assert started["broker"] == jobflow.redact_url(amqp_settings.broker_url)
        assert [e["event"] for e in events if e.get("job_name") == "ChargeCard"] == [
            "job.started",
            "job.failed",
            "job.retry_scheduled",
            "job.started",
            "job.failed",
            "job.dead_lettered",
        ]
