"""Which dead letters a command acts on: IDs, ``--all``, or filters (which narrow IDs and ``--all`` too).

IDs may be abbreviated as git's commit hashes are: any unique prefix of at least
:data:`MIN_PREFIX` characters names a dead letter, an exact id always wins, and an ambiguous
prefix is an error that lists the candidates. Listings show each id by its shortest unique prefix,
at least :data:`SHORT_ID` characters (a UUID's first group), so a row fits 80 columns.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from jobflow.broker.names import commands_queue, jobs_queue, routed_queue
from jobflow.cli.errors import UsageProblem
from jobflow.cli.letters import DeadLetterView
from jobflow.errors import ConfigurationError
from jobflow.registry import default_registry
from jobflow.versioned import check_queue_name


def work_queues(prefix: str, extra: Iterable[str] = ()) -> list[str]:
    """The queues the commands read: jobs, commands, the routed queues of every type registered (the
    -m modules'), and ``extra``. AMQP cannot list a broker's queues, so these are what is known."""
    types: list[Any] = [*default_registry.jobs(), *default_registry.commands()]
    routed = sorted({routed_queue(prefix, cls.__jobflow_queue__) for cls in types})
    return list(dict.fromkeys([jobs_queue(prefix), commands_queue(prefix), *routed, *extra]))


def resolve_queue(prefix: str, given: str) -> str:
    """A short queue name (``jobs``, ``emails``), a work queue's full name or its ``.XQ``: the work queue meant."""
    name = given.removesuffix(".XQ").removeprefix(f"{prefix}.")
    try:
        return routed_queue(prefix, check_queue_name(name))
    except ConfigurationError as exc:
        raise UsageProblem(f"--queue {given!r}: {exc}") from None


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


#: The shortest prefix accepted for a dead letter's id (git's minimum for a hash).
MIN_PREFIX = 4
#: The shortest id a listing shows: a UUID's first group.
SHORT_ID = 8
#: How many candidates an ambiguous prefix's error lists.
_CANDIDATES_SHOWN = 10


def short_ids(ids: Iterable[str], minimum: int = SHORT_ID) -> dict[str, str]:
    """Each id's shortest prefix (at least ``minimum`` characters) that no other id shares."""
    ordered = sorted(set(ids))
    short: dict[str, str] = {}
    for i, ident in enumerate(ordered):
        shared = max((_common_prefix(ident, ordered[j]) for j in (i - 1, i + 1) if 0 <= j < len(ordered)), default=0)
        short[ident] = ident[: max(minimum, shared + 1)]
    return short


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def resolve_ids(given: Iterable[str], known: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Map each given id or prefix to the one full id it names; return that and those naming none.

    An ambiguous prefix, or one shorter than :data:`MIN_PREFIX` that is no full id, is a usage
    problem raised before anything is done.
    """
    ids = sorted(set(known))
    exact = set(ids)
    resolved: dict[str, str] = {}
    missing: list[str] = []
    for wanted in dict.fromkeys(given):
        if wanted in exact:
            resolved[wanted] = wanted
            continue
        if len(wanted) < MIN_PREFIX:
            raise UsageProblem(f"id prefix {wanted!r} is too short: give at least {MIN_PREFIX} characters")
        candidates = [ident for ident in ids if ident.startswith(wanted)]
        if len(candidates) > 1:
            shown = ", ".join(candidates[:_CANDIDATES_SHOWN])
            more = f" and {len(candidates) - _CANDIDATES_SHOWN} more" if len(candidates) > _CANDIDATES_SHOWN else ""
            raise UsageProblem(
                f"id prefix {wanted!r} is ambiguous: {len(candidates)} dead letters match ({shown}{more});"
                " give more characters"
            )
        if candidates:
            resolved[wanted] = candidates[0]
        else:
            missing.append(wanted)
    return resolved, missing
