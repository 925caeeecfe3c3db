"""``jobflow schedules list``: each recurring schedule, its next occurrence and the last one run."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
from dramatiq.common import current_millis

from jobflow.broker.names import schedules_status_queue
from jobflow.broker.schedules import read_state as driver_state
from jobflow.cli import amqp
from jobflow.cli.common import broker_options, reports_errors, target
from jobflow.cli.output import emit_json, stdout
from jobflow.registry import default_registry


def _iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def read_state(conn: Any, prefix: str) -> dict[str, Any]:
    """The drivers' latest state, read and left in place ({} if none was written)."""
    counter = amqp.QueueCounter(conn)
    try:
        if not counter.count(schedules_status_queue(prefix)).exists:
            return {}
    finally:
        counter.close()
    channel = conn.channel()
    try:
        return driver_state(channel, schedules_status_queue(prefix))
    finally:
        amqp.close_quietly(channel)


def schedule_rows(state: dict[str, Any], now_ms: int) -> list[dict[str, Any]]:
    """One row per schedule the state or the imported modules know."""
    entries: dict[str, Any] = state.get("schedules") or {}
    declared = {s.name: s for s in default_registry.schedules()}
    rows = []
    for name in sorted(set(entries) | set(declared)):
        found = entries.get(name)
        entry: dict[str, Any] = found if isinstance(found, dict) else {}
        published = [p for p in entry.get("published_ms", []) if isinstance(p, int)]
        upcoming = [p for p in published if p > now_ms]
        past = [p for p in published if p <= now_ms]
        schedule = declared.get(name)
        next_ms = min(upcoming) if upcoming else entry.get("next_ms")
        if next_ms is None and schedule is not None:
            next_ms = schedule.next_after(now_ms)
        rows.append(
            {
                "name": name,
                "job": entry.get("job") or (type(schedule.job).job_name if schedule else None),
                "schedule": entry.get("describe") or (schedule.describe() if schedule else None),
                "missed": entry.get("missed") or (schedule.missed if schedule else None),
                "next": _iso(next_ms),
                "last_run": _iso(max(past) if past else None),
                "driven": name in entries,
            }
        )
    return rows


@click.group()
def schedules() -> None:
    """Recurring schedules (declared with jobflow.recurring, driven by one elected worker)."""


@schedules.command("list")
@broker_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
@reports_errors
def list_schedules(*, broker_url: str | None, prefix: str | None, modules: tuple[str, ...], as_json: bool) -> None:
    """Each schedule, its next occurrence and the last one due, from the state the driving worker keeps
    in RabbitMQ; -m adds the schedules your modules declare that no worker has driven yet."""
    where = target(broker_url, prefix, modules)
    with where.connection("schedules") as conn:
        state = read_state(conn, where.prefix)
    now = current_millis()
    rows = schedule_rows(state, now)
    at = state.get("at_ms")
    driver = {"driver": state.get("driver"), "state_written": _iso(at if isinstance(at, int) else None)}
    if as_json:
        emit_json({"broker": amqp.describe(where.url), "prefix": where.prefix, **driver, "schedules": rows})
        return
    console = stdout()
    if state:
        age = (now - at) / 1000 if isinstance(at, int) else float("nan")
        console.print(f"driven by {driver['driver']}, state written {age:.1f} s ago")
    else:
        console.print("no worker has driven any schedule yet")
    for row in rows:
        note = "" if row["driven"] else "  (declared, not driven yet)"
        console.print(
            f"  {row['name']}  {row['job']}  {row['schedule']}  next {row['next'] or '-'}"
            f"  last {row['last_run'] or '-'}{note}"
        )
    if not rows:
        console.print("  (none: declare them with jobflow.recurring, import their modules with -m)")
