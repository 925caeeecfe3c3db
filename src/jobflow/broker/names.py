"""Every broker-side name jobflow uses, in one place."""

from __future__ import annotations

from typing import Literal

RUN_JOB_ACTOR = "jobflow.run_job"
DISPATCH_COMMAND_ACTOR = "jobflow.dispatch_command"

DEFAULT_QUEUE_PREFIX = "jobflow"


#: The queues of types that name none (``queue=`` on a job or command class).
DEFAULT_JOBS_QUEUE = "jobs"
DEFAULT_COMMANDS_QUEUE = "commands"


def routed_queue(prefix: str, queue: str) -> str:
    """The RabbitMQ queue of the short queue name a type or a schedule call gives."""
    return f"{prefix}.{queue}"


def jobs_queue(prefix: str = DEFAULT_QUEUE_PREFIX) -> str:
    """The queue of jobs whose type names none."""
    return routed_queue(prefix, DEFAULT_JOBS_QUEUE)


def commands_queue(prefix: str = DEFAULT_QUEUE_PREFIX) -> str:
    """The queue of commands whose type names none."""
    return routed_queue(prefix, DEFAULT_COMMANDS_QUEUE)


#: Levels of the delay topology: level k holds messages for 2**k ms, so 38 levels reach 8.7 years.
DELAY_LEVELS = 38


def delay_queue(prefix: str, level: int) -> str:
    """The TTL queue of one level of the delay topology (messages wait here, in the broker)."""
    return f"{prefix}.delay.L{level:02d}"


def delay_exchange(prefix: str, level: int) -> str:
    """The topic exchange that routes a delayed message into level ``level`` or past it."""
    return f"{prefix}.delay.L{level:02d}"


def next_exchange(prefix: str, level: int) -> str:
    """Where a message expiring from level ``level`` is dead-lettered, to reach its next level."""
    return f"{prefix}.delay.L{level:02d}.next"


def ladder_marker(prefix: str, queue_type: str) -> str:
    """Declared last, after the whole ladder: a producer that finds it skips declaring the ladder.

    It names the queue type (a producer configured for another type declares, and meets the
    conflict) and the layout version (a release that changes the ladder declares it anew).
    """
    return f"{prefix}.delay.ready.{queue_type}.v1"


def delivery_exchange(prefix: str) -> str:
    """Where a message whose delay has passed is routed to its destination queue."""
    return f"{prefix}.delay.deliver"


def unroutable_queue(prefix: str) -> str:
    """Catches delayed messages whose destination queue no longer exists, so none is lost."""
    return f"{prefix}.delay.unroutable"


def watchdog_queue(prefix: str) -> str:
    """Elects the worker that watches the ladder (single active consumer); canaries return here."""
    return f"{prefix}.delay.watchdog"


def cancel_stream(prefix: str) -> str:
    """The stream of cancels: every worker reads it from its start, so none runs a cancelled job."""
    return f"{prefix}.cancels"


def schedules_queue(prefix: str) -> str:
    """Elects the worker that drives the recurring schedules (single active consumer of its ticks)."""
    return f"{prefix}.schedules"


def schedules_state_queue(prefix: str) -> str:
    """Holds the one latest state of the recurring schedules (what was published up to when).

    Only a newly elected driver reads it: a reader holds the message for a moment, and a quorum
    queue's length limit counts held messages, so a state written meanwhile would be dropped.
    """
    return f"{prefix}.schedules.state"


def schedules_status_queue(prefix: str) -> str:
    """A copy of each state for ``jobflow schedules list``, so that reading it never hides the state."""
    return f"{prefix}.schedules.status"


def delay_queues(prefix: str) -> list[str]:
    """Every queue in which delayed messages wait."""
    return [delay_queue(prefix, level) for level in range(DELAY_LEVELS)]


Kind = Literal["job", "command"]

#: The kind of message each of jobflow's actors takes.
KINDS: dict[str, Kind] = {RUN_JOB_ACTOR: "job", DISPATCH_COMMAND_ACTOR: "command"}
