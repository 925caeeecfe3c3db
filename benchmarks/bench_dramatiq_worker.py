"""Raw Dramatiq for comparison: a plain ``RabbitmqBroker`` and a plain actor, native ``delay=``.

``dramatiq bench_dramatiq_worker`` with ``BENCH_BROKER_URL`` and ``BENCH_RESULTS`` set.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from recording import RAW_ACTOR, RAW_QUEUE, record

broker = RabbitmqBroker(url=os.environ["BENCH_BROKER_URL"], confirm_delivery=True)
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name=RAW_ACTOR, queue_name=RAW_QUEUE, max_retries=0)
def bench_delay(tag: str, n: int, due_ms: int) -> None:
    record("dramatiq", tag, n, due_ms)
