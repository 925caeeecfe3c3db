"""``schedule_many`` (pipelined confirms) and ``schedule_async`` (no thread per call, one connection)."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta

import pytest

import jobflow
from jobflow import JobRegistry, Settings
from jobflow.broker.memory import MemoryBroker

from .faults import connections, vhost_of
from .test_delays import drain

REGISTRY = JobRegistry()


class Bulk(jobflow.Job, name="BulkJob", registry=REGISTRY):
    n: int
    pad: str = ""

    def execute(self, ctx: jobflow.JobContext) -> None:
        pass


def job_ids(bodies: list[bytes]) -> list[str]:
    return [json.loads(body)["message_id"] for body in bodies]


class TestMemory:
    def test_ids_in_order_and_every_job_published(self, memory_settings: Settings) -> None:
        scheduler = jobflow.BrokerJobScheduler(settings=memory_settings, registry=REGISTRY)
        ids = scheduler.schedule_many(Bulk(n=i) for i in range(5))
        assert len(set(ids)) == 5
        broker = scheduler.broker
        assert isinstance(broker, MemoryBroker)
        queued = job_ids(list(broker.queues[scheduler.queue].queue))
        assert queued == ids

    def test_nothing_published_when_one_job_is_refused_before_publishing(self) -> None:
        settings = Settings(broker_url="memory://many-too-large", max_payload_bytes=2048)
        scheduler = jobflow.BrokerJobScheduler(settings=settings, registry=REGISTRY)
        jobs = [Bulk(n=0), Bulk(n=1, pad="x" * 4096), Bulk(n=2)]
        with pytest.raises(jobflow.SchedulingError):
            scheduler.schedule_many(jobs)
        broker = scheduler.broker
        assert isinstance(broker, MemoryBroker)
        assert broker.queues.get(scheduler.queue) is None or broker.queues[scheduler.queue].qsize() == 0

    def test_unconfirmed_jobs_are_named(self) -> None:
        settings = Settings(broker_url="memory://many-refused")
        scheduler = jobflow.BrokerJobScheduler(settings=settings, registry=REGISTRY)
        broker = scheduler.broker
        assert isinstance(broker, MemoryBroker)
        refused_n = {1, 3}
        broker.faults.refuse(times=2, when=lambda message, _delay: message.args[0]["data"]["n"] in refused_n)
        with pytest.raises(jobflow.BrokerUnavailableError) as info:
            scheduler.schedule_many([Bulk(n=i) for i in range(5)])
        refused_ids = [m.message_id for m in broker.faults.refused]
        assert sorted(info.value.job_ids) == sorted(refused_ids)
        assert len(refused_ids) == 2
        assert "2 of 5" in str(info.value)
        assert broker.queues[scheduler.queue].qsize() == 3

    def test_instant_scheduler_runs_each(self) -> None:
        ran: list[int] = []
        registry = JobRegistry()

        class Seen(jobflow.Job, name="Seen", registry=registry):
            n: int

            def execute(self, ctx: jobflow.JobContext) -> None:
                ran.append(self.n)

        ids = jobflow.InstantJobScheduler(registry).schedule_many([Seen(n=1), Seen(n=2)])
        assert ran == [1, 2]
        assert len(set(ids)) == 2


@pytest.mark.rabbitmq
class TestRabbitmq:
    def test_immediate_and_delayed_jobs_all_arrive(self, amqp_settings: Settings) -> None:
        with jobflow.BrokerJobScheduler(settings=amqp_settings, registry=REGISTRY) as scheduler:
            now = scheduler.schedule_many([Bulk(n=i) for i in range(500)])
            later = scheduler.schedule_many([Bulk(n=i) for i in range(500)], delay=timedelta(seconds=1))
            assert len(set(now) | set(later)) == 1000
            arrived = drain(amqp_settings.broker_url, scheduler.queue, 1000, timeout=30)
        assert sorted(job_ids(arrived)) == sorted(now + later)

    def test_async_callers_share_one_connection_and_the_loop_keeps_running(self, amqp_settings: Settings) -> None:
        ticks = 0

        async def ticker(stop: asyncio.Event) -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        async def main(scheduler: jobflow.BrokerJobScheduler) -> tuple[list[str], list[tuple[str, int]]]:
            stop = asyncio.Event()
            tick = asyncio.create_task(ticker(stop))
            ids = await asyncio.gather(*(scheduler.schedule_async(Bulk(n=i)) for i in range(300)))
            held = connections(vhost_of(amqp_settings.broker_url))
            stop.set()
            await tick
            return list(ids), held

        with jobflow.BrokerJobScheduler(settings=amqp_settings, registry=REGISTRY) as scheduler:
            scheduler.schedule_now(Bulk(n=-1))  # connected and declared first
            started = time.monotonic()
            ids, held = asyncio.run(main(scheduler))
            elapsed = time.monotonic() - started
            arrived = drain(amqp_settings.broker_url, scheduler.queue, 301, timeout=30)
        print(f"300 concurrent schedule_async: {elapsed:.2f} s, {ticks} loop ticks, {len(held)} connection(s)")
        assert len(set(ids)) == 300
        assert set(ids) <= set(job_ids(arrived))
        assert len(held) == 1, f"one publisher connection for every task, saw {held}"
        assert ticks > 0
