"""``jobflow topology declare | retime | redeliver``: the broker-side topology, for operators.

They share the operators' commands' options and error handling: the broker is named on stderr
first, a bad option is a usage error (exit 2) and a broker failure a broker error (exit 4), each
in one line.
"""

from __future__ import annotations

from typing import ParamSpec, TypeVar

import click

from jobflow.broker import JobflowRabbitmqBroker
from jobflow.broker.names import DELAY_LEVELS, delivery_exchange
from jobflow.broker.retimer import redeliver_unroutable, retime_ladder
from jobflow.cli import amqp
from jobflow.cli.common import (
    import_modules,
    module_option,
    rabbitmq_target,
    reports_errors,
    settings_from,
    target_options,
)
from jobflow.cli.errors import BrokerError, UsageProblem
from jobflow.cli.selection import resolve_queue, work_queues

P = ParamSpec("P")
R = TypeVar("R")

_QUEUE_TYPES = click.Choice(["classic", "quorum"])


def _rerun_hint(exc: BrokerError) -> BrokerError:
    return BrokerError(f"{exc}; what was done is kept: run it again", broker=exc.broker)


@click.group()
def topology() -> None:
    """The queues and the delay topology on RabbitMQ."""


@topology.command()
@target_options
@click.option(
    "--queue-type", type=_QUEUE_TYPES, help="Work and dead-letter queues [default: JOBFLOW_QUEUE_TYPE or quorum]."
)
@click.option(
    "--delay-queue-type", type=_QUEUE_TYPES, help="Delay ladder queues [default: JOBFLOW_DELAY_QUEUE_TYPE or quorum]."
)
@click.option("--queue", "extra", multiple=True, metavar="QUEUE", help="A routed queue to declare too (repeatable).")
@module_option
@reports_errors
def declare(
    *,
    broker_url: str | None,
    prefix: str | None,
    queue_type: str | None,
    delay_queue_type: str | None,
    extra: tuple[str, ...],
    modules: tuple[str, ...],
) -> None:
    """Declare the work queues (jobs, commands, those of the types -m imports, and --queue), their
    dead-letter queues and the delay ladder (idempotent)."""
    import_modules(modules)
    settings = settings_from(broker_url, prefix, queue_type=queue_type, delay_queue_type=delay_queue_type)
    where = rabbitmq_target(settings, broker_url)
    queues = work_queues(where.prefix, [resolve_queue(where.prefix, q) for q in extra])
    with where.broker("topology declare") as broker:
        if not isinstance(broker, JobflowRabbitmqBroker):  # rabbitmq_target refused anything else
            raise UsageProblem("topology declare needs an amqp:// or amqps:// broker URL")
        for queue in queues:
            broker.declare_queue(queue, ensure=True)
    click.echo(
        f"declared on {where.shown_url}: {', '.join(queues)} with their .XQ dead-letter queues"
        f" ({settings.queue_type}); {DELAY_LEVELS} delay levels {where.prefix}.delay.L00-L{DELAY_LEVELS - 1}"
        f" ({settings.delay_queue_type}); {delivery_exchange(where.prefix)}"
    )


@topology.command()
@target_options
@reports_errors
def retime(*, broker_url: str | None, prefix: str | None) -> None:
    """Give every job waiting in the delay ladder the delay it has left (after a broker outage).

    Workers do this by themselves when they reconnect; run it after a restart of RabbitMQ while no
    worker was running.
    """
    where = rabbitmq_target(settings_from(broker_url, prefix), broker_url)
    try:
        result = retime_ladder(amqp.cli_parameters(where.url, "topology retime"), where.prefix)
    except amqp.BROKER_FAILURES as exc:
        raise _rerun_hint(amqp.broker_error(where.url, exc, doing="re-time the ladder on")) from None
    click.echo(f"re-timed {result.retimed}, delivered {result.delivered} that were due, left {result.left}")


@topology.command()
@target_options
@reports_errors
def redeliver(*, broker_url: str | None, prefix: str | None) -> None:
    """Deliver the jobs waiting in <prefix>.delay.unroutable to their queues, where those exist now.

    The ladder puts a job there when its queue was missing as it came due (a broker restart before
    the bindings were back, a queue no worker had declared yet). Workers do this when they start and
    when they reconnect; jobs whose queue still does not exist stay where they are.
    """
    where = rabbitmq_target(settings_from(broker_url, prefix), broker_url)
    try:
        result = redeliver_unroutable(amqp.cli_parameters(where.url, "topology redeliver"), where.prefix)
    except amqp.BROKER_FAILURES as exc:
        raise _rerun_hint(amqp.broker_error(where.url, exc, doing="redeliver on")) from None
    click.echo(
        f"delivered {result.delivered}, sent {result.retimed} not yet due back into the ladder,"
        f" left {result.left} whose queue does not exist"
    )
