"""``jobflow worker``: ``dramatiq jobflow.actors MODULES...`` with jobflow's logging in every process.

Dramatiq's supervisor process (the one that forks the workers) logs a few lines of its own (booting
up, the signals it forwards, a worker that died) through a plain-text ``basicConfig``, and never
imports jobflow. Started from here it logs through jobflow's set-up instead (``--skip-logging`` is
passed on), so in JSON mode every line of a worker's output is one JSON object.
"""

from __future__ import annotations

import sys
from typing import TextIO

import click
from dramatiq import cli as dramatiq_cli

from jobflow.log_config import configure_logging
from jobflow.settings import Settings


@click.command(
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    short_help="Run a worker: dramatiq jobflow.actors MODULES...",
)
@click.argument("dramatiq_args", nargs=-1, type=click.UNPROCESSED, metavar="[MODULES]... [DRAMATIQ OPTIONS]...")
def worker(dramatiq_args: tuple[str, ...]) -> None:
    """Run ``dramatiq jobflow.actors MODULES...`` with jobflow's logging in every process.

    MODULES register the job and command types; every option of ``dramatiq`` (-p, -t, -Q, ...)
    passes through. The log format and level are JOBFLOW_LOG_FORMAT and JOBFLOW_LOG_LEVEL.
    """
    args = dramatiq_cli.make_argument_parser().parse_args(["jobflow.actors", *dramatiq_args])
    args.skip_logging = True  # the workers configure jobflow's logging when they import jobflow.actors
    settings = Settings()
    log_file: TextIO | None = open(args.log_file, "a", encoding="utf-8") if args.log_file else None  # noqa: SIM115
    configure_logging(settings.log_format, settings.log_level, log_file, job_data=settings.log_job_data)
    sys.exit(dramatiq_cli.main(args))
