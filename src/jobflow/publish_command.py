"""PublishCommandJob: a job whose work is to hand a command to the command-bus actor."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from jobflow.broker.names import DEFAULT_COMMANDS_QUEUE
from jobflow.command import Command
from jobflow.context import JobContext
from jobflow.envelope import CommandEnvelope
from jobflow.errors import JobflowTypeError
from jobflow.job import Job
from jobflow.registry import BUILTIN_JOBS
from jobflow.versioned import check_queue_name

# Command ids derive from the job id: a retried PublishCommandJob sends the same command id, so a
# handler can recognise a duplicate.
_COMMAND_ID_NAMESPACE = uuid.UUID("6f1b2c52-3f0e-4f7e-9a51-4a3c2f1d7b10")


def _command_id(job_id: str) -> str:
    return str(uuid.uuid5(_COMMAND_ID_NAMESPACE, job_id))


class _Forward(Job, abstract=True):
    """What both versions carry: the command by (name, version, JSON data)."""

    command_name: str = Field(min_length=1)
    command_version: int = Field(ge=1)
    command_data: dict[str, Any]

    def _forward(self, ctx: JobContext, queue: str | None) -> None:
        command_id = _command_id(ctx.job_id)
        ctx.command_bus.publish(
            CommandEnvelope(
                command_id=command_id,
                name=self.command_name,
                version=self.command_version,
                data=self.command_data,
                job_id=ctx.job_id,
                sent_at=datetime.now(UTC),
            ),
            queue,
        )
        ctx.log.info("command.forwarded", command_id=command_id, command_name=self.command_name)


class PublishCommandJob(_Forward, name="PublishCommand", version=2):
    """Carries a command and forwards it, when it runs, to its type's queue for the command-bus actor.

    Unlike EventFlow's, a failing handler is not swallowed: the command-bus message fails and is
    retried there, and the outcome is logged under the command's id. Version 2 carries the
    command's queue, so the worker that runs this job needs no command types of its own.
    """

    command_queue: Annotated[str, AfterValidator(check_queue_name)] = DEFAULT_COMMANDS_QUEUE

    @classmethod
    def create(cls, command: Command) -> PublishCommandJob:
        if not isinstance(command, Command):
            raise JobflowTypeError(
                f"PublishCommandJob.create takes a jobflow.Command instance, not {type(command).__qualname__}"
                f" ({command!r:.80})"
            )
        return cls(
            command_name=command.command_name,
            command_version=command.command_version,
            command_data=command.to_data(),
            command_queue=type(command).__jobflow_queue__,
        )

    def execute(self, ctx: JobContext) -> None:
        self._forward(ctx, self.command_queue)


class PublishCommandJobV1(_Forward, name="PublishCommand", version=1):
    """Messages written before version 2: the command goes to the queue its type names where it is
    registered in this worker, else to the default ``commands`` queue."""

    def execute(self, ctx: JobContext) -> None:
        self._forward(ctx, None)


BUILTIN_JOBS.extend([PublishCommandJobV1, PublishCommandJob])
