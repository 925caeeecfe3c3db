"""`jobflow status`, and how every command reports a broker it cannot use."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

import pytest
import structlog

import jobflow
from jobflow import Settings
from jobflow.broker.names import DELAY_LEVELS

from .cli_helpers import ROOT, run_cli, run_json
from .dead_letters import dead_letters
from .worker_app import TouchFile


@pytest.fixture(autouse=True)
def _at_project_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(ROOT)
    yield
    structlog.reset_defaults()


class TestStatus:
    def test_counts_per_queue_and_totals(self, amqp_settings: Settings) -> None:
        """Ready, scheduled (in the delay topology) and dead-lettered counts, per queue and in total."""
        with jobflow.BrokerJobScheduler(settings=amqp_settings) as scheduler:
            scheduler.schedule_now(TouchFile(path="/a", text="1"))
            scheduler.schedule_now(TouchFile(path="/b", text="2"))
            scheduler.schedule(TouchFile(path="/c", text="3"), delay=timedelta(hours=1))
        with dead_letters(amqp_settings) as maker:
            for _ in range(3):
                maker.add(TouchFile(path="/d", text="4"))
        doc = run_json("status", settings=amqp_settings)
        rows = {row["queue"].removeprefix(f"{amqp_settings.queue_prefix}."): row for row in doc["queues"]}
        jobs, commands = rows["jobs"], rows["commands"]  # and the routed queues of the types imported here
        assert (jobs["queue"], jobs["exists"], jobs["ready"], jobs["dead_lettered"]) == (
            f"{amqp_settings.queue_prefix}.jobs",
            True,
            2,
            3,
        )
        assert jobs["unacked"] is None
        assert commands["ready"] == 0
        assert doc["delay_topology"] == {"scheduled": 1, "levels_found": DELAY_LEVELS, "unroutable": 0}
        assert doc["totals"] == {"ready": 2, "consumers": 0, "scheduled": 1, "dead_lettered": 3}
        table = run_cli("status", settings=amqp_settings).stdout
        assert f"delay topology ({DELAY_LEVELS} levels)" in table
        assert "guest:guest" not in doc["broker"]

    def test_missing_queues_count_zero(self, amqp_settings: Settings) -> None:
        """Queues never declared are shown as such, with zero counts, and the table says so."""
        doc = run_json("status", settings=amqp_settings)
        names = [q["queue"].removeprefix(f"{amqp_settings.queue_prefix}.") for q in doc["queues"]]
        assert names[:2] == ["jobs", "commands"]
        assert [q["exists"] for q in doc["queues"]] == [False] * len(names)
        assert doc["totals"] == {"ready": 0, "consumers": 0, "scheduled": 0, "dead_lettered": 0}
        result = run_cli("status", settings=amqp_settings)
        assert result.exit_code == 0, result.output
        assert "(not declared)" in result.stdout
        assert "unacked: n/a" in result.stdout


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{password}@{parts.hostname}:{parts.port}"))


class TestBrokerErrors:
    @pytest.mark.parametrize(
        "command",
        [["status"], ["dead-letters", "list"], ["dead-letters", "replay", "--all"], ["dead-letters", "show", "x"]],
    )
    def test_unreachable_broker(self, command: list[str]) -> None:
        """An unreachable broker exits 4 with the URL (password masked) and what to check."""
        result = run_cli(*command, "--broker", "amqp://ops:s3cret-pw@127.0.0.1:1/")
        assert result.exit_code == 4, result.output
        assert "amqp://ops:***@127.0.0.1:1/" in result.stderr
        assert "is RabbitMQ running and reachable at 127.0.0.1:1" in result.stderr
        assert "s3cret-pw" not in result.output
        assert "Traceback" not in result.output

    def test_wrong_password(self, rabbitmq_url: str) -> None:
        """Refused credentials exit 4 and say to check the user name and password, without showing it."""
        result = run_cli("status", "--broker", _with_password(rabbitmq_url, "not-the-password"))
        assert result.exit_code == 4, result.output
        assert "check the user name and password" in result.stderr
        assert "not-the-password" not in result.output

    def test_unknown_vhost(self, rabbitmq_url: str) -> None:
        """A vhost the broker does not have exits 4 naming the vhost."""
        url = urlunsplit(urlsplit(rabbitmq_url)._replace(path="/no-such-vhost-here"))
        result = run_cli("status", "--broker", url)
        assert result.exit_code == 4, result.output
        assert "vhost 'no-such-vhost-here'" in result.stderr

    def test_schedule_on_unreachable_broker(self) -> None:
        """`schedule` fails fast with exit 4 too, before Dramatiq's publish retries."""
        result = run_cli(
            "schedule", "TouchFile", "--data", '{"path": "/x", "text": "t"}', "-m", "tests.worker_app",
            "--broker", "amqp://ops:s3cret-pw@127.0.0.1:1/",
        )  # fmt: skip
        assert result.exit_code == 4, result.output
        assert "s3cret-pw" not in result.output
