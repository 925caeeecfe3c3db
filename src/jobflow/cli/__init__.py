"""The ``jobflow`` command line: operators' commands, the topology commands and the demo."""

from __future__ import annotations

import sys

import click

from jobflow.cli.commands import jobs, schedule, status
from jobflow.cli.dead_letters import dead_letters
from jobflow.cli.topology import topology


@click.group()
@click.version_option(package_name="jobflow")
def main() -> None:
    """jobflow: EventFlow's Jobs on Dramatiq and RabbitMQ.

    Exit codes: 0 ok, 1 not everything done (refused, aborted), 2 usage error, 3 not found, 4 broker error.
    """


@main.command()
@click.option("--broker", "broker_url", default="memory://", show_default=True, help="memory:// or amqp://...")
@click.option("-m", "--module", default="actors", show_default=True, help="The example application's module.")
def demo(broker_url: str, module: str) -> None:
    """Run EventFlow's examples end to end with an in-process worker."""
    from jobflow.cli.demo import run_demo
    from jobflow.errors import JobflowError

    try:
        ok = run_demo(broker_url, module=module)
    except JobflowError as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(0 if ok else 1)


for _command in (status, dead_letters, schedule, jobs, topology):
    main.add_command(_command)
