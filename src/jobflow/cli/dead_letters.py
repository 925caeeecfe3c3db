"""``jobflow dead-letters list | show | replay | purge``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import ParamSpec, TypeVar

import click

from jobflow.cli.amqp import BROKER_FAILURES, broker_error
from jobflow.cli.commands import json_option
from jobflow.cli.common import Target, broker_options, reports_errors, target
from jobflow.cli.errors import BrokerError, NotFoundError, OperatorError, UsageProblem
from jobflow.cli.letters import DeadLetterView
from jobflow.cli.moves import (
    Collector,
    IdCollector,
    MoveReport,
    Purger,
    Replayer,
    Visit,
    count_dead_letters,
    walk,
)
from jobflow.cli.output import dead_letter_table, emit_json, progress, show_letter, stdout
from jobflow.cli.selection import Selection, require_target, resolve_ids, resolve_queue, short_ids, work_queues
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


def _selection(ids: Iterable[str], job: str | None, error: str | None, since: str | None) -> Selection:
    return Selection(ids=frozenset(ids), job=job, error=error, since=parse_since(since) if since is not None else None)


@dataclass(frozen=True)
class _Ids:
    """The IDs (or prefixes) an operator gave, resolved to full ids on a first, read-only pass."""

    given: tuple[str, ...] = ()
    resolved: dict[str, str] = field(default_factory=dict)
    unmatched: tuple[str, ...] = ()

    @property
    def nothing_to_do(self) -> bool:
        """IDs were given and none names a dead letter: a walk with no ids would take them all."""
        return bool(self.given) and not self.resolved

    def missing(self, report: MoveReport) -> list[str]:
        """Given ids that named nothing, or whose dead letter was gone by the second pass."""
        gone = [given for given, full in self.resolved.items() if full not in report.matched_ids]
        return sorted({*self.unmatched, *gone})


def _resolve(where: Target, queues: list[str], ids: tuple[str, ...], purpose: str) -> _Ids:
    if not ids:
        return _Ids()
    with where.connection(purpose) as conn:
        collector = IdCollector()
        walk(conn, count_dead_letters(conn, queues), Selection(), collector)
    resolved, unmatched = resolve_ids(ids, collector.ids)
    return _Ids(ids, resolved, tuple(unmatched))


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
    selection = _selection((), job, error, since)
    read = _collect(where, _queues(where, queue), Selection(), "dead-letters list")
    short = short_ids(letter.id for letter in read)  # unique among every dead letter read, not just the matches
    letters = [letter for letter in read if selection.matches(letter)]
    shown = letters[:limit] if limit else letters
    if as_json:
        rows = [{**letter.summary(), "short_id": short[letter.id]} for letter in shown]
        emit_json({"total": len(letters), "dead_letters": rows})
    else:
        console = stdout()
        console.print(dead_letter_table(shown, len(letters), short, width=console.width))


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
    """Everything about one dead letter (ID or a unique prefix): the error, traceback, data, x-death, first bytes."""
    where = target(broker_url, prefix, modules)
    read = _collect(where, _queues(where, queue), Selection(), "dead-letters show")
    resolved, _ = resolve_ids([ident], (letter.id for letter in read))
    letters = [letter for letter in read if letter.id == resolved.get(ident)]
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
                walk(conn, counts, selection, visit, advance, seen=report.seen)
    except BrokerError as exc:
        raise BrokerError(
            f"{exc}. {report.count} dead letter(s) done before that; the others are still dead-lettered:"
            " run the command again (one in flight may have been copied but not yet removed: a duplicate,"
            " never a loss)",
            broker=exc.broker,
        ) from None
    except BROKER_FAILURES as exc:
        raise broker_error(where.url, exc, doing="keep talking to") from None


def _finish(report: MoveReport, ids: _Ids, *, as_json: bool, dry_run: bool, done: str, verb: str | None = None) -> None:
    """Print the outcome; ``verb`` lists each dead letter done (a dry run's "would replay")."""
    missing = ids.missing(report)
    short = short_ids(report.seen)
    if as_json:
        emit_json(report.as_json(dry_run=dry_run, missing=missing, short=short))
    else:
        if verb is not None:
            for row in report.done:
                version = f" v{row.version}" if row.version is not None else ""
                click.echo(f"{verb} {short.get(row.id, row.id)}  {row.name or '?'}{version}  to {row.queue}")
        for row, why in report.refused:
            click.echo(f"refused {short.get(row.id, row.id)} ({row.name or '?'}): {why}")
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
@click.option("--dry-run", is_flag=True, help="List what would be replayed or refused; change nothing.")
@click.option("--delay", metavar="DURATION", help="Run the replayed jobs after this long (e.g. 15m).")
@click.option("--force", is_flag=True, help="With -m: replay even what the registered types say would fail again.")
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
    force: bool,
    as_json: bool,
) -> None:
    """Move dead letters back to their queues, attempts reset; each is published with confirm before it is removed.

    Needs no job modules: the message goes back as it is. With -m, each is first checked against
    its registered type, and what would fail again is refused (unless --force).
    """
    where = target(broker_url, prefix, modules)
    require_target(ids, all_, _selection((), job, error, since), queue)
    delay_ms = _delay_ms(delay)
    queues = _queues(where, queue)
    chosen = _resolve(where, queues, ids, "dead-letters replay ids")
    selection = _selection(chosen.resolved.values(), job, error, since)
    registry = default_registry if modules else None
    publishes = not dry_run and not chosen.nothing_to_do
    with where.broker("dead-letters replay publish") if publishes else nullcontext(None) as broker:
        replayer = Replayer(
            broker, registry, delay_ms=delay_ms, dry_run=dry_run or broker is None, broker_url=where.url, force=force
        )
        if not chosen.nothing_to_do:
            _run(where, queues, selection, visit=replayer, report=replayer.report, label="replay")
    count = replayer.report.count
    if dry_run:
        done, verb = f"would replay {count} dead letter(s); nothing changed", "would replay"
        _finish(replayer.report, chosen, as_json=as_json, dry_run=True, done=done, verb=verb)
    else:
        _finish(replayer.report, chosen, as_json=as_json, dry_run=False, done=f"replayed {count} dead letter(s)")


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
    require_target(ids, all_, _selection((), job, error, since), queue)
    queues = _queues(where, queue)
    chosen = _resolve(where, queues, ids, "dead-letters purge ids")
    selection = _selection(chosen.resolved.values(), job, error, since)
    purger = Purger()
    # Counted on a connection closed before the prompt: a person may take longer than a heartbeat.
    matching = 0 if chosen.nothing_to_do else None
    if not yes and matching is None:
        matching = len(_collect(where, queues, selection, "dead-letters purge count"))
    if matching:
        click.confirm(f"Purge {matching} dead letter(s) for good?", abort=True, err=True)
    if matching != 0:
        _run(where, queues, selection, visit=purger, report=purger.report, label="purge")
    _finish(purger.report, chosen, as_json=as_json, dry_run=False, done=f"purged {purger.report.count} dead letter(s)")
