"""Raw Dramatiq for the throughput benchmark: ``dramatiq tp_dramatiq_worker`` with ``BENCH_BROKER_URL``.

A plain ``RabbitmqBroker`` with confirms (as jobflow publishes), Dramatiq's default middleware
plus ``AsyncIO``, and trivial actors: what a Dramatiq user's worker does per message.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import AsyncIO

from tp_jobs import RAW_ASYNC, RAW_LATENCY, RAW_SYNC, record_latency

broker = RabbitmqBroker(url=os.environ["BENCH_BROKER_URL"], confirm_delivery=True)
broker.add_middleware(AsyncIO())
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name=RAW_SYNC, queue_name=RAW_SYNC, max_retries=0)
def tp_sync(n: int) -> None:
    pass


@dramatiq.actor(actor_name=RAW_ASYNC, queue_name=RAW_ASYNC, max_retries=0)
async def tp_async(n: int) -> None:
    pass


@dramatiq.actor(actor_name=RAW_LATENCY, queue_name=RAW_LATENCY, max_retries=0)
def tp_latency(sent_ms: float) -> None:
    record_latency("dramatiq", sent_ms)
