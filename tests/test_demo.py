"""`jobflow demo`: the EventFlow examples end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions
import pytest
import structlog
from click.testing import CliRunner

from jobflow import Settings
from jobflow.broker.names import jobs_queue
from jobflow.cli import main

from .conftest import have_rabbitmqctl, rabbitmqctl
from .faults import message_count
from .helpers import eventually

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _at_project_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(ROOT)
    yield
    structlog.reset_defaults()


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["demo", *args], catch_exceptions=False)
    return result.exit_code, result.output


def test_demo_in_memory() -> None:
    """The demo runs every example on the in-memory broker and exits 0."""
    code, out = _run()
    assert code == 0, out
    assert out.count("  ok  ") == 5
    assert "Flaky job (fails twice, then succeeds)" in out
    assert "3 attempt(s)" in out
    assert "All ran" in out


def test_demo_needs_the_example_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the project's root the demo says where to run it."""
    monkeypatch.chdir(tmp_path)
    code, out = _run("--module", "no_such_app")
    assert code == 1
    assert "run the demo from the project's root" in out


def test_demo_on_rabbitmq(rabbitmq_url: str) -> None:
    """With --broker amqp://… the demo runs on RabbitMQ on queues of its own and cleans them up."""
    code, out = _run("--broker", rabbitmq_url)
    assert code == 0, out
    assert out.count("  ok  ") == 5
    assert "guest:guest@" not in out
    prefix = re.search(r"\(queues (\S+)\.\*\)", out)
    assert prefix is not None
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
            connection.channel().queue_declare(f"{prefix.group(1)}.jobs", passive=True)
    finally:
        connection.close()
    if not have_rabbitmqctl():
        return
    vhost = unquote(urlsplit(rabbitmq_url).path[1:]) or "/"
    names = [
        line.strip()
        for kind in ("list_queues", "list_exchanges")
        for line in rabbitmqctl(kind, "-p", vhost, "--no-table-headers", "name").stdout.splitlines()
    ]
    assert [n for n in names if n.startswith(prefix.group(1) + ".")] == []  # was 39 queues, 78 exchanges


@pytest.mark.rabbitmq
def test_compose_producer_schedules_the_demo_jobs(amqp_settings: Settings) -> None:
    """compose.yaml's one-shot producer: four jobs on the deployment's queues, the broker named masked."""
    env = {
        **os.environ,
        "JOBFLOW_BROKER_URL": amqp_settings.broker_url,
        "JOBFLOW_QUEUE_PREFIX": amqp_settings.queue_prefix,
    }
    out = subprocess.run(
        [sys.executable, "-m", "actors.produce"],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    ids = re.findall(r"^  ([0-9a-f-]{36})  ", out.stdout, re.MULTILINE)
    assert len(set(ids)) == 4, out.stdout
    assert ":guest@" not in out.stdout + out.stderr
    queue = jobs_queue(amqp_settings.queue_prefix)
    # Three run now; the fourth waits 5 s in the delay ladder.
    eventually(lambda: message_count(amqp_settings.broker_url, queue) == 3, timeout=10, what="3 jobs queued now")
