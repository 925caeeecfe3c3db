"""Running the ``jobflow`` command line in-process, as an operator would from the project's root."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from jobflow import Settings
from jobflow.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str, settings: Settings | None = None, input: str | None = None, env: dict[str, str] | None = None
) -> Result:
    """``jobflow ARGS``, pointed at the test's broker and queue prefix when ``settings`` is given."""
    target = ["--broker", settings.broker_url, "--prefix", settings.queue_prefix] if settings is not None else []
    return CliRunner(env=env).invoke(main, [*args, *target], input=input, catch_exceptions=False)


def run_json(*args: str, settings: Settings | None = None) -> Any:
    """``jobflow ARGS --json``, checked to succeed and to print exactly one JSON document on stdout."""
    result = run_cli(*args, "--json", settings=settings)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)
