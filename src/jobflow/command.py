"""Commands: named, versioned requests that the command-bus actor hands to their one handler."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from jobflow.broker.names import DEFAULT_COMMANDS_QUEUE
from jobflow.registry import JobRegistry
from jobflow.versioned import VersionedModel

if TYPE_CHECKING:
    from jobflow.context import CommandContext

C = TypeVar("C", bound="Command")
CommandHandler = Callable[[C, "CommandContext"], Any | Awaitable[Any]]


class Command(VersionedModel, abstract=True):
    """``class SendEmailCommand(Command, name="SendEmail", version=1)``; handled by one handler.

    ``retry=`` and ``time_limit=`` apply to the command-bus message that runs the handler;
    ``queue="billing"`` sends it to ``<prefix>.billing`` (default ``commands``).
    """

    command_name: ClassVar[str]
    command_version: ClassVar[int]
    __jobflow_queue__: ClassVar[str] = DEFAULT_COMMANDS_QUEUE

    @classmethod
    def _set_identity(cls, name: str, version: int) -> None:
        cls.command_name = name
        cls.command_version = version

    @classmethod
    def _register(cls) -> None:
        cls.registry.register_command(cls)


def command_handler(
    command_type: type[C], *, registry: JobRegistry | None = None
) -> Callable[[CommandHandler[C]], CommandHandler[C]]:
    """Register the one handler of ``command_type``, called as ``handler(command, ctx)``."""

    def decorate(handler: CommandHandler[C]) -> CommandHandler[C]:
        (registry or command_type.registry).register_handler(command_type, handler)
        return handler

    return decorate
