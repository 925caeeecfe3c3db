"""Jobs: what a scheduler runs."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, ClassVar

from jobflow.broker.names import DEFAULT_JOBS_QUEUE
from jobflow.errors import ConfigurationError
from jobflow.versioned import VersionedModel

if TYPE_CHECKING:
    from jobflow.context import JobContext


class Job(VersionedModel, abstract=True):
    """A unit of work: pydantic fields for its data, ``execute(ctx)`` (``def`` or ``async def``).

    ``class LogMessageJob(Job, name="LogMessage", version=1)``; without them, the class name and 1.
    ``registry=`` joins another registry than ``default_registry``; ``abstract=True`` registers
    nothing (for shared base classes). ``retry=RetryPolicy(...)`` and ``time_limit=timedelta(...)``
    override the registry's defaults for this type and its subclasses. ``queue="emails"`` sends
    its messages to ``<prefix>.emails`` (default ``jobs``); subclasses inherit it.
    """

    job_name: ClassVar[str]
    job_version: ClassVar[int]
    __jobflow_queue__: ClassVar[str] = DEFAULT_JOBS_QUEUE

    @classmethod
    def _set_identity(cls, name: str, version: int) -> None:
        cls.job_name = name
        cls.job_version = version

    @classmethod
    def _register(cls) -> None:
        if cls.execute is Job.execute:
            raise ConfigurationError(
                f"{cls.__module__}.{cls.__qualname__} defines no execute(self, ctx): a job must say what it does"
                " (or be a shared base class: class Base(jobflow.Job, abstract=True))"
            )
        cls.registry.register_job(cls)

    def execute(self, ctx: JobContext) -> Awaitable[None] | None:
        raise NotImplementedError
