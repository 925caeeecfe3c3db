"""The worker's entry module: ``dramatiq jobflow.actors your.jobs``.

Importing it builds the broker from the environment (``JOBFLOW_BROKER_URL``, RabbitMQ on
localhost when unset) and sets it as Dramatiq's global broker *before* any actor exists, then
declares the run-job and command-bus actors. The modules named after it register the job and
command types.
"""

from __future__ import annotations

import dramatiq

from jobflow.broker import create_broker
from jobflow.log_config import configure_logging
from jobflow.settings import Settings
from jobflow.worker import declare_actors

settings = Settings()
configure_logging(settings.log_format, settings.log_level, job_data=settings.log_job_data)
broker = create_broker(settings)
dramatiq.set_broker(broker)
_actors = declare_actors(broker, settings=settings)

run_job = _actors.run_job
dispatch_command = _actors.dispatch_command

__all__ = ["broker", "dispatch_command", "run_job"]
