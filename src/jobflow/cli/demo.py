"""``jobflow demo``: EventFlow's examples end to end, on the in-memory broker or RabbitMQ."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
import uuid
from datetime import timedelta
from typing import Any, TextIO
from urllib.parse import urlsplit

from jobflow.broker.connection import describe_broker
from jobflow.broker.names import DISPATCH_COMMAND_ACTOR, RUN_JOB_ACTOR
from jobflow.broker.rabbitmq import JobflowRabbitmqBroker
from jobflow.errors import ConfigurationError
from jobflow.log_config import configure_logging
from jobflow.publish_command import PublishCommandJob
from jobflow.schedulers import BrokerJobScheduler
from jobflow.settings import Settings
from jobflow.testing import OutcomeTracker
from jobflow.worker import InProcessWorker

DEMO_TIMEOUT_S = 15.0


#: The example application: shipped inside jobflow, so the demo runs from an installed package.
EXAMPLE_MODULE = "jobflow.examples"


def _load_example(module: str) -> Any:
    # Another module (one with the same classes) is imported as `dramatiq --path .` would: from the
    # current directory too.
    if module != EXAMPLE_MODULE and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigurationError(
            f"cannot import the example application {module!r} ({exc}); run the demo from the project's root,"
            f" or without --module for jobflow's own ({EXAMPLE_MODULE})"
        ) from exc


def run_demo(broker_url: str, *, module: str = EXAMPLE_MODULE, out: TextIO | None = None) -> bool:
    """Schedule the examples, run them on an in-process worker, print what happened; True if all ran."""
    out = out or sys.stdout
    app = _load_example(module)
    on_rabbitmq = urlsplit(broker_url).scheme != "memory"
    # A demo on a shared RabbitMQ uses queues of its own, so no other worker takes its jobs.
    prefix = f"jobflow-demo-{uuid.uuid4().hex[:8]}" if on_rabbitmq else "jobflow"
    settings = Settings(broker_url=broker_url, queue_prefix=prefix, log_format="console")
    configure_logging("console", "INFO", stream=out, tracebacks=False)
    logging.getLogger("dramatiq").setLevel(logging.CRITICAL)  # its retry tracebacks repeat ours
    print(f"jobflow demo on {describe_broker(broker_url)} (queues {prefix}.*)", file=out)

    tracker = OutcomeTracker()
    scheduler = BrokerJobScheduler(settings=settings)
    scheduler.broker.add_middleware(tracker)
    started = time.time()
    try:
        with InProcessWorker(scheduler.broker, settings=settings):
            jobs = {
                scheduler.schedule_now(app.LogMessageJob(message="Hello from jobflow")): "LogMessage now",
                scheduler.schedule(
                    app.LogMessageJob(message="Hello, two seconds later"), delay=timedelta(seconds=2)
                ): "LogMessage with a 2 s delay",
                scheduler.schedule_now(
                    PublishCommandJob.create(app.SendEmailCommand(to="ops@example.com", subject="Welcome"))
                ): "PublishCommandJob(SendEmail)",
                scheduler.schedule_now(app.FlakyJob(failures=2)): "Flaky job (fails twice, then succeeds)",
            }

            def all_ran(t: OutcomeTracker) -> bool:
                done = {o.message_id for o in t.succeeded(RUN_JOB_ACTOR)}
                return set(jobs) <= done and bool(t.succeeded(DISPATCH_COMMAND_ACTOR))

            ok = tracker.wait_for(all_ran, timeout=DEMO_TIMEOUT_S)
    finally:
        if on_rabbitmq:
            _delete_queues(scheduler)
        scheduler.close()

    print("\nWhat happened:", file=out)
    for job_id, label in jobs.items():
        attempts = [o for o in tracker.outcomes if o.message_id == job_id]
        ran = [o for o in attempts if o.error is None]
        if ran:
            print(
                f"  ok    {label}: ran {ran[0].at - started:5.2f} s after start, {len(attempts)} attempt(s)", file=out
            )
        else:
            print(f"  FAIL  {label}: did not run ({len(attempts)} failed attempt(s))", file=out)
    commands = tracker.succeeded(DISPATCH_COMMAND_ACTOR)
    print(f"  {'ok  ' if commands else 'FAIL'}  SendEmail command handled by the command-bus actor", file=out)
    print(f"\n{'All ran' if ok else 'Not everything ran'} in {time.time() - started:.2f} s.", file=out)
    return ok


def _delete_queues(scheduler: BrokerJobScheduler) -> None:
    """Delete what the demo declared: its work queues (with ``.DQ`` and ``.XQ``) and its delay ladder."""
    if isinstance(scheduler.broker, JobflowRabbitmqBroker):
        scheduler.broker.delete_topology()
