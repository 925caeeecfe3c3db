"""The screen that keeps poison away from Dramatiq's worker, and the dead-letter records it yields."""

from __future__ import annotations

import json
import pickle
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import dramatiq
import pytest
from dramatiq import Message

from jobflow.broker.names import DISPATCH_COMMAND_ACTOR, RUN_JOB_ACTOR
from jobflow.dead_letter import HEADER, DeadLetter, clip, error_type_name, new_record
from jobflow.poison import Poison, screen

ACTORS = {RUN_JOB_ACTOR, DISPATCH_COMMAND_ACTOR}
QUEUE = "p.jobs"


def message(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "queue_name": QUEUE,
        "actor_name": RUN_JOB_ACTOR,
        "args": [{"name": "Job", "version": 1, "data": {}}],
        "kwargs": {},
        "options": {},
        "message_id": "m-1",
        "message_timestamp": 1,
    }
    fields.update(overrides)
    return fields


def run_screen(body: bytes | dict[str, Any], max_bytes: int = 10_000) -> Message[Any] | Poison:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return screen(raw, queue_name=QUEUE, actors=ACTORS, max_bytes=max_bytes)


class TestScreen:
    def test_valid_message_passes(self) -> None:
        """A well-formed message for a declared actor becomes a Dramatiq message, fields intact."""
        result = run_screen(message(options={"retries": 2}))
        assert isinstance(result, Message)
        assert (result.actor_name, result.message_id, result.options) == (RUN_JOB_ACTOR, "m-1", {"retries": 2})
        assert result.args == ({"name": "Job", "version": 1, "data": {}},)

    def test_queue_name_is_the_delivering_queue(self) -> None:
        """A message claiming another queue is bound to the queue it came from, so a consumer owns it."""
        result = run_screen(message(queue_name="elsewhere"))
        assert isinstance(result, Message)
        assert result.queue_name == QUEUE

    def test_missing_id_and_timestamp_are_filled(self) -> None:
        """Dramatiq's optional fields may be absent, as its own decoder allows."""
        fields = message()
        del fields["message_id"], fields["message_timestamp"]
        result = run_screen(fields)
        assert isinstance(result, Message)
        assert result.message_id
        assert result.message_timestamp > 0

    @pytest.mark.parametrize(
        ("body", "reason", "error_type"),
        [
            (b"\xff\xfe\x00garbage", "undecodable", "UnicodeDecodeError"),
            (b"{not json", "undecodable", "JSONDecodeError"),
            (b"", "undecodable", "JSONDecodeError"),
            (b"[" * 100_000 + b"]" * 100_000, "too_large", "PayloadTooLarge"),
            (b"42", "not_a_message", "ValidationError"),
            (b'{"hello": "world"}', "not_a_message", "ValidationError"),
        ],
    )
    def test_raw_poison(self, body: bytes, reason: str, error_type: str) -> None:
        """Bodies that are not JSON, too large, or not a message are poison with their reason."""
        result = run_screen(body, max_bytes=100_000)
        assert isinstance(result, Poison)
        assert (result.reason, result.error_type) == (reason, error_type)

    def test_deeply_nested_json_is_undecodable(self) -> None:
        """JSON nested past the parser's recursion limit is undecodable, not a crash."""
        result = run_screen(b"[" * 200_000 + b"]" * 200_000, max_bytes=1_000_000)
        assert isinstance(result, Poison)
        assert result.reason == "undecodable"

    @pytest.mark.parametrize(
        "overrides",
        [
            {"actor_name": ["jobflow.run_job"]},
            {"queue_name": 7},
            {"args": "abc"},
            {"kwargs": []},
            {"options": "x"},
            {"message_id": 12},
            {"message_timestamp": "yesterday"},
            {"unexpected": 1},
        ],
    )
    def test_wrong_types_are_not_a_message(self, overrides: dict[str, Any]) -> None:
        """Fields of the wrong type, or unknown fields, make the message not a Dramatiq message."""
        result = run_screen(message(**overrides))
        assert isinstance(result, Poison)
        assert result.reason == "not_a_message"

    @pytest.mark.parametrize(
        "options",
        [
            {"retries": -1},
            {"retries": "3"},
            {"retries": True},
            {"due_ms": 1.5},
            {"eta": "soon"},
            {"eta": float("inf")},
            {"throws": "ValueError"},
            {"throws": ["x"]},
        ],
    )
    def test_options_the_worker_reads_are_checked(self, options: dict[str, Any]) -> None:
        """Options jobflow or Dramatiq read must have usable types, or the message is refused."""
        result = run_screen(json.dumps(message(options=options), allow_nan=True).encode())
        assert isinstance(result, Poison)
        assert (result.reason, result.error_type, result.message_id) == ("not_a_message", "InvalidOption", "m-1")

    def test_unknown_actor(self) -> None:
        """A message for an actor this worker does not declare is not a message for it."""
        result = run_screen(message(actor_name="someone.else"))
        assert isinstance(result, Poison)
        assert (result.reason, result.error_type) == ("not_a_message", "ActorNotFound")

    @pytest.mark.parametrize(
        "overrides",
        [{"args": []}, {"args": [{}, {}]}, {"kwargs": {"envelope": {}}}],
    )
    def test_jobflow_actors_take_one_envelope(self, overrides: dict[str, Any]) -> None:
        """A jobflow actor called with other arguments than one envelope is an invalid envelope."""
        result = run_screen(message(**overrides))
        assert isinstance(result, Poison)
        assert (result.reason, result.kind) == ("invalid_envelope", "job")

    def test_size_limit(self) -> None:
        """A body over the limit is refused unread; one at the limit passes."""
        body = json.dumps(message(args=[{"name": "Job", "version": 1, "data": {"x": "y" * 500}}])).encode()
        assert isinstance(run_screen(body, max_bytes=len(body)), Message)
        result = run_screen(body, max_bytes=len(body) - 1)
        assert isinstance(result, Poison)
        assert result.reason == "too_large"


class TestRecord:
    def test_clip_keeps_head_and_tail(self) -> None:
        """Clipped text keeps its beginning and its end and says how much was cut."""
        text = "HEAD" + "x" * 10_000 + "TAIL"
        clipped = clip(text, 1_000)
        assert len(clipped) <= 1_000
        assert clipped.startswith("HEAD")
        assert clipped.endswith("TAIL")
        assert "characters omitted" in clipped
        assert clip("short", 1_000) == "short"

    def test_error_type_names(self) -> None:
        """Built-in exceptions are named plainly, others with their module."""
        from jobflow import PermanentError

        assert error_type_name(ValueError()) == "ValueError"
        assert error_type_name(PermanentError("x")) == "jobflow.errors.PermanentError"

    def test_record_fits_one_header_frame(self) -> None:
        """However long the traceback and message, the record stays far below RabbitMQ's 128 KiB frame."""
        record = new_record(
            reason="retries_exhausted",
            source_queue="q.jobs",
            error_type="E",
            error_message="\x01" * 100_000,
            traceback_text="\x02" * 1_000_000,
        )
        assert len(record.to_header().encode()) < 96 * 1024
        assert record.traceback is not None

    def test_record_fields(self) -> None:
        """A record names the canonical source queue, this host and process, and times in UTC."""
        import os

        first = datetime(2024, 1, 1, tzinfo=UTC)
        record = new_record(
            reason="permanent_error",
            source_queue="q.jobs.DQ",
            error_type="E",
            error_message="m",
            attempts=3,
            first_failed_at=first,
            message_id="id",
            kind="job",
            name="N",
            version=2,
        )
        assert (record.source_queue, record.pid, record.attempts, record.first_failed_at) == (
            "q.jobs",
            os.getpid(),
            3,
            first,
        )
        assert record.last_failed_at > first
        assert (record.kind, record.name, record.version, record.message_id) == ("job", "N", 2, "id")

    def test_replay_count_survives_another_failure(self) -> None:
        """A replayed dead letter that fails again keeps its replay count and time."""
        replayed_at = datetime(2024, 5, 1, tzinfo=UTC)
        previous = new_record(reason="permanent_error", source_queue="q", error_type="E", error_message="m")
        previous = previous.model_copy(update={"replay_count": 2, "last_replayed_at": replayed_at})
        record = new_record(
            reason="permanent_error",
            source_queue="q",
            error_type="E",
            error_message="again",
            previous_headers={HEADER: previous.to_header().encode()},
        )
        assert (record.replay_count, record.last_replayed_at) == (2, replayed_at)
        assert DeadLetter.from_headers({HEADER: record.to_header()}) == record

    def test_unreadable_previous_record_is_ignored(self) -> None:
        """A garbled header from an earlier life does not stop a new record."""
        record = new_record(
            reason="undecodable", source_queue="q", error_type="E", error_message="m", previous_headers={HEADER: "{bad"}
        )
        assert record.replay_count == 0


class ZlibJSON(dramatiq.Encoder):
    """An application's own encoder: compressed JSON."""

    def encode(self, data: dict[str, Any]) -> bytes:
        return zlib.compress(json.dumps(data).encode())

    def decode(self, data: bytes) -> dict[str, Any]:
        return dict(json.loads(zlib.decompress(data)))


@pytest.fixture
def encoder() -> Iterator[Callable[[dramatiq.Encoder], None]]:
    original = dramatiq.get_encoder()
    try:
        yield dramatiq.set_encoder
    finally:
        dramatiq.set_encoder(original)


class TestEncoders:
    def test_the_applications_encoder_decodes(self, encoder: Callable[[dramatiq.Encoder], None]) -> None:
        """A Dramatiq app with its own encoder keeps it on jobflow's broker: bodies are read with it."""
        encoder(ZlibJSON())
        result = run_screen(ZlibJSON().encode(message(options={"retries": 1})))
        assert isinstance(result, Message)
        assert result.options == {"retries": 1}
        plain = run_screen(message())
        assert isinstance(plain, Poison)
        assert plain.reason == "undecodable"
        assert "ZlibJSON" in plain.error_message

    def test_pickle_is_never_unpickled(
        self, encoder: Callable[[dramatiq.Encoder], None], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def refuse(*args: object, **kwargs: object) -> object:
            raise AssertionError("pickle.loads was called")

        monkeypatch.setattr(pickle, "loads", refuse)
        encoder(dramatiq.PickleEncoder())
        result = run_screen(pickle.dumps(message()))
        assert isinstance(result, Poison)
        assert (result.reason, result.error_type) == ("undecodable", "PickleRefused")
