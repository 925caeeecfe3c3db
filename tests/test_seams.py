"""Where jobflow touches what it builds on: pika only behind the broker and the CLI's AMQP helper, and
Dramatiq's private names only in ``jobflow/broker/_dramatiq.py``, which checks the installed series."""

from __future__ import annotations

import re
from pathlib import Path

import dramatiq
import pytest

from jobflow.broker import _dramatiq

SRC = Path(__file__).resolve().parents[1] / "src" / "jobflow"
PIKA_IMPORT = re.compile(r"^\s*(import pika|from pika)\b", re.MULTILINE)
PRIVATE_DRAMATIQ = re.compile(r"\b_Rabbitmq\w+|\bqueues_pending\b|\._tag\b")


def sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_pika_only_behind_the_broker_and_the_cli_helper() -> None:
    """The model, schedulers, middleware and commands know nothing of AMQP clients."""
    users = [p.relative_to(SRC) for p in sources() if PIKA_IMPORT.search(p.read_text())]
    assert users, "pika is imported somewhere: the pattern must find it"
    assert [p.as_posix() for p in users if p.parts[0] != "broker"] == ["cli/amqp.py"]


def test_private_dramatiq_names_in_one_module() -> None:
    """A Dramatiq release that renames them breaks one file, which says so at import."""
    users = [p.relative_to(SRC).as_posix() for p in sources() if PRIVATE_DRAMATIQ.search(p.read_text())]
    assert users == ["broker/_dramatiq.py"]


def test_installed_dramatiq_is_the_series_written_for() -> None:
    assert _dramatiq.check_version(dramatiq.__version__)


@pytest.mark.parametrize("version", ["2.2.0", "2.2.1", "2.2.17"])
def test_same_series_is_accepted(version: str) -> None:
    assert _dramatiq.check_version(version)


@pytest.mark.parametrize("version", ["2.3.0", "3.0.0", "2.1.9", "2.22.0"])
def test_another_series_warns_with_the_pin_to_install(version: str) -> None:
    with pytest.warns(RuntimeWarning, match=r"dramatiq>=2\.2,<2\.3") as warned:
        assert not _dramatiq.check_version(version)
    assert version in str(warned[0].message)
