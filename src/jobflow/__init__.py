"""jobflow: EventFlow's Jobs for Python, on Dramatiq and RabbitMQ."""

from __future__ import annotations

from jobflow.broker import create_broker, memory_broker, redact_url
from jobflow.cancel import CancelResult
from jobflow.command import Command, command_handler
from jobflow.context import CommandBus, CommandContext, JobContext
from jobflow.envelope import MAX_DELAY, CommandEnvelope, JobEnvelope
from jobflow.errors import (
    BrokerUnavailableError,
    ConfigurationError,
    InvalidPayloadError,
    JobflowError,
    JobflowTypeError,
    PermanentError,
    RegistrationError,
    SchedulingError,
    TransientError,
    UnknownCommandError,
    UnknownJobError,
)
from jobflow.job import Job
from jobflow.log_config import configure_logging
from jobflow.publish_command import PublishCommandJob
from jobflow.recurring import RecurringSchedule, recurring
from jobflow.registry import JobRegistry, default_registry
from jobflow.retry import RetryPolicy
from jobflow.schedulers import BrokerJobScheduler, InstantJobScheduler, JobScheduler
from jobflow.settings import Settings
from jobflow.worker import InProcessWorker, declare_actors

__version__ = "0.1.0"

__all__ = [
    "MAX_DELAY",
    "BrokerJobScheduler",
    "BrokerUnavailableError",
    "CancelResult",
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
    "JobflowTypeError",
    "PermanentError",
    "PublishCommandJob",
    "RecurringSchedule",
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
    "recurring",
    "redact_url",
]
