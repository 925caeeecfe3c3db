"""The example application: EventFlow's documentation examples, as a worker would load them.

``dramatiq jobflow.actors actors`` runs them; ``jobflow demo`` schedules them.
"""

from .commands import SendEmailCommand, send_email
from .jobs import FlakyJob, LogMessageJob

__all__ = ["FlakyJob", "LogMessageJob", "SendEmailCommand", "send_email"]
