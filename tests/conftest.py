"""Fixtures: a fresh registry per test, unique in-memory brokers, and a real RabbitMQ.

Broker tests talk to the RabbitMQ at ``JOBFLOW_TEST_AMQP_URL`` (default: localhost, guest).
Each test session gets its own vhost when ``rabbitmqctl`` is at hand (deleted at the end, with
everything declared in it), and each test its own queue prefix. ``JOBFLOW_TEST_RABBITMQCTL`` names
the command that controls that broker (default ``rabbitmqctl``; for the RabbitMQ 4.x node of
``scripts/rabbitmq4``, what ``scripts/rabbitmq4 env`` prints). Without a reachable broker the
tests skip loudly, except under ``CI=true`` or ``JOBFLOW_REQUIRE_RABBITMQ=1``, where they fail.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pika
import pika.exceptions
import pytest

from jobflow import JobRegistry, Settings
from jobflow.broker.ladder import DelayTopology
from jobflow.broker.names import (
    cancel_stream,
    commands_queue,
    jobs_queue,
    routed_queue,
    schedules_queue,
    schedules_state_queue,
    schedules_status_queue,
)
from jobflow.log_config import reset_logging

AMQP_URL = os.environ.get("JOBFLOW_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REQUIRE_RABBITMQ = os.environ.get("CI") == "true" or os.environ.get("JOBFLOW_REQUIRE_RABBITMQ") == "1"
#: The command (with its leading arguments) that controls the broker of ``AMQP_URL``.
RABBITMQCTL = shlex.split(os.environ.get("JOBFLOW_TEST_RABBITMQCTL", "rabbitmqctl"))


@pytest.fixture(autouse=True)
def _no_logging_left_behind() -> Iterator[None]:
    """A test that ran the command line (it configures logging at WARNING, to a captured stream)
    leaves no set-up behind: a later test's ``capture_logs`` would miss every INFO event."""
    yield
    reset_logging()


def have_rabbitmqctl() -> bool:
    return bool(RABBITMQCTL) and shutil.which(RABBITMQCTL[0]) is not None


def rabbitmqctl(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``rabbitmqctl -q ARGS`` against the tests' broker."""
    return subprocess.run([*RABBITMQCTL, "-q", *args], check=check, capture_output=True, text=True, timeout=timeout)


def pytest_report_header() -> str:
    """The broker the RabbitMQ tests use and its version, so that a CI log shows which one ran."""
    where = f"{urlsplit(AMQP_URL).hostname}:{urlsplit(AMQP_URL).port or 5672}"
    try:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    except (pika.exceptions.AMQPError, OSError) as exc:
        return f"rabbitmq: not reachable at {where} ({type(exc).__name__})"
    try:
        impl: Any = connection._impl  # type: ignore[attr-defined]  # pika keeps the handshake's properties there
        raw = (impl.server_properties or {}).get("version", b"?")
    finally:
        connection.close()
    version = raw.decode() if isinstance(raw, bytes) else str(raw)
    return f"rabbitmq: RabbitMQ {version} at {where}, controlled with {shlex.join(RABBITMQCTL)}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that asks for RabbitMQ carries the marker, so `-m "not rabbitmq"` is the fast part."""
    for item in items:
        if "rabbitmq_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.rabbitmq)


@pytest.fixture
def registry() -> JobRegistry:
    """A registry of the test's own, so job classes of different tests never collide."""
    return JobRegistry()


@pytest.fixture
def memory_settings() -> Settings:
    """Settings for an in-memory broker nobody else in this process uses."""
    return Settings(broker_url=f"memory://test-{uuid.uuid4().hex}")


def _vhost_url(vhost: str) -> str:
    parts = urlsplit(AMQP_URL)
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


@pytest.fixture(scope="session")
def rabbitmq_base_url() -> Iterator[str]:
    """A reachable RabbitMQ, in a vhost of this session's own when the broker is local."""
    try:
        pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
    except (pika.exceptions.AMQPError, OSError) as exc:
        reason = f"RabbitMQ is not reachable at {urlsplit(AMQP_URL).hostname}:{urlsplit(AMQP_URL).port} ({exc!r})"
        if REQUIRE_RABBITMQ:
            pytest.fail(f"{reason}; CI=true / JOBFLOW_REQUIRE_RABBITMQ=1 require it", pytrace=False)
        pytest.skip(f"!!! BROKER TESTS SKIPPED: {reason}. Start it with `rabbitmq-server -detached`.")
    local = urlsplit(AMQP_URL).hostname in ("127.0.0.1", "localhost") and have_rabbitmqctl()
    if not local:
        yield AMQP_URL
        return
    vhost = f"jobflow-test-{uuid.uuid4().hex[:12]}"
    user = urlsplit(AMQP_URL).username or "guest"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield _vhost_url(vhost)
    finally:
        rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
def rabbitmq_url(rabbitmq_base_url: str) -> str:
    return rabbitmq_base_url


@pytest.fixture
def amqp_settings(rabbitmq_url: str) -> Iterator[Settings]:
    """Settings with a queue prefix of this test's own; its queues are deleted afterwards."""
    settings = Settings(broker_url=rabbitmq_url, queue_prefix=f"t-{uuid.uuid4().hex[:10]}")
    yield settings
    delete_declared(rabbitmq_url, settings)


#: The routed queues tests use (``queue=`` on their types or their schedule calls), deleted with the rest.
ROUTED_TEST_QUEUES = ("emails", "reports", "billing")


def delete_declared(url: str, settings: Settings) -> None:
    """Delete the work queues and the delay topology of one queue prefix."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        routed = [routed_queue(settings.queue_prefix, name) for name in ROUTED_TEST_QUEUES]
        for queue in (jobs_queue(settings.queue_prefix), commands_queue(settings.queue_prefix), *routed):
            for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
                channel.queue_delete(name)
        for named in (cancel_stream, schedules_queue, schedules_state_queue, schedules_status_queue):
            channel.queue_delete(named(settings.queue_prefix))
        DelayTopology(settings.queue_prefix).delete(channel)
    finally:
        connection.close()
