"""What a running job or command handler is given: its identity, a bound logger, services."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import structlog

from jobflow.envelope import CommandEnvelope


class CommandBus(Protocol):
    """Where a command goes: the command-bus actor's queue, or a handler in this process."""

    def publish(self, envelope: CommandEnvelope, queue: str | None = None) -> None:
        """``queue``: the short name of the command's queue (its type's); None, the bus decides."""


@dataclass(frozen=True)
class JobContext:
    """EventFlow's service provider, for one execution of one job."""

    job_id: str
    job_name: str
    job_version: int
    attempt: int
    due_at: datetime | None
    queue: str
    log: structlog.typing.FilteringBoundLogger = field(repr=False)
    command_bus: CommandBus = field(repr=False)
    #: Out of the repr: services hold clients and their credentials (a DSN, an API key).
    services: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class CommandContext:
    """What a command handler is given."""

    command_id: str
    command_name: str
    command_version: int
    attempt: int
    queue: str
    job_id: str | None
    log: structlog.typing.FilteringBoundLogger = field(repr=False)
    #: Out of the repr: services hold clients and their credentials (a DSN, an API key).
    services: Mapping[str, Any] = field(default_factory=dict, repr=False)
