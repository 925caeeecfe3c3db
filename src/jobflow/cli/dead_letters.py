"""``jobflow dead-letters list | show | replay | purge``."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from datetime import UTC, datetime
from typing import ParamSpec, TypeVar

import click

from jobflow.cli.amqp import BROKER_FAILURES, broker_error
from jobflow.cli.commands import json_option
from jobflow.cli.common import Target, broker_options, reports_errors, target
from jobflow.cli.errors import BrokerError, NotFoundError, OperatorError, UsageProblem
from jobflow.cli.letters import DeadLetterView
from jobflow.cli.moves import Collector, MoveReport, Purger, Replayer, Visit, count_dead_letters, walk
from jobflow.cli.output import dead_letter_table, emit_json, progress, show_letter, stdout
from jobflow.cli.selection import Selection, require_target, resolve_queue, work_queues
from jobflow.cli.timespec import parse_duration, parse_since, to_millis
from jobflow.registry import default_registry
from jobflow.schedulers import MAX_DELAY

P = ParamSpec("P")
R = TypeVar("R")


def filter_options(f: Callable[P, R]) -> Callable[P, R]:
    f = click.option("--since", metavar="TIME", help="Failed at or after: ISO-8601 with timezone, or 2h (ago).")(f)
    f = click.option("--error", metavar="TYPE", help="Final exception type, e.g. ValueError or app.errors.Boom.")(f)
    f = click.option("--job", metavar="NAME", help="Job or command name.")(f)
    return click.option("--queue", metavar="Q", help="jobs, commands, or a work queue's full name.")(f)


def _selection(ids: tuple[str, ...], job: str | None, error: str | None, since: str | None) -> Selection:
    return Selection(ids=frozenset(ids), job=job, error=error, since=parse_since(since) if since is not None else None)


def _queues(where: Target, queue: str | None) -> list[str]:
    return [resolve_queue(where.prefix, queue)] if queue is not None else work_queues(where.prefix)


def _collect(where: Target, queues: list[str], selection: Selection, purpose: str) -> list[DeadLetterView]:
    with where.connection(purpose) as conn:
        collector = Collector()
        walk(conn, count_dead_letters(conn, queues), selection, collector)
    return collector.letters


@click.group("dead-letters")
def dead_letters() -> None:
    """Inspect, replay and purge dead-lettered jobs and commands."""


@dead_letters.command("list")
@broker_options
@filter_options
@click.option("--limit", type=click.IntRange(min=0), default=100, show_default=True, help="At most N rows; 0: all.")
@json_option
@reports_errors
def list_(
    *,
    broker_url: str | None,
    prefix: str | None,
    modules: tuple[str, ...],
    queue: str | None,
    job: str | None,
    error: str | None,
    since: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """One row per dead letter; every dead letter stays where it is."""
    where = target(broker_url, prefix, modules)
    letters = _collect(where, _queues(where, queue), _selection((), job, error, since), "dead-letters list")
    shown = letters[:limit] if limit else letters
    if as_json:
        emit_json({"total": len(letters), "dead_letters": [letter.summary() for letter in shown]})
    else:
        stdout().print(dead_letter_table(shown, len(letters)))


@dead_letters.command("show")
@click.argument("ident", metavar="ID")
@broker_options
@click.option("--queue", metavar="Q", help="jobs, commands, or a work queue's full name.")
@json_option
@reports_errors
def show(
    *,
    ident: str,
    broker_url: str | None,
    prefix: str | None,
    modules: tuple[str, ...],
    queue: str | None,
    as_json: bool,
) -> None:
    """Everything about one dead letter: the error, its traceback, the job's data, x-death, the first bytes."""
    where = target(broker_url, prefix, modules)
    letters = _collect(where, _queues(where, queue), Selection(ids=frozenset({ident})), "dead-letters show")
    if not letters:
        raise NotFoundError(f"no dead letter with id {ident!r} (see `jobflow dead-letters list`)")
    oldest = datetime.min.replace(tzinfo=UTC)
    latest = max(letters, key=lambda letter: letter.failed_at or oldest)
    if as_json:
        emit_json({**latest.details(), "copies": len(letters)})
    else:
        show_letter(stdout(), latest, len(letters))


def _run(
    where: Target, queues: list[str], selection: Selection, *, visit: Visit, report: MoveReport, label: str
) -> None:
    """Walk with a progress bar; a broker failure midway says how far it got and that a rerun is safe."""
    try:
        with where.connection(f"dead-letters {label}") as conn:
            counts = count_dead_letters(conn, queues)
            with progress(sum(counts.values()), label) as advance:
                walk(conn, counts, selection, visit, advance)
    except BrokerError as exc:
        raise BrokerError(
            f"{exc}. {report.moved} dead letter(s) done before that; the others are still dead-lettered:"
            " run the command again (one in flight may have been copied but not yet removed: a duplicate, never a loss)"
        ) from None
    except BROKER_FAILURES as exc:
        raise broker_error(where.url, exc, doing="keep talking to") from None


def _finish(report: MoveReport, ids: tuple[str, ...], as_json: bool, dry_run: bool, done: str) -> None:
    missing = sorted(set(ids) - report.matched_ids)
    if as_json:
        emit_json(report.as_json(dry_run=dry_run, missing=missing))
    else:
        for letter, why in report.refused:
            click.echo(f"refused {letter.id} ({letter.name or '?'}): {why}")
        click.echo(done)
    if missing:
        raise NotFoundError(f"no dead letter with id {', '.join(missing)}")
    if report.refused:
        raise OperatorError(f"{len(report.refused)} dead letter(s) refused; they stay dead-lettered")


def _delay_ms(delay: str | None) -> int | None:
    if delay is None:
        return None
    wait = parse_duration(delay)
    if wait > MAX_DELAY:
        raise UsageProblem(f"--delay can be at most {MAX_DELAY.days} days, got {wait}")
    return to_millis(wait)


@dead_letters.command("replay")
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--all", "all_", is_flag=True, help="Every dead letter (narrowed by any filters).")
@broker_options
@filter_options
@click.option("--dry-run", is_flag=True, help="Say what would be replayed or refused; change nothing.")
@click.option("--delay", metavar="DURATION", help="Run the replayed jobs after this long (e.g. 15m).")
@json_option
@reports_errors
def replay(
    *,
    ids: tuple[str, ...],
    all_: bool,
    broker_url: str | None,
    prefix: str | None,
    modules: tuple[str, ...],
    queue: str | None,
    job: str | None,
    error: str | None,
    since: str | None,
    dry_run: bool,
    delay: str | None,
    as_json: bool,
) -> None:
    """Move dead letters back to their queues, attempts reset; each is published with confirm before it is removed."""
    where = target(broker_url, prefix, modules)
    selection = _selection(ids, job, error, since)
    require_target(ids, all_, selection, queue)
    delay_ms = _delay_ms(delay)
    with nullcontext(None) if dry_run else where.broker("dead-letters replay publish") as broker:
        replayer = Replayer(broker, default_registry, delay_ms=delay_ms, dry_run=dry_run, broker_url=where.url)
        _run(where, _queues(where, queue), selection, visit=replayer, report=replayer.report, label="replay")
    moved = replayer.report.moved
    done = f"would replay {moved} dead letter(s); nothing changed" if dry_run else f"replayed {moved} dead letter(s)"
    _finish(replayer.report, ids, as_json, dry_run, done)


@dead_letters.command("purge")
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--all", "all_", is_flag=True, help="Every dead letter (narrowed by any filters).")
@broker_options
@filter_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@reports_errors
def purge(
    *,
    ids: tuple[str, ...],
    all_: bool,
    broker_url: str | None,
    prefix: str | None,
    modules: tuple[str, ...],
    queue: str | None,
    job: str | None,
    error: str | None,
    since: str | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Delete dead letters for good; asks first unless --yes."""
    where = target(broker_url, prefix, modules)
    selection = _selection(ids, job, error, since)
    require_target(ids, all_, selection, queue)
    queues = _queues(where, queue)
    purger = Purger()
    # Counted on a connection closed before the prompt: a person may take longer than a heartbeat.
    matching = len(_collect(where, queues, selection, "dead-letters purge count")) if not yes else None
    if matching:
        click.confirm(f"Purge {matching} dead letter(s) for good?", abort=True, err=True)
    if matching != 0:
        _run(where, queues, selection, visit=purger, report=purger.report, label="purge")
    _finish(purger.report, ids, as_json, False, f"purged {purger.report.moved} dead letter(s)")
