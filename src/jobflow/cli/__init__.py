"""The ``jobflow`` command line: operators' commands, the topology commands and the demo."""

from __future__ import annotations

import sys

import click

# Imported under other names: the modules jobflow.cli.dead_letters and .topology keep theirs.
from jobflow.cli import commands as _commands
from jobflow.cli import dead_letters as _dead_letters
from jobflow.cli import schedules as _schedules
from jobflow.cli import topology as _topology
from jobflow.cli import worker as _worker


@click.group()
@click.version_option(package_name="jobflow")
def main() -> None:
    """jobflow: EventFlow's Jobs on Dramatiq and RabbitMQ.

    Exit codes: 0 ok, 1 not everything done (refused, aborted), 2 usage error, 3 not found, 4 broker error.
    """


@main.command()
@click.option("--broker", "broker_url", default="memory://", show_default=True, help="memory:// or amqp://...")
@click.option("-m", "--module", default="jobflow.examples", show_default=True, help="The example application's module.")
def demo(broker_url: str, module: str) -> None:
    """Run EventFlow's examples end to end with an in-process worker; on RabbitMQ, on queues it deletes after."""
    from jobflow.broker.connection import describe_broker
    from jobflow.cli.demo import run_demo
    from jobflow.errors import JobflowError

    try:
        click.echo(f"broker: {describe_broker(broker_url)}", err=True)
        ok = run_demo(broker_url, module=module)
    except JobflowError as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None
    sys.exit(0 if ok else 1)


for _command in (
    _commands.status,
    _dead_letters.dead_letters,
    _commands.schedule,
    _commands.cancel,
    _schedules.schedules,
    _commands.jobs,
    _topology.topology,
    _worker.worker,
):
    main.add_command(_command)
