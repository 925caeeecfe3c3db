"""Jobs of the example application (shipped in the package, so `jobflow demo` runs from a pip install)."""

from __future__ import annotations

from datetime import timedelta

import jobflow


class LogMessageJob(jobflow.Job, name="LogMessage", version=1):
    """EventFlow's documentation example: log a message."""

    message: str

    def execute(self, ctx: jobflow.JobContext) -> None:
        ctx.log.info("log_message", message=self.message)


class FlakyJob(
    jobflow.Job,
    name="Flaky",
    version=1,
    # Retries within a second, so the demo shows them without waiting for the default backoff.
    retry=jobflow.RetryPolicy(max_attempts=5, backoff=timedelta(milliseconds=200), max_backoff=timedelta(seconds=1)),
):
    """Fails with a transient error on its first ``failures`` attempts, then succeeds."""

    failures: int = 2

    async def execute(self, ctx: jobflow.JobContext) -> None:
        if ctx.attempt <= self.failures:
            raise jobflow.TransientError(f"flaky dependency unavailable (attempt {ctx.attempt})")
        ctx.log.info("flaky_recovered", attempts=ctx.attempt)
