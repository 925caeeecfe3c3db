"""Commands of the example application."""

from __future__ import annotations

import jobflow


class SendEmailCommand(jobflow.Command, name="SendEmail", version=1, queue="emails"):
    """EventFlow's documentation example of a command published by a job.

    Mail has a queue of its own (``<prefix>.emails``), so a backlog of slow jobs never holds up a
    password reset, and its workers can be sized apart: ``dramatiq jobflow.actors actors --queues
    jobflow.emails``.
    """

    to: str
    subject: str
    body: str = ""


@jobflow.command_handler(SendEmailCommand)
def send_email(command: SendEmailCommand, ctx: jobflow.CommandContext) -> str:
    """Stands in for an SMTP call; the outbox service, when the application registers one, records it."""
    outbox = ctx.services.get("outbox")
    if outbox is not None:
        outbox.append(command)
    ctx.log.info("email_sent", to=command.to, subject=command.subject)
    return ctx.command_id
