"""The failure path: retry a failed message, or dead-letter it with the reason; never lose it.

Replaces Dramatiq's ``Retries`` middleware, which (2.2.1) swallows a failed retry enqueue and lets
the worker ack the message, losing it (its open PR 545), and whose ``.XQ`` keeps the previous
attempt's traceback or none. Here, when a message fails:

- it is retried while its policy allows: the next attempt is enqueued with
  ``broker.enqueue(message, delay=ms)``, which returns once the broker confirmed it (the delay waits
  in the ladder); only then does the worker ack the original;
- otherwise its original body is published, confirmed, to ``<queue>.XQ`` with a
  :class:`~jobflow.dead_letter.DeadLetter` holding the *final* exception, then acked;
- either publish failing: the message is failed, so the worker rejects it without requeueing and
  RabbitMQ dead-letters it to ``.XQ`` by itself (``x-death``; no record, but nothing is lost).

Which policy: a jobflow job or command has its type's :class:`~jobflow.RetryPolicy`; an unknown
``(name, version)`` is retried for the registry's ``unknown_type_retry`` window (a rolling deploy
in either order loses nothing) before it is dead-lettered. A plain Dramatiq actor keeps Dramatiq's
options and semantics (``max_retries``, ``min_backoff``, ``max_backoff``, ``retry_when``,
``throws``, ``on_retry_exhausted``), with jobflow's guarantees underneath.

Brokers that cannot publish a dead letter (the in-memory one) get the record in the message's
options under ``x-jobflow-dead-letter`` and the message failed: it lands in their ``dead_letters``;
:func:`~jobflow.dead_letter.dead_letter_record` reads it back.
"""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, runtime_checkable

import dramatiq
import structlog
from dramatiq.common import compute_backoff, current_millis, q_name
from dramatiq.errors import Retry
from dramatiq.middleware import Middleware
from dramatiq.middleware.retries import DEFAULT_MAX_BACKOFF, DEFAULT_MIN_BACKOFF

from jobflow.dead_letter import (
    FIRST_FAILURE_OPTION,
    HEADER,
    REPLAY_OPTION,
    DeadLetter,
    Reason,
    error_type_name,
    final_reason,
    new_record,
)
from jobflow.errors import UnknownCommandError, UnknownJobError
from jobflow.log_config import get_logger
from jobflow.middleware.targets import Target, registry_of, target_of
from jobflow.retry import requested_delay
from jobflow.settings import Settings

logger: structlog.typing.FilteringBoundLogger = get_logger()

#: The longest wait between two attempts at a type no worker knows yet: short, so a job runs soon
#: after the workers that know it arrive.
UNKNOWN_TYPE_MAX_STEP = timedelta(minutes=1)


@runtime_checkable
class DeadLetterPublisher(Protocol):
    """A broker that publishes dead letters itself (RabbitMQ), confirmed, raising on failure."""

    def publish_dead_letter(
        self, source_queue: str, body: bytes, record: DeadLetter, headers: dict[str, Any] | None = None
    ) -> None: ...


@dataclass(frozen=True)
class _Verdict:
    """What to do with a failed message: retry it after ``delay_ms``, or dead-letter it for ``reason``."""

    delay_ms: int | None = None
    reason: Reason | None = None
    #: Options of the retry (plain actors keep Dramatiq's: retries, traceback, requeue_timestamp).
    options: dict[str, Any] | None = None
    #: Called once the dead letter is safe (a plain actor's ``on_retry_exhausted``).
    then: Callable[[], None] | None = None


def attempt_of(message: Any) -> int:
    """Which attempt this delivery is: 1 + Dramatiq's ``retries`` option."""
    retries = message.options.get("retries", 0)
    return 1 + retries if isinstance(retries, int) and not isinstance(retries, bool) and retries >= 0 else 1


def dead_letter(
    broker: dramatiq.Broker, message: Any, record: DeadLetter, log: structlog.typing.FilteringBoundLogger
) -> bool:
    """Publish ``message``'s dead letter; on failure, fail the message so the broker dead-letters it.

    True when jobflow's dead letter (with its record) is safe.
    """
    if not isinstance(broker, DeadLetterPublisher):
        message.options[HEADER] = record.to_header()
        message.fail()
    else:
        body = getattr(message, "body", None)
        try:
            broker.publish_dead_letter(
                record.source_queue,
                body if isinstance(body, bytes) else message.encode(),
                record,
                getattr(message, "headers", None),
            )
        except Exception as exc:
            log.error("dead_letter.publish_failed", error_type=type(exc).__name__, error=str(exc), outcome="rejected")
            message.fail()
            return False
    log.error(
        f"{record.kind or 'message'}.dead_lettered",
        reason=record.reason,
        error_type=record.error_type,
        error=record.error_message,
        attempts=record.attempts,
    )
    return True


class Failures(Middleware):
    """Retries failed messages per their policy, dead-letters the rest (see the module's docstring).

    ``rng`` draws the jitter (a seeded one makes backoffs reproducible). ``max_retries``,
    ``min_backoff``, ``max_backoff`` and ``retry_when`` are Dramatiq's defaults for plain actors.
    """

    def __init__(
        self,
        *,
        rng: random.Random | None = None,
        max_retries: int = 20,
        min_backoff: int | None = None,
        max_backoff: int | None = None,
        retry_when: Callable[[int, BaseException], bool] | None = None,
    ) -> None:
        self.rng = rng or random.Random()
        self.max_retries = max_retries
        self.min_backoff = min_backoff or DEFAULT_MIN_BACKOFF
        self.max_backoff = max_backoff or DEFAULT_MAX_BACKOFF
        self.retry_when = retry_when

    @property
    def actor_options(self) -> set[str]:
        # Dramatiq's Retries options, so that plain actors declared with them keep working.
        return {"max_retries", "min_backoff", "max_backoff", "retry_when", "throws", "on_retry_exhausted"}

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        if exception is None or message.failed:  # failed by another middleware: the broker rejects it
            return
        try:
            self._handle(broker, message, exception)
        except BaseException:
            # A bug here must not turn into an ack: reject, and RabbitMQ dead-letters the message.
            logger.exception("failures.unexpected_error", message_id=message.message_id)
            message.fail()

    def _handle(self, broker: dramatiq.Broker, message: Any, exc: BaseException) -> None:
        target = target_of(broker, message)
        attempt = attempt_of(message)
        # Only a retry carries its first failure; a replayed dead letter starts a new story.
        first = message.options.get(FIRST_FAILURE_OPTION) if attempt > 1 else None
        first_ms = first if isinstance(first, int) and not isinstance(first, bool) else current_millis()
        log = logger.bind(**_log_fields(target, message, attempt))
        if target.kind is not None:
            verdict = self._jobflow_verdict(broker, target, exc, attempt, first_ms)
        else:
            verdict = self._dramatiq_verdict(broker, message, exc)
        if verdict.reason is None:
            self._retry(broker, message, verdict, exc=exc, target=target, attempt=attempt, first_ms=first_ms, log=log)
            return
        record = new_record(
            reason=verdict.reason,
            source_queue=message.queue_name,
            error_type=error_type_name(exc),
            error_message=str(exc),
            traceback_text="".join(traceback.format_exception(exc)),
            attempts=attempt,
            first_failed_at=datetime.fromtimestamp(first_ms / 1000, UTC),
            message_id=message.message_id,
            kind=target.kind,
            name=target.name,
            version=target.version,
            previous_headers=getattr(message, "headers", None),
            replay=message.options.get(REPLAY_OPTION),
        )
        if dead_letter(broker, message, record, log) and verdict.then is not None:
            verdict.then()

    def _jobflow_verdict(
        self, broker: dramatiq.Broker, target: Target, exc: BaseException, attempt: int, first_ms: int
    ) -> _Verdict:
        policy = target.options.retry
        if isinstance(exc, UnknownJobError | UnknownCommandError):
            # A rolling deploy: the producers may know a type (or version) before this worker does.
            window = registry_of(broker).unknown_type_retry
            if window is None:
                settings = getattr(broker, "settings", None)
                window = timedelta(
                    seconds=(settings if isinstance(settings, Settings) else Settings()).unknown_type_retry
                )
            window_ms = window / timedelta(milliseconds=1)
            left_ms = window_ms - (current_millis() - first_ms)
            if left_ms <= 0:
                return _Verdict(reason="unknown_job" if isinstance(exc, UnknownJobError) else "unknown_command")
            step = min(policy.delay(attempt, rng=self.rng), UNKNOWN_TYPE_MAX_STEP) / timedelta(milliseconds=1)
            return _Verdict(delay_ms=max(1, int(min(step, left_ms))))
        verdict = policy.verdict(exc)
        if verdict == "transient" and attempt < policy.max_attempts:
            delay = requested_delay(exc)
            if delay is None:
                delay = policy.delay(attempt, rng=self.rng)
            return _Verdict(delay_ms=max(0, int(delay / timedelta(milliseconds=1))))
        return _Verdict(reason=final_reason(exc, verdict))

    def _dramatiq_verdict(self, broker: dramatiq.Broker, message: Any, exc: BaseException) -> _Verdict:
        """Dramatiq's Retries, option for option (2.2.1), with a dead letter instead of a bare reject."""
        actor = broker.get_actor(message.actor_name)
        throws = message.options.get("throws") or actor.options.get("throws")
        if throws and isinstance(exc, throws):
            return _Verdict(reason="permanent_error")
        retries = message.options.get("retries", 0)
        max_retries = message.options.get("max_retries", actor.options.get("max_retries", self.max_retries))
        retry_when = actor.options.get("retry_when", self.retry_when)
        if (retry_when is not None and not retry_when(retries, exc)) or (
            retry_when is None and max_retries is not None and retries >= max_retries
        ):
            target_name = message.options.get("on_retry_exhausted") or actor.options.get("on_retry_exhausted")
            then = None
            if target_name:

                def then() -> None:
                    broker.get_actor(target_name).send(
                        message.asdict(), {"retries": retries, "max_retries": max_retries}
                    )

            return _Verdict(reason="retries_exhausted", then=then)
        if isinstance(exc, Retry) and exc.delay is not None:
            delay = int(exc.delay)
        else:
            min_backoff = message.options.get("min_backoff", actor.options.get("min_backoff", self.min_backoff))
            max_backoff = message.options.get("max_backoff", actor.options.get("max_backoff", self.max_backoff))
            _, delay = compute_backoff(retries, factor=min_backoff, max_backoff=min(max_backoff, DEFAULT_MAX_BACKOFF))
        options = {
            "retries": retries + 1,
            "traceback": traceback.format_exc(limit=30),
            "requeue_timestamp": int(time.time() * 1000),
        }
        return _Verdict(delay_ms=delay, options=options)

    def _retry(
        self,
        broker: dramatiq.Broker,
        message: Any,
        verdict: _Verdict,
        *,
        exc: BaseException,
        target: Target,
        attempt: int,
        first_ms: int,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        delay_ms = verdict.delay_ms or 0
        options = verdict.options or {"retries": attempt}
        retry = message.copy(queue_name=q_name(message.queue_name), options={**options, FIRST_FAILURE_OPTION: first_ms})
        try:
            broker.enqueue(retry, delay=delay_ms or None)
        except Exception as retry_exc:
            log.error(
                "retry.publish_failed",
                error_type=type(retry_exc).__name__,
                error=str(retry_exc),
                outcome="rejected",
            )
            message.fail()
            return
        unknown = isinstance(exc, UnknownJobError | UnknownCommandError)
        log.warning(
            f"{target.kind or 'message'}.{'unknown_type_retry' if unknown else 'retry_scheduled'}",
            delay_ms=delay_ms,
            next_attempt=attempt + 1,
            error_type=type(exc).__name__,
        )


def _log_fields(target: Target, message: Any, attempt: int) -> dict[str, Any]:
    if target.kind is None:
        return {
            "message_id": message.message_id,
            "actor": message.actor_name,
            "attempt": attempt,
            "queue": message.queue_name,
        }
    return {
        f"{target.kind}_id": message.message_id,
        f"{target.kind}_name": target.name,
        f"{target.kind}_version": target.version,
        "attempt": attempt,
        "queue": message.queue_name,
    }
