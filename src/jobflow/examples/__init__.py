"""The example application: EventFlow's documentation examples, as a worker would load them.

It ships inside jobflow so that ``jobflow demo`` runs from an installed package;
``dramatiq jobflow.actors jobflow.examples`` (or the project's ``actors``, which re-exports it)
runs them on a worker.
"""

from jobflow.examples.commands import SendEmailCommand, send_email
from jobflow.examples.jobs import FlakyJob, LogMessageJob

__all__ = ["FlakyJob", "LogMessageJob", "SendEmailCommand", "send_email"]
