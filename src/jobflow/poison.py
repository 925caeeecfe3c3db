"""Screening raw deliveries: what can safely reach Dramatiq's worker, and why the rest cannot.

Dramatiq's consumer nacks a body that is not JSON (RabbitMQ then dead-letters it, but without a
reason), and lets through JSON whose fields have the wrong types: an ``actor_name`` that is a list
crashes its consumer thread (so the message is redelivered forever and blocks the queue), a
``queue_name`` no consumer owns kills the worker thread that finishes it. The screen turns each
of these into a :class:`Poison` with a reason, before Dramatiq sees the message.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import dramatiq
from dramatiq.common import current_millis
from dramatiq.message import Message, generate_unique_id
from pydantic import BaseModel, ConfigDict, ValidationError

from jobflow.broker.names import KINDS, Kind
from jobflow.dead_letter import Reason
from jobflow.envelope import envelope_identity

#: What the consumer tolerates over the size limit: options middleware stamps on the way (due time,
#: retry count) after the scheduler measured the message.
CONSUMER_HEADROOM_BYTES = 4096

# Options jobflow or Dramatiq's worker read, and the types they must have.
_INT_OPTIONS = ("retries", "due_ms", "jobflow_first_failure_ms")


@dataclass(frozen=True)
class Poison:
    """Why a delivery cannot be processed, and what it says it is, where that could be read."""

    reason: Reason
    error_type: str
    error_message: str
    message_id: str | None = None
    kind: Kind | None = None
    name: str | None = None
    version: int | None = None


class _WireMessage(BaseModel):
    """Dramatiq's JSON wire format, with the types its worker relies on."""

    model_config = ConfigDict(strict=True, extra="forbid")

    queue_name: str
    actor_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any]
    message_id: str | None = None
    message_timestamp: int | None = None


def screen(body: bytes, *, queue_name: str, actors: Any, max_bytes: int) -> Message[Any] | Poison:
    """The message in ``body``, bound to ``queue_name``; or why it is poison.

    ``actors`` holds the names of the actors this worker declared.
    """
    if len(body) > max_bytes:
        return Poison("too_large", "PayloadTooLarge", f"the body is {len(body)} bytes, over the limit of {max_bytes}")
    wire = _parse(body)
    if isinstance(wire, Poison):
        return wire
    poison = _misfit(wire, actors)
    if poison is not None:
        return poison
    # The worker finds a message's consumer by its queue_name: it must be the queue it came from.
    return Message(
        queue_name=queue_name,
        actor_name=wire.actor_name,
        args=tuple(wire.args),
        kwargs=wire.kwargs,
        options=wire.options,
        message_id=wire.message_id if wire.message_id is not None else generate_unique_id(),
        message_timestamp=wire.message_timestamp if wire.message_timestamp is not None else current_millis(),
    )


def _parse(body: bytes) -> _WireMessage | Poison:
    encoder = dramatiq.get_encoder()
    if isinstance(encoder, dramatiq.PickleEncoder):
        # Unpickling runs code chosen by whoever wrote the body: jobflow never does it.
        return Poison("undecodable", "PickleRefused", "jobflow does not unpickle messages (dramatiq.PickleEncoder)")
    if not isinstance(encoder, dramatiq.JSONEncoder):
        # An application's own encoder (compression, say): decode as its producers encoded.
        try:
            fields = encoder.decode(body)
        except Exception as exc:  # an encoder may raise anything on bytes it did not write
            return Poison("undecodable", type(exc).__name__, f"{type(encoder).__name__} cannot decode the body: {exc}")
    else:
        try:
            fields = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            return Poison("undecodable", type(exc).__name__, f"the body is not UTF-8 JSON: {exc}")
    try:
        return _WireMessage.model_validate(fields)
    except ValidationError as exc:
        return Poison("not_a_message", "ValidationError", f"not a Dramatiq message: {_summary(exc)}")
    except RecursionError as exc:
        return Poison("not_a_message", "RecursionError", f"not a Dramatiq message: {exc}")


def _misfit(wire: _WireMessage, actors: Any) -> Poison | None:
    """Why a well-formed message still cannot run here, if it cannot."""
    problem = _option_problem(wire.options)
    if problem is not None:
        return Poison("not_a_message", "InvalidOption", problem, wire.message_id)
    if wire.actor_name not in actors:
        message = f"no actor {wire.actor_name!r} is declared on this worker"
        return Poison("not_a_message", "ActorNotFound", message, wire.message_id)
    kind = KINDS.get(wire.actor_name)
    if kind is not None and (len(wire.args) != 1 or wire.kwargs):
        return Poison(
            "invalid_envelope",
            "InvalidPayloadError",
            f"{wire.actor_name} takes one argument, the envelope; got {len(wire.args)} and {len(wire.kwargs)} keywords",
            wire.message_id,
            kind,
            *envelope_identity(wire.args[:1]),
        )
    return None


def _option_problem(options: dict[str, Any]) -> str | None:
    if "throws" in options:
        # Dramatiq's worker evaluates isinstance(exc, options["throws"]): JSON cannot carry an
        # exception class, and anything else kills the worker thread and loses the message.
        return f"option 'throws' cannot come from the wire, got {options['throws']!r}"
    for key in _INT_OPTIONS:
        value = options.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            return f"option {key!r} must be an int >= 0, got {value!r}"
    eta = options.get("eta")
    if eta is not None and (isinstance(eta, bool) or not isinstance(eta, int | float) or not math.isfinite(eta)):
        return f"option 'eta' must be a finite number, got {eta!r}"
    return None


def _summary(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    shown = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in errors[:5])
    return shown + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
