"""jobflow: EventFlow's Jobs for Python, on Dramatiq and RabbitMQ."""

from __future__ import annotations

from .brokers import create_broker, memory_broker, redact_url
from .command import Command, command_handler
from .context import CommandBus, CommandContext, JobContext
from .envelope import CommandEnvelope, JobEnvelope
from .errors import (
    ConfigurationError,
    InvalidPayloadError,
    JobflowError,
    PermanentError,
    RegistrationError,
    SchedulingError,
    TransientError,
    UnknownCommandError,
    UnknownJobError,
)
from .job import Job
from .log_config import configure_logging
from .publish_command import PublishCommandJob
from .registry import JobRegistry, default_registry
from .retry import RetryPolicy
from .schedulers import MAX_DELAY, BrokerJobScheduler, InstantJobScheduler, JobScheduler
from .settings import Settings
from .worker import InProcessWorker, declare_actors

__version__ = "0.1.0"

__all__ = [
    "MAX_DELAY",
    "BrokerJobScheduler",
    "Command",
    "CommandBus",
    "CommandContext",
    "CommandEnvelope",
    "ConfigurationError",
    "InProcessWorker",
    "InstantJobScheduler",
    "InvalidPayloadError",
    "Job",
    "JobContext",
    "JobEnvelope",
    "JobRegistry",
    "JobScheduler",
    "JobflowError",
    "PermanentError",
    "PublishCommandJob",
    "RegistrationError",
    "RetryPolicy",
    "SchedulingError",
    "Settings",
    "TransientError",
    "UnknownCommandError",
    "UnknownJobError",
    "command_handler",
    "configure_logging",
    "create_broker",
    "declare_actors",
    "default_registry",
    "memory_broker",
    "redact_url",
]
