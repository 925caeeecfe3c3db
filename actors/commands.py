"""Commands of the example application: they live in :mod:`jobflow.examples.commands`, shipped with jobflow."""

from __future__ import annotations

from jobflow.examples.commands import SendEmailCommand, send_email

__all__ = ["SendEmailCommand", "send_email"]
