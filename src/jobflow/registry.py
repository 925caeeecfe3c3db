"""Which class answers to which (name, version), and which handler runs each command.

Messages carry only ``(name, version, JSON data)``: the registry is the one place that turns
them back into objects, so only registered types are ever instantiated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from jobflow.errors import ConfigurationError, RegistrationError, UnknownCommandError, UnknownJobError
from jobflow.retry import DEFAULT_RETRY_POLICY, DEFAULT_TIME_LIMIT, RetryPolicy, TypeOptions, check_time_limit

if TYPE_CHECKING:
    from jobflow.command import Command, CommandHandler
    from jobflow.job import Job
    from jobflow.recurring import RecurringSchedule

T = TypeVar("T", bound=type)

#: How long an unknown (name, version) is retried: longer than a rolling deploy takes.

#: Job types every registry knows (PublishCommandJob), added by the modules that define them.
BUILTIN_JOBS: list[type[Job]] = []


def _describe(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class _TypeTable(Generic[T]):
    """(name, version) -> class, refusing a second class for a taken pair."""

    def __init__(self, kind: str, missing: Callable[..., LookupError]) -> None:
        self._kind = kind
        self._missing = missing
        self._types: dict[tuple[str, int], T] = {}

    def add(self, name: str, version: int, cls: T) -> None:
        key = (name, version)
        existing = self._types.get(key)
        # The same class defined again (a module reloaded, __main__ imported twice) replaces itself.
        if existing is not None and _describe(existing) != _describe(cls):
            raise RegistrationError(
                f"{self._kind} ({name!r}, {version}) is already registered by {_describe(existing)};"
                f" {_describe(cls)} cannot claim it too",
                name=name,
                version=version,
            )
        self._types[key] = cls

    def get(self, name: str, version: int) -> T:
        try:
            return self._types[(name, version)]
        except KeyError:
            known = self.versions(name)
            have = f"registered versions: {known}" if known else f"no version of {name!r} is registered"
            raise self._missing(
                f"unknown {self._kind} ({name!r}, {version}); {have}", name=name, version=version
            ) from None

    def find(self, name: str, version: int) -> T | None:
        return self._types.get((name, version))

    def versions(self, name: str) -> list[int]:
        return sorted(v for (n, v) in self._types if n == name)

    def __iter__(self) -> Iterator[tuple[str, int, T]]:
        for (name, version), cls in sorted(self._types.items()):
            yield name, version, cls

    def __len__(self) -> int:
        return len(self._types)


class JobRegistry:
    """Job types, command types and command handlers of one application.

    ``default_registry`` serves most applications; a separate registry keeps tests or tenants apart
    (pass ``registry=`` when defining the class).
    """

    @property
    def unknown_type_retry(self) -> timedelta | None:
        return self._unknown_type_retry

    @unknown_type_retry.setter
    def unknown_type_retry(self, value: timedelta | None) -> None:
        if value is not None and (not isinstance(value, timedelta) or value < timedelta(0)):
            raise ConfigurationError(f"unknown_type_retry must be a timedelta >= 0 or None, got {value!r}")
        self._unknown_type_retry = value

    def __init__(
        self,
        *,
        retry_policy: RetryPolicy | None = None,
        time_limit: timedelta | None = None,
        unknown_type_retry: timedelta | None = None,
    ) -> None:
        #: The retry policy and time limit of every type that sets none (class options override them).
        self.retry_policy = retry_policy or DEFAULT_RETRY_POLICY
        self.time_limit = check_time_limit(time_limit or DEFAULT_TIME_LIMIT)
        #: How long a message of a (name, version) this process does not know is retried before it
        #: is dead-lettered: in a rolling deploy, producers may ship a type before every worker has it.
        #: None: the worker's ``Settings.unknown_type_retry`` (``JOBFLOW_UNKNOWN_TYPE_RETRY``, 15 min).
        self.unknown_type_retry = unknown_type_retry
        self._jobs: _TypeTable[type[Job]] = _TypeTable("job", UnknownJobError)
        self._commands: _TypeTable[type[Command]] = _TypeTable("command", UnknownCommandError)
        self._handlers: dict[tuple[str, int], CommandHandler[Any]] = {}
        #: The application's services, handed to every job and handler as ``ctx.services``.
        self.services: dict[str, Any] = {}
        self._schedules: dict[str, RecurringSchedule] = {}
        for cls in BUILTIN_JOBS:
            self.register_job(cls)

    # jobs
    def register_job(self, cls: type[Job]) -> None:
        self._jobs.add(cls.job_name, cls.job_version, cls)

    def get(self, name: str, version: int) -> type[Job]:
        """The job class for (name, version); :class:`UnknownJobError` names the versions that exist."""
        return self._jobs.get(name, version)

    def job_versions(self, name: str) -> list[int]:
        return self._jobs.versions(name)

    def jobs(self) -> list[type[Job]]:
        return [cls for _, _, cls in self._jobs]

    def options_for(self, kind: Literal["job", "command"], name: str, version: int) -> TypeOptions:
        """The retry policy and time limit of a type; the registry's defaults for an unknown one."""
        cls: Any = (self._jobs if kind == "job" else self._commands).find(name, version)
        retry = getattr(cls, "__jobflow_retry__", None) or self.retry_policy
        time_limit = getattr(cls, "__jobflow_time_limit__", None) or self.time_limit
        return TypeOptions(retry, time_limit)

    # recurring schedules
    def add_schedule(self, schedule: RecurringSchedule) -> None:
        """Add a schedule (``jobflow.recurring`` does); the same definition again is harmless."""
        existing = self._schedules.get(schedule.name)
        if existing is not None and _schedule_key(existing) != _schedule_key(schedule):
            raise RegistrationError(
                f"schedule {schedule.name!r} is already declared ({existing.describe()} of"
                f" {type(existing.job).job_name}); give the other one another name"
            )
        self._schedules[schedule.name] = schedule

    def schedules(self) -> list[RecurringSchedule]:
        return [self._schedules[name] for name in sorted(self._schedules)]

    # commands
    def register_command(self, cls: type[Command]) -> None:
        self._commands.add(cls.command_name, cls.command_version, cls)

    def get_command(self, name: str, version: int) -> type[Command]:
        return self._commands.get(name, version)

    def commands(self) -> list[type[Command]]:
        return [cls for _, _, cls in self._commands]

    def register_handler(self, command_type: type[Command], handler: CommandHandler[Any]) -> None:
        key = (command_type.command_name, command_type.command_version)
        if self._commands.get(*key) is not command_type:
            raise RegistrationError(
                f"{_describe(command_type)} is not the command registered as {key} in this registry",
                name=key[0],
                version=key[1],
            )
        existing = self._handlers.get(key)
        if existing is not None and _describe_fn(existing) != _describe_fn(handler):
            raise RegistrationError(
                f"command {key} already has the handler {_describe_fn(existing)};"
                f" {_describe_fn(handler)} cannot be a second one",
                name=key[0],
                version=key[1],
            )
        self._handlers[key] = handler

    def handler_for(self, name: str, version: int) -> CommandHandler[Any]:
        self.get_command(name, version)
        try:
            return self._handlers[(name, version)]
        except KeyError:
            raise UnknownCommandError(
                f"command ({name!r}, {version}) has no handler registered", name=name, version=version
            ) from None


def _schedule_key(schedule: RecurringSchedule) -> tuple[Any, ...]:
    job = schedule.job
    return (
        type(job).job_name,
        type(job).job_version,
        job.to_data(),
        schedule.cron,
        schedule.every,
        schedule.timezone,
        schedule.missed,
        schedule.queue,
    )


def _describe_fn(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


#: The registry every job and command class joins unless told otherwise.
default_registry = JobRegistry()
