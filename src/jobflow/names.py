"""Every broker-side name jobflow uses, in one place."""

from __future__ import annotations

RUN_JOB_ACTOR = "jobflow.run_job"
DISPATCH_COMMAND_ACTOR = "jobflow.dispatch_command"

DEFAULT_QUEUE_PREFIX = "jobflow"


def jobs_queue(prefix: str = DEFAULT_QUEUE_PREFIX) -> str:
    """The queue the run-job actor consumes."""
    return f"{prefix}.jobs"


def commands_queue(prefix: str = DEFAULT_QUEUE_PREFIX) -> str:
    """The queue the command-bus actor consumes."""
    return f"{prefix}.commands"
