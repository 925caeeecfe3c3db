"""``jobflow status``, ``jobflow jobs`` and ``jobflow schedule``."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import click
from dramatiq.errors import BrokerConnectionError
from pydantic import ValidationError

from jobflow.cli import amqp
from jobflow.cli.common import broker_options, import_modules, module_option, reports_errors, target
from jobflow.cli.errors import UsageProblem
from jobflow.cli.output import emit_json, status_table, stdout
from jobflow.cli.selection import resolve_queue, work_queues
from jobflow.cli.status import collect_status
from jobflow.cli.timespec import parse_duration, parse_time
from jobflow.envelope import resolve_due
from jobflow.errors import ConfigurationError
from jobflow.job import Job
from jobflow.registry import JobRegistry, default_registry
from jobflow.schedulers import BrokerJobScheduler
from jobflow.versioned import check_queue_name

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")


@click.command()
@broker_options
@click.option(
    "--queue",
    "queues",
    multiple=True,
    metavar="QUEUE",
    help="A routed queue to show too (repeatable); those of the types -m imports are shown anyway.",
)
@json_option
@reports_errors
def status(
    *, broker_url: str | None, prefix: str | None, modules: tuple[str, ...], queues: tuple[str, ...], as_json: bool
) -> None:
    """Ready, scheduled and dead-lettered messages and consumers per queue, over AMQP alone.

    AMQP cannot list queues: besides jobs and commands, the routed queues shown are those of the
    types the -m modules register and those given with --queue.
    """
    where = target(broker_url, prefix, modules)
    shown = work_queues(where.prefix, [resolve_queue(where.prefix, q) for q in queues])
    with where.connection("status") as conn:
        result = collect_status(conn, where.prefix, shown)
    if as_json:
        emit_json({"broker": where.shown_url, "prefix": where.prefix, **result.as_json()})
    else:
        stdout().print(status_table(result))


def describe_registry(registry: JobRegistry) -> dict[str, Any]:
    """The registered job and command types, with versions, classes and JSON schemas."""

    def entry(name: str, version: int, cls: type[Any]) -> dict[str, Any]:
        return {
            "name": name,
            "version": version,
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "queue": cls.__jobflow_queue__,
            "fields": list(cls.model_fields),
            "schema": cls.model_json_schema(),
        }

    commands = []
    for cls in registry.commands():
        item = entry(cls.command_name, cls.command_version, cls)
        try:
            handler = registry.handler_for(cls.command_name, cls.command_version)
            item["handler"] = f"{handler.__module__}.{handler.__qualname__}"
        except LookupError:
            item["handler"] = None
        commands.append(item)
    return {
        "jobs": [entry(cls.job_name, cls.job_version, cls) for cls in registry.jobs()],
        "commands": commands,
    }


@click.command()
@module_option
@json_option
@reports_errors
def jobs(*, modules: tuple[str, ...], as_json: bool) -> None:
    """The registered job and command types, their versions and JSON schemas (import yours with -m)."""
    import_modules(modules)
    catalog = describe_registry(default_registry)
    if as_json:
        emit_json(catalog)
        return
    console = stdout()
    for kind in ("jobs", "commands"):
        console.print(f"[bold]{kind}[/]")
        for item in catalog[kind]:
            handler = f"  handler: {item['handler'] or 'NONE'}" if kind == "commands" else ""
            console.print(
                f"  {item['name']} v{item['version']}  queue {item['queue']}  ({item['class']})"
                f"  fields: {item['fields']}{handler}"
            )
        if not catalog[kind]:
            console.print("  (none: import the modules that define them with -m)")


def _job_class(registry: JobRegistry, name: str, version: int | None) -> type[Job]:
    versions = registry.job_versions(name)
    if not versions:
        known = sorted({cls.job_name for cls in registry.jobs()})
        raise UsageProblem(f"no job type {name!r} is registered (known: {known}); import its module with -m MODULE")
    if version is not None and version not in versions:
        raise UsageProblem(f"job {name!r} has no version {version}; registered versions: {versions}")
    return registry.get(name, versions[-1] if version is None else version)


def _job(cls: type[Job], data: str) -> Job:
    try:
        parsed = json.loads(data)
    except ValueError as exc:
        raise UsageProblem(f"--data is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise UsageProblem("--data must be a JSON object")
    try:
        return cls.from_data(parsed)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(data)'}: {e['msg']}" for e in exc.errors())
        raise UsageProblem(f"--data does not fit {cls.job_name} v{cls.job_version}: {problems}") from None


@click.command()
@click.argument("name")
@click.option("--version", "version", type=click.IntRange(min=1), help="Job version [default: the highest registered].")
@click.option("--data", required=True, metavar="JSON", help="The job's data, a JSON object.")
@click.option("--delay", metavar="DURATION", help="Run after this long: 90s, 15m, 2h, 7d, 1d12h or ISO-8601 PT15M.")
@click.option("--at", "at", metavar="TIME", help="Run at this ISO-8601 time with a timezone.")
@click.option("--queue", "queue", metavar="QUEUE", help="Route it to <prefix>.QUEUE [default: its type's queue].")
@broker_options
@json_option
@reports_errors
def schedule(
    *,
    name: str,
    version: int | None,
    data: str,
    delay: str | None,
    at: str | None,
    queue: str | None,
    broker_url: str | None,
    prefix: str | None,
    modules: tuple[str, ...],
    as_json: bool,
) -> None:
    """Schedule a registered job from the shell; prints its id. --data is validated before publishing."""
    where = target(broker_url, prefix, modules)
    if delay is not None and at is not None:
        raise UsageProblem("give --delay or --at, not both")
    job = _job(_job_class(default_registry, name, version), data)
    if queue is not None:
        try:
            check_queue_name(queue.removeprefix(f"{where.prefix}."))
        except ConfigurationError as exc:
            raise UsageProblem(f"--queue: {exc}") from None
        queue = queue.removeprefix(f"{where.prefix}.")
    wait = parse_duration(delay) if delay is not None else None
    run_at = parse_time(at) if at is not None else None
    due = resolve_due(datetime.now(UTC), wait, run_at)  # refuses too long a delay before connecting
    with where.connection("schedule"):
        pass  # fail fast, with what to check, before Dramatiq's publish retries
    with where.broker("schedule") as broker:
        scheduler = BrokerJobScheduler(broker=broker, settings=where.settings)
        try:
            job_id = scheduler.schedule(job, delay=wait, run_at=run_at, queue=queue)
            routed = scheduler.queue_for(type(job), queue)
        except BrokerConnectionError as exc:
            raise amqp.broker_error(where.url, exc, doing="publish to") from None
    if as_json:
        emit_json(
            {
                "job_id": job_id,
                "name": job.job_name,
                "version": job.job_version,
                "due_at": due.isoformat(),
                "queue": routed,
                "broker": amqp.describe(where.url),
            }
        )
        return
    click.echo(job_id)
    click.echo(
        f"scheduled {job.job_name} v{job.job_version} on {routed} at {amqp.describe(where.url)},"
        f" due {due.isoformat(timespec='seconds')}",
        err=True,
    )


@click.command()
@click.argument("job_ids", nargs=-1, required=True, metavar="ID...")
@broker_options
@json_option
@reports_errors
def cancel(
    *, job_ids: tuple[str, ...], broker_url: str | None, prefix: str | None, modules: tuple[str, ...], as_json: bool
) -> None:
    """Cancel scheduled jobs by id: once this returns, no worker starts them (durable, on every worker).

    A job that already ran, or an id never scheduled, is not an error: RabbitMQ cannot tell them
    apart from a pending job without walking every queue. Prints each id and until when workers
    remember its cancel (its due time plus a week of possible retries).
    """
    where = target(broker_url, prefix, modules)
    with where.connection("cancel"):
        pass  # fail fast, with what to check
    with where.broker("cancel") as broker:
        scheduler = BrokerJobScheduler(broker=broker, settings=where.settings)
        try:
            results = scheduler.cancel_many(job_ids)
        except BrokerConnectionError as exc:
            raise amqp.broker_error(where.url, exc, doing="publish to") from None
    rows = [
        {
            "job_id": r.job_id,
            "recorded": r.recorded,
            "pending": r.pending,
            "remembered_until": None if r.until_ms is None else _iso_ms(r.until_ms),
        }
        for r in results
    ]
    if as_json:
        emit_json({"broker": amqp.describe(where.url), "prefix": where.prefix, "cancelled": rows})
        return
    for row in rows:
        click.echo(f"cancelled {row['job_id']}  (workers skip it; remembered until {row['remembered_until']})")


def _iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")
