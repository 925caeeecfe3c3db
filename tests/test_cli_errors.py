"""Errors of the command line and the API, without a RabbitMQ: one line, the documented exit code, no traceback."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import structlog
from rich.console import Console

import jobflow
from jobflow.cli.amqp import Delivery
from jobflow.cli.errors import UsageProblem
from jobflow.cli.letters import DeadLetterView, read_dead_letter
from jobflow.cli.moves import refusal, would_fail_again
from jobflow.cli.output import dead_letter_table
from jobflow.cli.selection import resolve_ids, short_ids
from jobflow.dead_letter import HEADER

from .cli_helpers import ROOT, run_cli
from .dead_letters import job_message, record_for
from .worker_app import TouchFile


@pytest.fixture(autouse=True)
def _at_project_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(ROOT)
    yield
    structlog.reset_defaults()


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """A port that accepts TCP connections and never says a word: a hung broker, or not a broker at all."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"amqp://ops:s3cret-pw@127.0.0.1:{server.getsockname()[1]}/"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in accepted:
            conn.close()
        server.close()


def _one_line_error(output: str, secret: str = "s3cret-pw") -> str:
    """The error a command printed: exactly one ``Error:`` line, no traceback, no password."""
    assert "Traceback" not in output
    assert secret not in output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    return errors[0]


class TestBrokerFailuresExit4:
    @pytest.mark.parametrize(
        "command",
        [["status"], ["dead-letters", "list"], ["topology", "declare"], ["topology", "retime"]],
    )
    def test_broker_that_never_answers(self, silent_broker: str, command: list[str]) -> None:
        """A broker that accepts TCP but never speaks AMQP: exit 4 within seconds, one line saying so."""
        started = time.monotonic()
        result = run_cli(*command, "--broker", silent_broker)
        elapsed = time.monotonic() - started
        assert result.exit_code == 4, result.output
        line = _one_line_error(result.output)
        assert "did not complete the AMQP handshake" in line or "did not finish within" in line, line
        assert "amqp://ops:***@127.0.0.1:" in line
        assert elapsed < 15

    def test_refused_port_on_topology(self) -> None:
        """The topology commands report an unreachable broker as every command does."""
        for command in (["retime"], ["redeliver"]):
            result = run_cli("topology", *command, "--broker", "amqp://ops:s3cret-pw@127.0.0.1:1/")
            assert result.exit_code == 4, result.output
            assert "127.0.0.1:1" in _one_line_error(result.output)


class TestBadInputExit2:
    @pytest.mark.parametrize(
        "command", [["status"], ["dead-letters", "list"], ["topology", "declare"], ["topology", "redeliver"]]
    )
    def test_bad_url_query(self, command: list[str]) -> None:
        """A URL pika cannot read (?heartbeat=abc) is a usage error naming the URL, before any connection."""
        result = run_cli(*command, "--broker", "amqp://ops:s3cret-pw@127.0.0.1:1/?heartbeat=abc")
        assert result.exit_code == 2, result.output
        line = _one_line_error(result.output)
        assert "heartbeat" in line
        assert "amqp://ops:***@127.0.0.1:1/" in line

    @pytest.mark.parametrize("command", [["status"], ["topology", "declare"], ["topology", "retime"]])
    def test_bad_prefix(self, command: list[str]) -> None:
        """A --prefix RabbitMQ names cannot hold is a usage error naming the option."""
        result = run_cli(*command, "--broker", "amqp://ops:s3cret-pw@127.0.0.1:1/", "--prefix", "no spaces!")
        assert result.exit_code == 2, result.output
        assert "--prefix" in _one_line_error(result.output)

    def test_topology_needs_rabbitmq(self) -> None:
        result = run_cli("topology", "declare", "--broker", "memory://")
        assert result.exit_code == 2, result.output
        assert "needs RabbitMQ" in _one_line_error(result.output)


class TestBrokerIsNamed:
    def test_on_stderr_with_vhost_and_source(self) -> None:
        """Before connecting, a command names the broker (password masked), its vhost and where the URL came from."""
        result = run_cli("status", "--broker", "amqp://ops:s3cret-pw@127.0.0.1:1/billing", "--prefix", "app")
        assert result.exit_code == 4
        assert "broker: amqp://ops:***@127.0.0.1:1/billing (vhost 'billing'), queue prefix 'app' (from --broker)" in (
            result.stderr
        )
        assert "broker:" not in result.stdout

    def test_the_default_is_said_to_be_the_default(self) -> None:
        """The line says whether the URL came from JOBFLOW_BROKER_URL or is the default (neither was set)."""
        program = [sys.executable, "-c", "from jobflow.cli import main; main()", "status"]
        env = {"PATH": "/usr/bin:/bin", "JOBFLOW_BROKER_URL": "amqp://guest:guest@127.0.0.1:1/"}
        done = subprocess.run(program, cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=60)
        assert done.returncode == 4
        assert "broker: amqp://guest:***@127.0.0.1:1/ (vhost '/')" in done.stderr
        assert "(from JOBFLOW_BROKER_URL)" in done.stderr
        probe = [sys.executable, "-c", "from jobflow.cli.common import url_source; print(url_source(None))"]
        said = subprocess.run(
            probe, cwd=ROOT, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True
        )
        assert said.stdout.strip() == "the default: neither --broker nor JOBFLOW_BROKER_URL is set"


class TestClassKeywords:
    def test_unknown_keyword_names_it_and_the_accepted_ones(self, registry: jobflow.JobRegistry) -> None:
        """A class keyword jobflow does not take is a TypeError and a JobflowError naming it and the accepted ones."""
        with pytest.raises(jobflow.JobflowTypeError) as info:

            class Typo(jobflow.Job, registry=registry, queues="billing"):
                def execute(self, ctx: jobflow.JobContext) -> None: ...

        assert isinstance(info.value, TypeError)
        assert isinstance(info.value, jobflow.JobflowError)
        message = str(info.value)
        assert "Typo: unknown class keyword(s) 'queues'" in message
        for accepted in ("name=", "version=", "registry=", "abstract=", "retry=", "time_limit=", "queue="):
            assert accepted in message

        with pytest.raises(jobflow.JobflowTypeError, match="'urgent'"):

            class Cmd(jobflow.Command, registry=registry, urgent=True):
                x: int

    @pytest.mark.parametrize(
        ("options", "message"),
        [({"version": "2"}, "version must be an int"), ({"name": 5}, "name must be a str"), ({"retry": 3}, "retry")],
    )
    def test_wrong_types(self, registry: jobflow.JobRegistry, options: dict[str, object], message: str) -> None:
        with pytest.raises(jobflow.JobflowTypeError, match=message):

            class Bad(jobflow.Job, registry=registry, **options):
                def execute(self, ctx: jobflow.JobContext) -> None: ...

    def test_pydantic_config_keys_still_pass(self, registry: jobflow.JobRegistry) -> None:
        class Stripped(jobflow.Job, registry=registry, str_strip_whitespace=True):
            text: str

            def execute(self, ctx: jobflow.JobContext) -> None: ...

        assert Stripped(text="  hi ").text == "hi"

    def test_publish_command_create_takes_a_command(self) -> None:
        with pytest.raises(jobflow.JobflowTypeError, match=r"takes a jobflow\.Command instance, not TouchFile"):
            jobflow.PublishCommandJob.create(TouchFile(path="/a", text="t"))  # type: ignore[arg-type]


def _letter(job: jobflow.Job, failed_at: datetime | None = None, **record: object) -> DeadLetterView:
    message = job_message(job, "app.jobs")
    header = record_for(message, failed_at=failed_at, **record).to_header()  # type: ignore[arg-type]
    return read_dead_letter(
        "app.jobs.XQ", Delivery(tag=1, headers={HEADER: header}, body=message.encode(), redelivered=False)
    )


class TestIds:
    def test_short_ids_are_unique_prefixes(self) -> None:
        ids = ["3f0c1a2b-aaaa", "3f0c1a2b-abbb", "9a1b0000-0000", "raw-0123456789abcdef"]
        short = short_ids(ids)
        assert short == {
            "3f0c1a2b-aaaa": "3f0c1a2b-aa",
            "3f0c1a2b-abbb": "3f0c1a2b-ab",
            "9a1b0000-0000": "9a1b0000",
            "raw-0123456789abcdef": "raw-0123",
        }
        for ident, prefix in short.items():
            assert [i for i in ids if i.startswith(prefix)] == [ident]

    def test_resolving_prefixes(self) -> None:
        """An exact id wins, a unique prefix resolves, one naming nothing is reported, an ambiguous one is refused."""
        known = ["job-1", "job-10", "3f0c1a2b-aaaa", "3f0c1a2b-abbb"]
        resolved, missing = resolve_ids(["job-1", "3f0c1a2b-aa", "ffff"], known)
        assert resolved == {"job-1": "job-1", "3f0c1a2b-aa": "3f0c1a2b-aaaa"}
        assert missing == ["ffff"]
        with pytest.raises(
            UsageProblem, match=r"'3f0c' is ambiguous: 2 dead letters match \(3f0c1a2b-aaaa, 3f0c1a2b-abbb\)"
        ):
            resolve_ids(["3f0c"], known)
        with pytest.raises(UsageProblem, match="at least 4 characters"):
            resolve_ids(["3f"], known)

    def test_a_row_fits_80_columns(self) -> None:
        """Short ids, a compact time and an error cut to fit: each dead letter is one line of at most 80 columns."""
        letters = [
            _letter(
                TouchFile(path="/a", text=str(i)),
                failed_at=datetime(2030, 1, 31, 9, 5, tzinfo=UTC),
                error_type="app.payments.errors.GatewayTimeoutError",
                error_message="the gateway did not answer within 30 s " * 3,
                attempts=10,
            )
            for i in range(3)
        ]
        console = Console(width=80, record=True, file=io.StringIO())
        console.print(dead_letter_table(letters, 3, short_ids(letter.id for letter in letters), width=80))
        lines = console.export_text().splitlines()
        rows = [line for line in lines if "TouchFile" in line]
        assert len(rows) == 3
        assert all(len(line) <= 80 for line in lines)
        for letter, row in zip(letters, rows, strict=True):
            assert row.startswith(letter.id[:8] + " ")
            assert "app.payments" in row
            assert "30-01-31 09:05" in row


class TestReplayChecks:
    def test_structure_alone_needs_no_types(self) -> None:
        """Without modules a replay checks only that the body is a jobflow message."""
        assert refusal(_letter(TouchFile(path="/a", text="t"))) is None
        raw = read_dead_letter("app.jobs.XQ", Delivery(tag=1, headers={}, body=b"<xml/>", redelivered=False))
        assert "not a Dramatiq message" in (refusal(raw) or "")

    def test_with_types_what_would_fail_again_is_refused(self, registry: jobflow.JobRegistry) -> None:
        """With the types: unknown, or data the type now rejects, says why; data that fits passes."""

        class Charge(jobflow.Job, registry=registry):
            amount: int

            def execute(self, ctx: jobflow.JobContext) -> None: ...

        letter = _letter(Charge(amount=5))
        assert would_fail_again(letter, registry) is None
        assert "unknown job ('Charge', 1)" in (would_fail_again(letter, jobflow.JobRegistry()) or "")

        class ChargeV2(jobflow.Job, name="Charge2", registry=registry):
            amount: int

            def execute(self, ctx: jobflow.JobContext) -> None: ...

        other = jobflow.JobRegistry()

        class Stricter(jobflow.Job, name="Charge2", registry=other):
            amount: int
            currency: str

            def execute(self, ctx: jobflow.JobContext) -> None: ...

        why = would_fail_again(_letter(ChargeV2(amount=5)), other) or ""
        assert "its data does not fit Charge2 v1 (currency: Field required)" in why
        assert "invalid_payload" in why


def test_demo_runs_from_an_installed_package(tmp_path: Path) -> None:
    """Outside the project (no top-level `actors` importable), the demo runs jobflow's own example application."""
    program = [sys.executable, "-c", "from jobflow.cli import main; main()", "demo"]
    done = subprocess.run(program, cwd=tmp_path, capture_output=True, text=True, check=False, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All ran" in done.stdout
    probe = [sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('actors'))"]
    assert subprocess.run(probe, cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip() == "None"
