"""jobflow's worker for the benchmarks: ``dramatiq jobflow.actors bench_jobflow_worker``.

Adds one middleware before jobflow's ``DueTime`` so a record shows when the broker handed the
message over, before the early guard could make it wait.
"""

from __future__ import annotations

import time

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.middleware import Middleware

import bench_jobs
from jobflow.actors import broker
from jobflow.middleware.due_time import DueTime


class Arrival(Middleware):
    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        message.options[bench_jobs.ARRIVED_OPTION] = time.time() * 1000


broker.add_middleware(Arrival(), before=DueTime)
