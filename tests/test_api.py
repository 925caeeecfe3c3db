"""The public API changes only on purpose."""

from __future__ import annotations

import jobflow


def test_all_is_pinned() -> None:
    """jobflow.__all__ is exactly this list, and every name exists."""
    assert jobflow.__all__ == [
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
    for name in jobflow.__all__:
        assert getattr(jobflow, name) is not None


def test_errors_share_one_base() -> None:
    """Every jobflow error is a JobflowError."""
    for name in jobflow.__all__:
        obj = getattr(jobflow, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, jobflow.JobflowError), name
