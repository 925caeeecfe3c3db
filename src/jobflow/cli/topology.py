"""``jobflow topology declare``: for deployments where applications may not declare queues."""

from __future__ import annotations

from typing import cast

import click

from jobflow.broker import JobflowRabbitmqBroker, create_broker, redact_url
from jobflow.broker.names import DELAY_LEVELS, commands_queue, delivery_exchange, jobs_queue
from jobflow.broker.queues import QueueType
from jobflow.broker.retimer import redeliver_unroutable, retime_ladder
from jobflow.cli.amqp import cli_parameters
from jobflow.cli.errors import EXIT_BROKER
from jobflow.settings import Settings


def _broker_failure(what: str, url: str, exc: Exception, hint: str) -> SystemExit:
    """Say what failed, with the URL's password masked, and end with the broker-error exit code."""
    click.echo(f"error: cannot {what} on {redact_url(url)}: {exc!r}\ncheck that RabbitMQ runs, {hint}", err=True)
    return SystemExit(EXIT_BROKER)


@click.group()
def topology() -> None:
    """The queues and the delay topology on RabbitMQ."""


@topology.command()
@click.option("--broker", "broker_url", envvar="JOBFLOW_BROKER_URL", help="amqp://... (default JOBFLOW_BROKER_URL)")
@click.option("--prefix", envvar="JOBFLOW_QUEUE_PREFIX", default="jobflow", show_default=True)
@click.option(
    "--queue-type",
    envvar="JOBFLOW_QUEUE_TYPE",
    type=click.Choice(["classic", "quorum"]),
    default="quorum",
    show_default=True,
)
@click.option(
    "--delay-queue-type",
    envvar="JOBFLOW_DELAY_QUEUE_TYPE",
    type=click.Choice(["classic", "quorum"]),
    default="quorum",
    show_default=True,
)
def declare(broker_url: str | None, prefix: str, queue_type: str, delay_queue_type: str) -> None:
    """Declare the work queues, their dead-letter queues and the delay ladder (idempotent)."""
    settings = Settings(
        queue_prefix=prefix,
        queue_type=cast(QueueType, queue_type),
        delay_queue_type=cast(QueueType, delay_queue_type),
    )
    if broker_url:
        settings = settings.model_copy(update={"broker_url": broker_url})
    broker = create_broker(settings)
    if not isinstance(broker, JobflowRabbitmqBroker):
        raise click.UsageError("topology declare needs an amqp:// or amqps:// broker URL")
    queues = [jobs_queue(prefix), commands_queue(prefix)]
    try:
        for queue in queues:
            broker.declare_queue(queue, ensure=True)
    except Exception as exc:
        hint = "the URL and credentials, and that the user may configure this vhost"
        raise _broker_failure("declare", settings.broker_url, exc, hint) from exc
    finally:
        broker.close()
    click.echo(
        f"declared on {redact_url(settings.broker_url)}: {', '.join(queues)} with their .XQ dead-letter"
        f" queues ({queue_type}); {DELAY_LEVELS} delay levels {prefix}.delay.L00-L{DELAY_LEVELS - 1}"
        f" ({delay_queue_type}); {delivery_exchange(prefix)}"
    )


@topology.command()
@click.option("--broker", "broker_url", envvar="JOBFLOW_BROKER_URL", help="amqp://... (default JOBFLOW_BROKER_URL)")
@click.option("--prefix", envvar="JOBFLOW_QUEUE_PREFIX", default="jobflow", show_default=True)
def retime(broker_url: str | None, prefix: str) -> None:
    """Give every job waiting in the delay ladder the delay it has left (after a broker outage).

    Workers do this by themselves when they reconnect; run it after a restart of RabbitMQ while no
    worker was running.
    """
    settings = Settings(queue_prefix=prefix)
    if broker_url:
        settings = settings.model_copy(update={"broker_url": broker_url})
    try:
        result = retime_ladder(cli_parameters(settings.broker_url, "topology retime"), prefix)
    except Exception as exc:
        hint = "the URL and credentials; what was done is kept, run it again"
        raise _broker_failure("re-time the ladder", settings.broker_url, exc, hint) from exc
    click.echo(f"re-timed {result.retimed}, delivered {result.delivered} that were due, left {result.left}")


@topology.command()
@click.option("--broker", "broker_url", envvar="JOBFLOW_BROKER_URL", help="amqp://... (default JOBFLOW_BROKER_URL)")
@click.option("--prefix", envvar="JOBFLOW_QUEUE_PREFIX", default="jobflow", show_default=True)
def redeliver(broker_url: str | None, prefix: str) -> None:
    """Deliver the jobs waiting in <prefix>.delay.unroutable to their queues, where those exist now.

    The ladder puts a job there when its queue was missing as it came due (a broker restart before
    the bindings were back, a queue no worker had declared yet). Workers do this when they start and
    when they reconnect; jobs whose queue still does not exist stay where they are.
    """
    settings = Settings(queue_prefix=prefix)
    if broker_url:
        settings = settings.model_copy(update={"broker_url": broker_url})
    try:
        result = redeliver_unroutable(cli_parameters(settings.broker_url, "topology redeliver"), prefix)
    except Exception as exc:
        hint = "the URL and credentials; what was done is kept, run it again"
        raise _broker_failure("redeliver", settings.broker_url, exc, hint) from exc
    click.echo(
        f"delivered {result.delivered}, sent {result.retimed} not yet due back into the ladder,"
        f" left {result.left} whose queue does not exist"
    )
