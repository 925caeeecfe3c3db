"""Walking dead-letter queues: listing leaves every dead letter, replay and purge remove the chosen ones.

Every dead letter is taken with ``basic.get`` and *no* acknowledgement. One the command does not
remove stays unacknowledged until the channel closes, when RabbitMQ puts it back (flagged
``redelivered``; RabbitMQ returns it to its place when it can, so order may change). One the
command removes is acknowledged only after the work is safe: for a replay, after the broker
confirmed the copy in its work queue. A crash or a dropped connection at any point therefore
leaves each dead letter either still dead-lettered or back in its queue, possibly both (the
duplicate at-least-once allows), never neither.

A walk reads at most as many messages as the queue held when it started, so dead letters that
arrive meanwhile (a replayed job failing again at once) are left for the next run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import dramatiq
from dramatiq.errors import BrokerConnectionError
from pydantic import ValidationError

from jobflow.broker.names import DISPATCH_COMMAND_ACTOR, RUN_JOB_ACTOR
from jobflow.cli.amqp import Connection, QueueCounter, acknowledge, broker_error, close_quietly, take
from jobflow.cli.letters import DeadLetterView, read_dead_letter
from jobflow.cli.selection import Selection
from jobflow.dead_letter import FIRST_FAILURE_OPTION, REPLAY_OPTION, dead_letter_queue
from jobflow.envelope import CommandEnvelope, JobEnvelope
from jobflow.errors import InvalidPayloadError, UnknownCommandError, UnknownJobError
from jobflow.middleware.due_time import DUE_OPTION
from jobflow.registry import JobRegistry
from jobflow.versioned import VersionedModel

#: Returns True to remove the dead letter (acknowledge it), False to leave it where it is.
Visit = Callable[[DeadLetterView], bool]

#: Options of the failed run that a replay drops: attempts, and the failure series, start again.
#: (``jobflow_first_failure_ms`` is where the failure handling keeps when the first attempt failed.)
_RESET_OPTIONS = frozenset({"retries", "traceback", "requeue_timestamp", "eta", DUE_OPTION, FIRST_FAILURE_OPTION})


def count_dead_letters(conn: Connection, queues: list[str]) -> dict[str, int]:
    """Ready dead letters per work queue (a missing dead-letter queue holds none)."""
    counter = QueueCounter(conn)
    try:
        return {queue: counter.count(dead_letter_queue(queue)).ready for queue in queues}
    finally:
        counter.close()


def walk(
    conn: Connection,
    counts: dict[str, int],
    selection: Selection,
    visit: Visit,
    on_examined: Callable[[], None] | None = None,
    *,
    seen: set[str] | None = None,
) -> None:
    """Show each dead letter that ``selection`` matches to ``visit`` once; see the module's docstring.

    ``seen`` collects the id of every dead letter read, matched or not: short ids shown for the
    matches must be unique among all of them.
    """
    for queue, count in counts.items():
        if count == 0:
            continue
        xq = dead_letter_queue(queue)
        channel = conn.channel()
        try:
            for _ in range(count):
                delivery = take(channel, xq)
                if delivery is None:
                    break
                letter = read_dead_letter(xq, delivery)
                if seen is not None:
                    seen.add(letter.id)
                if selection.matches(letter) and visit(letter):
                    acknowledge(channel, delivery)
                if on_examined is not None:
                    on_examined()
        finally:
            close_quietly(channel)


@dataclass(frozen=True)
class Row:
    """What a report keeps of one dead letter: a replay of 100,000 keeps their names, not their bytes."""

    id: str
    name: str | None
    version: int | None
    queue: str

    @classmethod
    def of(cls, letter: DeadLetterView) -> Row:
        return cls(letter.id, letter.name, letter.version, letter.source_queue)

    def as_json(self, short: dict[str, str]) -> dict[str, Any]:
        return {
            "id": self.id,
            "short_id": short.get(self.id, self.id),
            "job": self.name,
            "version": self.version,
            "queue": self.queue,
        }


@dataclass
class MoveReport:
    """What a replay or purge did (or, in a dry run, would do)."""

    #: The JSON key of the count: ``replayed``, ``would_move`` or ``purged``.
    done_key: str
    done: list[Row] = field(default_factory=list)
    refused: list[tuple[Row, str]] = field(default_factory=list)
    matched_ids: set[str] = field(default_factory=set)
    #: Every id read, matched or not, so that the short ids shown are unique among them.
    seen: set[str] = field(default_factory=set)

    @property
    def count(self) -> int:
        return len(self.done)

    def as_json(self, *, dry_run: bool, missing: list[str], short: dict[str, str]) -> dict[str, Any]:
        return {
            self.done_key: self.count,
            "dry_run": dry_run,
            "dead_letters": [row.as_json(short) for row in self.done],
            "refused": [{**row.as_json(short), "reason": why} for row, why in self.refused],
            "not_found": missing,
        }


class IdCollector:
    """Keeps the id of every visited dead letter, and leaves it in its queue (the pass that resolves prefixes)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def __call__(self, letter: DeadLetterView) -> bool:
        self.ids.add(letter.id)
        return False


class Collector:
    """Keeps every visited dead letter and leaves it in its queue."""

    def __init__(self) -> None:
        self.letters: list[DeadLetterView] = []

    def __call__(self, letter: DeadLetterView) -> bool:
        self.letters.append(letter)
        return False


class Purger:
    """Removes every visited dead letter."""

    def __init__(self) -> None:
        self.report = MoveReport("purged")

    def __call__(self, letter: DeadLetterView) -> bool:
        self.report.matched_ids.add(letter.id)
        self.report.done.append(Row.of(letter))
        return True


class Replayer:
    """Publishes each replayable dead letter to its queue, confirmed, before it is removed.

    A replay moves the message back as it is (attempts reset), so it needs no job types. Given a
    ``registry`` (the operator imported modules with ``-m``), it also refuses what would fail
    again at once: a type not registered, data the type rejects; ``force`` replays those anyway.
    """

    def __init__(
        self,
        broker: dramatiq.Broker | None,
        registry: JobRegistry | None,
        *,
        delay_ms: int | None,
        dry_run: bool,
        broker_url: str,
        force: bool = False,
    ) -> None:
        if not dry_run and not getattr(broker, "confirm_delivery", False):
            raise ValueError("replay needs a broker that publishes with confirms")
        self.broker = broker
        self.registry = registry
        self.delay_ms = delay_ms
        self.dry_run = dry_run
        self.broker_url = broker_url
        self.force = force
        self.report = MoveReport("would_move" if dry_run else "replayed")

    def __call__(self, letter: DeadLetterView) -> bool:
        self.report.matched_ids.add(letter.id)
        why = refusal(letter)
        if why is None and self.registry is not None and not self.force:
            why = would_fail_again(letter, self.registry)
        if why is not None:
            self.report.refused.append((Row.of(letter), why))
            return False
        if self.dry_run or self.broker is None:
            self.report.done.append(Row.of(letter))
            return False
        try:
            self.broker.enqueue(replay_message(letter, datetime.now(UTC)), delay=self.delay_ms or None)
        except BrokerConnectionError as exc:
            raise broker_error(self.broker_url, exc, doing="publish to") from None
        self.report.done.append(Row.of(letter))
        return True


def refusal(letter: DeadLetterView) -> str | None:
    """Why ``letter`` cannot be replayed at all, or None: it must be a message for one of jobflow's actors."""
    message = letter.message
    if message is None:
        return "the body is not a Dramatiq message, so there is nothing to replay; purge it once inspected"
    if message.actor_name not in (RUN_JOB_ACTOR, DISPATCH_COMMAND_ACTOR):
        return f"actor {message.actor_name!r} is not one of jobflow's ({RUN_JOB_ACTOR}, {DISPATCH_COMMAND_ACTOR})"
    envelope = letter.envelope or {}
    name, version = envelope.get("name"), envelope.get("version")
    if not isinstance(name, str) or not isinstance(version, int):
        return "the message carries no jobflow envelope (name and version), so no job type can run it"
    return None


def would_fail_again(letter: DeadLetterView, registry: JobRegistry) -> str | None:
    """Why a worker with ``registry``'s types would dead-letter ``letter`` again at once, or None.

    The same checks, in the same order, as the worker's: the envelope, the type (and a command's
    handler), the data against the type.
    """
    assert letter.message is not None
    is_job = letter.message.actor_name == RUN_JOB_ACTOR
    envelope: JobEnvelope | CommandEnvelope
    try:
        envelope = (JobEnvelope if is_job else CommandEnvelope).parse(letter.envelope)
    except InvalidPayloadError as exc:
        return f"{_one_line(exc)}; it would be dead-lettered again as invalid_envelope (--force replays it anyway)"
    cls: type[VersionedModel]
    try:
        if is_job:
            cls = registry.get(envelope.name, envelope.version)
        else:
            registry.handler_for(envelope.name, envelope.version)
            cls = registry.get_command(envelope.name, envelope.version)
    except (UnknownJobError, UnknownCommandError) as exc:
        return (
            f"{exc}: not registered by the modules given with -m, so their workers would not run it;"
            " give the module that registers it, or --force"
        )
    try:
        cls.from_data(envelope.data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(data)'}: {e['msg']}" for e in exc.errors())
        return (
            f"its data does not fit {envelope.name} v{envelope.version} ({problems}); it would be dead-lettered"
            " again as invalid_payload (--force replays it anyway)"
        )
    return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def replay_message(letter: DeadLetterView, now: datetime) -> dramatiq.Message[Any]:
    """The message sent back: attempts reset, the replay counted, its send time now (age limits start over)."""
    assert letter.message is not None
    options = {k: v for k, v in letter.message.options.items() if k not in _RESET_OPTIONS}
    options["retries"] = 0
    options[REPLAY_OPTION] = {"count": letter.replay_count + 1, "at": now.isoformat()}
    return dataclasses.replace(
        letter.message,
        queue_name=letter.source_queue,
        options=options,
        message_timestamp=int(now.timestamp() * 1000),
    )
