"""Plain Dramatiq actors on jobflow's broker keep Dramatiq's options and semantics (no RabbitMQ needed).

The in-memory broker runs the same middleware stack as the RabbitMQ one; a message Dramatiq would
send to its dead-letter queue lands in ``broker.dead_letters`` with jobflow's record.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest

import jobflow
from jobflow import Settings
from jobflow.dead_letter import dead_letter_record

#: ``dramatiq.actor`` with actor options as keywords: its overloads list none of them.
declare: Any = dramatiq.actor


@pytest.fixture
def broker(memory_settings: Settings) -> Iterator[Any]:
    built = jobflow.create_broker(memory_settings)
    worker = dramatiq.Worker(built, worker_timeout=20, worker_threads=2)
    worker.start()
    try:
        yield built
    finally:
        worker.stop()
        built.close()


def settle(broker: Any, dead: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(broker.dead_letters) < dead and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(broker.dead_letters) >= dead, f"{len(broker.dead_letters)} dead letters, expected {dead}"
    time.sleep(0.1)  # nothing more may follow


def always_failing(broker: Any, runs: list[int], **options: Any) -> Any:
    def fails() -> None:
        runs.append(1)
        raise ValueError("boom")

    return declare(fails, broker=broker, actor_name=f"fails_{id(runs)}", **options)


def test_max_retries_option_is_accepted_and_honoured(broker: Any) -> None:
    """`max_retries=2`: three runs, then a dead letter saying the retries ran out."""
    runs: list[int] = []
    always_failing(broker, runs, max_retries=2, min_backoff=5, max_backoff=10).send()
    settle(broker, 1)
    assert len(runs) == 3
    record = dead_letter_record(broker.dead_letters[0])
    assert record is not None
    assert (record.reason, record.error_type) == ("retries_exhausted", "ValueError")


def test_send_with_options_max_retries_zero_runs_once(broker: Any) -> None:
    runs: list[int] = []
    always_failing(broker, runs, min_backoff=5).send_with_options(max_retries=0)
    settle(broker, 1)
    assert len(runs) == 1


def test_throws_is_not_retried(broker: Any) -> None:
    """An exception the actor `throws` is expected: no retry (Dramatiq fails the message)."""
    runs: list[int] = []
    always_failing(broker, runs, throws=(ValueError,), min_backoff=5).send()
    settle(broker, 1)
    assert len(runs) == 1
    record = dead_letter_record(broker.dead_letters[0])
    assert record is not None
    assert record.reason == "permanent_error"


def test_retry_when_decides(broker: Any) -> None:
    runs: list[int] = []
    always_failing(broker, runs, retry_when=lambda retries, exc: retries < 1, min_backoff=5).send()
    settle(broker, 1)
    assert len(runs) == 2


def test_on_retry_exhausted_actor_is_sent_the_message(broker: Any) -> None:
    seen: list[dict[str, Any]] = []

    def exhausted(message: dict[str, Any], retry_info: dict[str, Any]) -> None:
        seen.append(retry_info)

    declare(exhausted, broker=broker, actor_name="exhausted")
    runs: list[int] = []
    always_failing(broker, runs, max_retries=1, min_backoff=5, on_retry_exhausted="exhausted").send()
    settle(broker, 1)
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == [{"retries": 1, "max_retries": 1}]


def test_time_limit_option_stops_the_actor(broker: Any) -> None:
    """`time_limit=200` (ms): the actor is interrupted, not run to its end."""
    finished: list[bool] = []

    def slow() -> None:
        for _ in range(100):
            time.sleep(0.05)
        finished.append(True)

    declare(slow, broker=broker, actor_name="slow", time_limit=200, max_retries=0).send()
    settle(broker, 1)
    assert finished == []
    record = dead_letter_record(broker.dead_letters[0])
    assert record is not None
    assert record.error_type.endswith("TimeLimitExceeded")
