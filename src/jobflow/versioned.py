"""The base shared by jobs and commands: a frozen pydantic model with a stable (name, version)."""

from __future__ import annotations

import inspect
import json
import re
from datetime import timedelta
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict

from jobflow.errors import ConfigurationError, JobflowTypeError
from jobflow.registry import JobRegistry, default_registry
from jobflow.retry import RetryPolicy, check_time_limit


class VersionedModel(BaseModel):
    """A frozen model that registers itself under ``(name, version)`` when its class is defined.

    The pair, not the import path, is what crosses the wire, so a class can be renamed or moved
    without stranding messages already waiting in the broker.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    _kind: ClassVar[str] = "model"
    registry: ClassVar[JobRegistry]
    __jobflow_abstract__: ClassVar[bool] = False
    #: Class options (``retry=``, ``time_limit=``); None means the registry's default. Subclasses inherit them.
    __jobflow_retry__: ClassVar[RetryPolicy | None] = None
    __jobflow_time_limit__: ClassVar[timedelta | None] = None
    #: The short name of the queue the type's messages go to (``<prefix>.<queue>``); inherited.
    __jobflow_queue__: ClassVar[str]

    def __init_subclass__(
        cls,
        *,
        name: str | None = None,
        version: int = 1,
        registry: JobRegistry | None = None,
        abstract: bool = False,
        retry: RetryPolicy | None = None,
        time_limit: timedelta | None = None,
        queue: str | None = None,
        **unknown: Any,
    ) -> None:
        # Consumed here so that object.__init_subclass__ never sees them (pydantic has already taken
        # its model_config keys); registration waits for __pydantic_init_subclass__, when the model is
        # complete. A keyword left over is a typo or an option this version lacks: say which.
        if unknown:
            raise JobflowTypeError(
                f"{cls.__qualname__}: unknown class keyword(s) {', '.join(map(repr, sorted(unknown)))};"
                f" accepted: {', '.join(class_options(cls))}, and pydantic's model_config keys"
            )
        super().__init_subclass__()
        if name is not None and not isinstance(name, str):
            raise JobflowTypeError(f"{cls.__qualname__}: name must be a str, got {name!r}")
        if name is not None and not name.strip():
            raise ConfigurationError(f"{cls.__qualname__}: name must be a non-empty string, got {name!r}")
        if isinstance(version, bool) or not isinstance(version, int):
            raise JobflowTypeError(f"{cls.__qualname__}: version must be an int >= 1, got {version!r}")
        if version < 1:
            raise ConfigurationError(f"{cls.__qualname__}: version must be an int >= 1, got {version!r}")
        cls._set_identity(name or cls.__name__, version)
        cls.registry = registry or default_registry
        cls.__jobflow_abstract__ = abstract
        if retry is not None:
            if not isinstance(retry, RetryPolicy):
                raise JobflowTypeError(f"{cls.__qualname__}: retry must be a jobflow.RetryPolicy, got {retry!r}")
            cls.__jobflow_retry__ = retry
        if time_limit is not None:
            try:
                cls.__jobflow_time_limit__ = check_time_limit(time_limit)
            except ConfigurationError as exc:
                raise ConfigurationError(f"{cls.__qualname__}: {exc}") from None
        if queue is not None:
            try:
                cls.__jobflow_queue__ = check_queue_name(queue)
            except ConfigurationError as exc:
                raise type(exc)(f"{cls.__qualname__}: {exc}") from None

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if not cls.__dict__.get("__jobflow_abstract__", False):
            cls._register()

    @classmethod
    def _set_identity(cls, name: str, version: int) -> None:
        raise NotImplementedError

    @classmethod
    def _register(cls) -> None:
        raise NotImplementedError

    def to_data(self) -> dict[str, Any]:
        """The JSON-ready data that crosses the wire."""
        return self.model_dump(mode="json")

    @classmethod
    def from_data(cls, data: Any) -> Self:
        """Validate wire data in JSON mode, so strict models accept what they serialized."""
        return cls.model_validate_json(json.dumps(data))


_QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9][A-Za-z0-9_-]*)*")
#: Names of the prefix that are not work queues: the delay ladder's.
_RESERVED_QUEUES = ("delay",)


def check_queue_name(queue: object) -> str:
    """A short queue name (``emails``, ``reports.slow``) that names a work queue of the prefix."""
    if not isinstance(queue, str):
        raise JobflowTypeError(f"queue must be a str such as 'emails', got {queue!r}")
    if not _QUEUE_NAME.fullmatch(queue) or len(queue) > 200:
        raise ConfigurationError(
            f"queue {queue!r} is not a queue name: letters, digits, '_' and '-', in parts joined by '.'"
            " (the prefix is added: 'emails' is <prefix>.emails)"
        )
    head = queue.split(".")[0]
    if head in _RESERVED_QUEUES or queue.endswith((".DQ", ".XQ")):
        raise ConfigurationError(f"queue {queue!r} is reserved: jobflow's delay ladder and Dramatiq's .DQ/.XQ use it")
    return queue


def class_options(cls: type) -> list[str]:
    """The class keywords ``cls`` accepts: the keyword-only parameters of every ``__init_subclass__``
    in its MRO, so that an option added to any of them is named in the error without more code."""
    names: list[str] = []
    for klass in cls.__mro__:
        hook = klass.__dict__.get("__init_subclass__")
        if hook is None or klass is object:
            continue
        for param in inspect.signature(getattr(hook, "__func__", hook)).parameters.values():
            if param.kind is inspect.Parameter.KEYWORD_ONLY and param.name not in names:
                names.append(param.name)
    return [f"{n}=" for n in names]
