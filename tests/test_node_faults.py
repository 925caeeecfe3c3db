"""Broker faults on a RabbitMQ node of the tests' own: ``schedule()`` keeps its deadline, nothing
confirmed is lost, and the same scheduler works again once the node is back.

Each fault is real: ``rabbitmqctl stop_app``, SIGSTOP of the node, a memory alarm that blocks
publishers, SIGKILL of the node. Every call must end within ``publish_timeout`` + 1 s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pika
import pytest

import jobflow
from jobflow import Settings
from jobflow.broker.names import DELAY_LEVELS, delay_queue
from jobflow.broker.retimer import retime_ladder

from .conftest import REQUIRE_RABBITMQ
from .faults import message_count
from .rabbit_nodes import RabbitNode, missing_tools

pytestmark = pytest.mark.rabbitmq

TIMEOUT = 2.0
REGISTRY = jobflow.JobRegistry()


class Probe(jobflow.Job, name="NodeFaultProbe", registry=REGISTRY):
    n: int = 0

    def execute(self, ctx: jobflow.JobContext) -> None:
        pass


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitNode]:
    why = missing_tools()
    if why is not None:
        if REQUIRE_RABBITMQ:
            pytest.fail(f"fault tests need a RabbitMQ node of their own, but {why}", pytrace=False)
        pytest.skip(f"!!! NODE FAULT TESTS SKIPPED: {why}")
    started = RabbitNode("jobflow-faults")
    try:
        started.start()
        yield started
    finally:
        started.destroy()


@pytest.fixture
def scheduler(node: RabbitNode) -> Iterator[jobflow.BrokerJobScheduler]:
    """A scheduler already connected to the node (it scheduled one job), as in a running service."""
    prefix = f"f-{time.monotonic_ns() % 10**10}"
    # Declaring fresh quorum queues, on a node a previous test just restarted, on a loaded machine,
    # may take longer than the deadline under test: a warm-up declares them without it.
    warm = Settings(broker_url=node.url, queue_prefix=prefix, publish_timeout=60)
    with jobflow.BrokerJobScheduler(settings=warm, registry=REGISTRY) as warming:
        warming.schedule_now(Probe())
    settings = warm.model_copy(update={"publish_timeout": TIMEOUT})
    with jobflow.BrokerJobScheduler(settings=settings, registry=REGISTRY) as opened:
        opened.schedule_now(Probe())
        yield opened


def fails_in_time(call: Callable[[], object]) -> jobflow.BrokerUnavailableError:
    start = time.monotonic()
    with pytest.raises(jobflow.BrokerUnavailableError) as info:
        call()
    elapsed = time.monotonic() - start
    print(f"failed after {elapsed:.2f} s: {info.value}")
    assert elapsed <= TIMEOUT + 1.0, f"took {elapsed:.2f} s"
    assert "guest:guest" not in str(info.value)
    assert info.value.name == "NodeFaultProbe"
    assert info.value.job_id
    return info.value


def recovers(scheduler: jobflow.BrokerJobScheduler, timeout: float = 60) -> str:
    """The same scheduler schedules again once the node is back (it reconnects by itself)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return scheduler.schedule_now(Probe())
        except jobflow.BrokerUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_stopped_app(node: RabbitNode, scheduler: jobflow.BrokerJobScheduler) -> None:
    node.stop_app()
    try:
        fails_in_time(lambda: scheduler.schedule_now(Probe()))
        with jobflow.BrokerJobScheduler(settings=scheduler.settings, registry=REGISTRY) as fresh:
            fails_in_time(lambda: fresh.schedule_now(Probe()))
    finally:
        node.start_app()
    recovers(scheduler)


def test_frozen_node(node: RabbitNode, scheduler: jobflow.BrokerJobScheduler) -> None:
    node.freeze()
    try:
        fails_in_time(lambda: scheduler.schedule_now(Probe()))
        fails_in_time(lambda: scheduler.schedule(Probe(), delay=timedelta(seconds=30)))
    finally:
        node.thaw()
    recovers(scheduler)


def test_blocked_by_a_memory_alarm(node: RabbitNode, scheduler: jobflow.BrokerJobScheduler) -> None:
    node.block_publishers()
    try:
        error = fails_in_time(lambda: scheduler.schedule_now(Probe()))
        assert "alarm" in str(error)
    finally:
        node.unblock_publishers()
    recovers(scheduler)


def test_killed_node_loses_nothing_confirmed(node: RabbitNode, scheduler: jobflow.BrokerJobScheduler) -> None:
    confirmed = [scheduler.schedule_now(Probe(n=i)) for i in range(200)]
    assert len(set(confirmed)) == 200
    node.kill()
    try:
        fails_in_time(lambda: scheduler.schedule_now(Probe()))
    finally:
        node.restart()
    recovers(scheduler)
    # 2 from the fixture, 200 confirmed before the kill, 1 after: every confirmed job survived.
    assert message_count(node.url, scheduler.queue) >= 203


def test_schedule_many_names_every_unconfirmed_job(node: RabbitNode, scheduler: jobflow.BrokerJobScheduler) -> None:
    node.block_publishers()
    try:
        jobs = [Probe(n=i) for i in range(100)]
        start = time.monotonic()
        with pytest.raises(jobflow.BrokerUnavailableError) as info:
            scheduler.schedule_many(jobs)
        elapsed = time.monotonic() - start
        print(f"schedule_many of 100 failed after {elapsed:.2f} s: {info.value}")
        assert elapsed <= TIMEOUT + 1.0
        assert len(set(info.value.job_ids)) == 100
        assert "100 of 100" in str(info.value)
    finally:
        node.unblock_publishers()
    recovers(scheduler)


def test_retime_keeps_its_deadline_on_a_frozen_node(node: RabbitNode, scheduler: jobflow.BrokerJobScheduler) -> None:
    """The re-timer's own RPCs (``basic_get``, confirms) end at ``rpc_timeout_s`` when the node stops
    answering mid-walk; what it held goes back to the ladder, none lost."""
    prefix = scheduler.settings.queue_prefix
    jobs = 3000
    scheduler.schedule_many((Probe(n=i) for i in range(jobs)), delay=timedelta(hours=1))
    levels = [delay_queue(prefix, level) for level in range(DELAY_LEVELS)]
    freezer = threading.Timer(0.3, node.freeze)
    start = time.monotonic()
    freezer.start()
    try:
        with pytest.raises(Exception, match="no answer to") as info:
            retime_ladder(pika.URLParameters(node.url), prefix, rpc_timeout_s=1.0)
        elapsed = time.monotonic() - start
    finally:
        freezer.join()
        node.thaw()
    print(f"re-timing failed after {elapsed:.2f} s: {info.value!r}")
    assert elapsed <= 0.3 + 1.0 + 1.5, f"took {elapsed:.2f} s"
    waiting = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the held messages return once RabbitMQ sees the socket gone
        waiting = sum(message_count(node.url, queue) for queue in levels)
        if waiting >= jobs:
            break
        time.sleep(0.5)
    assert waiting >= jobs, f"{jobs - waiting} of {jobs} delayed jobs missing from the ladder"
