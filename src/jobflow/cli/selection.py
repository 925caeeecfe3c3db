"""Which dead letters a command acts on: IDs, ``--all``, or filters (which narrow IDs and ``--all`` too)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from jobflow.broker.names import commands_queue, jobs_queue
from jobflow.cli.errors import UsageProblem
from jobflow.cli.letters import DeadLetterView
from jobflow.dead_letter import dead_letter_queue


def work_queues(prefix: str) -> list[str]:
    """The queues whose dead letters the commands read."""
    return [jobs_queue(prefix), commands_queue(prefix)]


def resolve_queue(prefix: str, given: str) -> str:
    """``jobs``, ``commands``, a work queue's full name or its ``.XQ``: the work queue meant."""
    queues = work_queues(prefix)
    for queue in queues:
        if given in (queue, dead_letter_queue(queue), queue.removeprefix(f"{prefix}.")):
            return queue
    raise UsageProblem(
        f"unknown queue {given!r} for prefix {prefix!r}; use one of: jobs, commands, {', '.join(queues)}"
    )


@dataclass(frozen=True)
class Selection:
    """A conjunction of the operator's criteria; an empty one selects everything."""

    ids: frozenset[str] = field(default_factory=frozenset)
    job: str | None = None
    error: str | None = None
    since: datetime | None = None

    def matches(self, letter: DeadLetterView) -> bool:
        if self.ids and letter.id not in self.ids:
            return False
        if self.job is not None and letter.name != self.job:
            return False
        if self.error is not None and not _error_matches(self.error, letter.error_type):
            return False
        return self.since is None or (letter.failed_at is not None and letter.failed_at >= self.since)

    @property
    def has_filters(self) -> bool:
        return self.job is not None or self.error is not None or self.since is not None


def _error_matches(wanted: str, error_type: str | None) -> bool:
    """``ValueError`` matches ``ValueError`` and ``builtins.ValueError``; a dotted name must match whole."""
    if error_type is None:
        return False
    return wanted in (error_type, error_type.rsplit(".", 1)[-1])


def require_target(ids: tuple[str, ...], all_: bool, selection: Selection, queue: str | None) -> None:
    """Replay and purge act on IDs, ``--all`` or filters: never on everything by accident."""
    if ids and all_:
        raise UsageProblem("give dead-letter IDs or --all, not both")
    if not ids and not all_ and not selection.has_filters and queue is None:
        raise UsageProblem("say which dead letters: IDs, --all, or filters (--queue, --job, --error, --since)")
