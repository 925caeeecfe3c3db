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

from jobflow.broker.names import DISPATCH_COMMAND_ACTOR, RUN_JOB_ACTOR
from jobflow.cli.amqp import Connection, QueueCounter, acknowledge, broker_error, close_quietly, take
from jobflow.cli.letters import DeadLetterView, read_dead_letter
from jobflow.cli.selection import Selection
from jobflow.dead_letter import FIRST_FAILURE_OPTION, REPLAY_OPTION, dead_letter_queue
from jobflow.errors import UnknownCommandError, UnknownJobError
from jobflow.middleware.due_time import DUE_OPTION
from jobflow.registry import JobRegistry

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
) -> None:
    """Show each dead letter that ``selection`` matches to ``visit`` once; see the module's docstring."""
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
                if selection.matches(letter) and visit(letter):
                    acknowledge(channel, delivery)
                if on_examined is not None:
                    on_examined()
        finally:
            close_quietly(channel)


@dataclass
class MoveReport:
    """What a replay or purge did."""

    moved: int = 0
    refused: list[tuple[DeadLetterView, str]] = field(default_factory=list)
    matched_ids: set[str] = field(default_factory=set)

    def as_json(self, *, dry_run: bool, missing: list[str]) -> dict[str, Any]:
        return {
            "moved": self.moved,
            "dry_run": dry_run,
            "refused": [{"id": letter.id, "job": letter.name, "reason": why} for letter, why in self.refused],
            "not_found": missing,
        }


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
        self.report = MoveReport()

    def __call__(self, letter: DeadLetterView) -> bool:
        self.report.matched_ids.add(letter.id)
        self.report.moved += 1
        return True


class Replayer:
    """Publishes each replayable dead letter to its queue, confirmed, before it is removed."""

    def __init__(
        self,
        broker: dramatiq.Broker | None,
        registry: JobRegistry,
        *,
        delay_ms: int | None,
        dry_run: bool,
        broker_url: str,
    ) -> None:
        if not dry_run and not getattr(broker, "confirm_delivery", False):
            raise ValueError("replay needs a broker that publishes with confirms")
        self.broker = broker
        self.registry = registry
        self.delay_ms = delay_ms
        self.dry_run = dry_run
        self.broker_url = broker_url
        self.report = MoveReport()

    def __call__(self, letter: DeadLetterView) -> bool:
        self.report.matched_ids.add(letter.id)
        why = refusal(letter, self.registry)
        if why is not None:
            self.report.refused.append((letter, why))
            return False
        self.report.moved += 1
        if self.dry_run or self.broker is None:
            return False
        try:
            self.broker.enqueue(replay_message(letter, datetime.now(UTC)), delay=self.delay_ms or None)
        except BrokerConnectionError as exc:
            self.report.moved -= 1
            raise broker_error(self.broker_url, exc, doing="publish to") from None
        return True


def refusal(letter: DeadLetterView, registry: JobRegistry) -> str | None:
    """Why ``letter`` cannot be replayed, or None: replaying it must at least reach a handler."""
    message = letter.message
    if message is None:
        return "the body is not a Dramatiq message, so there is nothing to replay; purge it once inspected"
    if message.actor_name not in (RUN_JOB_ACTOR, DISPATCH_COMMAND_ACTOR):
        return f"actor {message.actor_name!r} is not one of jobflow's ({RUN_JOB_ACTOR}, {DISPATCH_COMMAND_ACTOR})"
    envelope = letter.envelope or {}
    name, version = envelope.get("name"), envelope.get("version")
    if not isinstance(name, str) or not isinstance(version, int):
        return "the message carries no jobflow envelope (name and version), so no job type can run it"
    try:
        if message.actor_name == RUN_JOB_ACTOR:
            registry.get(name, version)
        else:
            registry.handler_for(name, version)
    except (UnknownJobError, UnknownCommandError) as exc:
        return f"{exc}; import the module that registers it with -m MODULE"
    return None


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
