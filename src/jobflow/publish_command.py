"""PublishCommandJob: a job whose work is to hand a command to the command-bus actor."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import Field

from jobflow.command import Command
from jobflow.context import JobContext
from jobflow.envelope import CommandEnvelope
from jobflow.errors import JobflowTypeError
from jobflow.job import Job
from jobflow.registry import BUILTIN_JOBS

# Command ids derive from the job id: a retried PublishCommandJob sends the same command id, so a
# handler can recognise a duplicate.
_COMMAND_ID_NAMESPACE = uuid.UUID("6f1b2c52-3f0e-4f7e-9a51-4a3c2f1d7b10")


class PublishCommandJob(Job, name="PublishCommand", version=1):
    """Carries a command by (name, version, JSON data) and forwards it when it runs.

    Unlike EventFlow's, a failing handler is not swallowed: the command-bus message fails and is
    retried there, and the outcome is logged under the command's id.
    """

    command_name: str = Field(min_length=1)
    command_version: int = Field(ge=1)
    command_data: dict[str, Any]

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
        )

    def execute(self, ctx: JobContext) -> None:
        command_id = str(uuid.uuid5(_COMMAND_ID_NAMESPACE, ctx.job_id))
        ctx.command_bus.publish(
            CommandEnvelope(
                command_id=command_id,
                name=self.command_name,
                version=self.command_version,
                data=self.command_data,
                job_id=ctx.job_id,
                sent_at=datetime.now(UTC),
            )
        )
        ctx.log.info("command.forwarded", command_id=command_id, command_name=self.command_name)


BUILTIN_JOBS.append(PublishCommandJob)
