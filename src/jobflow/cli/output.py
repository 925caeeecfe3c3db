"""What the operators' commands print: Rich tables for people, one JSON document for scripts.

Tables and results go to stdout; progress bars and prompts to stderr, so ``--json`` output and
pipes stay clean.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from jobflow.cli.letters import DeadLetterView
from jobflow.cli.status import UNACKED_NOTE, Status

#: Off a terminal, wide enough that tables are not squeezed into 80 columns (unless COLUMNS says).
_PIPE_WIDTH = 200


def stdout() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
        console.width = _PIPE_WIDTH
    return console


def stderr() -> Console:
    return Console(stderr=True, highlight=False)


def emit_json(document: Any) -> None:
    """The single JSON document a ``--json`` command writes to stdout."""
    click.echo(json.dumps(document, indent=2, default=str))


@contextmanager
def progress(total: int, label: str) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr when it is a terminal; yields the function that advances it by one."""
    console = stderr()
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=False,
    )
    with bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def status_table(status: Status) -> Table:
    table = Table(title="jobflow queues", caption=f"unacked: n/a — {UNACKED_NOTE}")
    for column in ("queue", "ready", "consumers", "unacked", "scheduled", "dead-lettered"):
        table.add_column(column, justify="left" if column == "queue" else "right")
    for q in status.queues:
        name = q.queue if q.exists else f"{q.queue} (not declared)"
        table.add_row(name, str(q.ready), str(q.consumers), "n/a", str(q.scheduled), str(q.dead_lettered))
    unroutable = f" ({status.unroutable} unroutable)" if status.unroutable else ""
    table.add_row(
        f"delay topology ({status.delay_levels_found} levels){unroutable}", "", "", "", str(status.delay_topology), ""
    )
    totals = status.totals()
    table.add_row(
        "total",
        str(totals["ready"]),
        str(totals["consumers"]),
        "n/a",
        str(totals["scheduled"]),
        str(totals["dead_lettered"]),
        style="bold",
    )
    return table


def dead_letter_table(
    letters: list[DeadLetterView], total: int, short: dict[str, str] | None = None, *, width: int = 80
) -> Table:
    """One line per dead letter, fitting 80 columns: short ids, a compact UTC time, the error cut to fit.

    ``short`` maps each id to its unique prefix (see :func:`jobflow.cli.selection.short_ids`);
    ``show``, ``replay`` and ``purge`` take it as they take the full id.
    """
    caption = f"{len(letters)} of {total} shown" if len(letters) < total else f"{total} dead letter(s)"
    rows = [
        (
            (short or {}).get(letter.id, letter.id),
            letter.name or "?",
            str(letter.version or "?"),
            _error_text(letter),
            str(letter.attempts if letter.attempts is not None else "?"),
            letter.failed_at.astimezone(UTC).strftime("%y-%m-%d %H:%M") if letter.failed_at else "?",
            str(letter.replay_count),
        )
        for letter in letters
    ]
    table = Table(title="dead letters", caption=caption, box=None, pad_edge=False, header_style="bold underline")
    widths = [
        min(max([len(header), *(len(row[i]) for row in rows)]), limit) for i, (header, limit) in enumerate(_COLUMNS)
    ]
    # Every column but the error keeps its width; the error takes what is left (a column is padded
    # by a space on either side, but not at the table's edges).
    error = _COLUMNS.index(("error", 0))
    widths[error] = max(12, width - (sum(widths) - widths[error]) - 2 * (len(widths) - 1))
    for (header, _), fixed in zip(_COLUMNS, widths, strict=True):
        table.add_column(
            header,
            no_wrap=True,
            overflow="ellipsis",
            min_width=fixed,
            max_width=fixed,
            justify="right" if header in ("v", "tries", "replays") else "left",
        )
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    return table


#: (header, widest it may be; the error's 0: whatever is left, cut with an ellipsis).
_COLUMNS = (
    ("id", 40),
    ("job", 16),
    ("v", 3),
    ("error", 0),
    ("tries", 5),
    ("failed UTC", 14),
    ("replays", 7),
)


def _error_text(letter: DeadLetterView, width: int = 80) -> str:
    if letter.error_type is None:
        death = letter.x_death[0] if letter.x_death else {}
        head = f", starts {letter.body[:24]!r}" if letter.message is None else ""
        return f"{letter.reason} ({len(letter.body)} bytes, x-death count {death.get('count', '?')}{head})"
    text = f"{letter.error_type}: {letter.error_message}"
    return text if len(text) <= width else text[: width - 1] + "…"


def show_letter(console: Console, letter: DeadLetterView, copies: int) -> None:
    """Everything about one dead letter, for a person."""
    details = letter.details()
    if copies > 1:
        console.print(f"[yellow]{copies} dead letters carry this id; shown: the one that failed last[/]")
    for key in (
        "id",
        "queue",
        "dead_letter_queue",
        "kind",
        "job",
        "version",
        "reason",
        "error_type",
        "error_message",
        "attempts",
        "failed_at",
        "replay_count",
        "last_replayed_at",
        "size",
    ):
        console.print(f"[bold]{key}[/]: {escape(str(details[key]))}")
    record = letter.record
    if record is not None:
        console.print(
            f"[bold]first_failed_at[/]: {record.first_failed_at.isoformat()}  [bold]host[/]: {escape(record.host)}"
            f"  [bold]pid[/]: {record.pid}"
        )
    if letter.header_problem:
        console.print(f"[bold red]header problem[/]: {escape(letter.header_problem)}")
    if details["data"] is not None:
        console.print("[bold]data[/]:")
        console.print(escape(json.dumps(details["data"], indent=2, default=str)))
    if letter.message is None:
        console.print(f"[bold]body (first bytes)[/]: {escape(repr(letter.body[:64]))}")
    for death in details["x_death"]:
        console.print(f"[bold]x-death[/]: {escape(json.dumps(death, default=str))}")
    if details["traceback"]:
        console.print("[bold]traceback[/]:")
        console.print(escape(details["traceback"]), soft_wrap=True)
