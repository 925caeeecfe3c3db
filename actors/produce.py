"""A one-shot producer: schedules the demo's jobs on the broker for the worker to run.

    python -m actors.produce          # JOBFLOW_BROKER_URL names the broker

compose.yaml's ``producer`` service runs it against the ``worker`` service: unlike ``jobflow demo``,
which runs its own worker in-process on queues of its own, these jobs go to the deployment's queues
and show up in the worker's log (and its ``/metrics``).
"""

from __future__ import annotations

import sys
from datetime import timedelta

import jobflow
from jobflow.broker import redact_url

from .commands import SendEmailCommand
from .jobs import FlakyJob, LogMessageJob


def main() -> int:
    settings = jobflow.Settings()
    with jobflow.BrokerJobScheduler(settings=settings) as scheduler:
        jobs = {
            "LogMessage now": scheduler.schedule_now(LogMessageJob(message="Hello from the producer")),
            "LogMessage in 5 s": scheduler.schedule(
                LogMessageJob(message="Hello, five seconds later"), delay=timedelta(seconds=5)
            ),
            "PublishCommandJob(SendEmail)": scheduler.schedule_now(
                jobflow.PublishCommandJob.create(SendEmailCommand(to="ops@example.com", subject="Welcome"))
            ),
            "Flaky (fails twice, then succeeds)": scheduler.schedule_now(FlakyJob(failures=2)),
        }
    print(f"scheduled on {redact_url(settings.broker_url)} (queues {settings.queue_prefix}.*):")
    for label, job_id in jobs.items():
        print(f"  {job_id}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
