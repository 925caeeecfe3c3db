"""Which job or command type a Dramatiq message is for, and the options that type sets.

Every job travels through one actor, so Dramatiq's per-actor options cannot hold per-type retry
policies or time limits: they are looked up from the envelope's ``(name, version)`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dramatiq

from jobflow.broker.names import KINDS, Kind
from jobflow.envelope import envelope_identity
from jobflow.registry import JobRegistry, default_registry
from jobflow.retry import TypeOptions


@dataclass(frozen=True)
class Target:
    """The type a message is for, as far as its body tells; None where it does not."""

    kind: Kind | None
    name: str | None
    version: int | None
    options: TypeOptions


def registry_of(broker: dramatiq.Broker) -> JobRegistry:
    """The registry of the actors declared on ``broker`` (``declare_actors`` records them there)."""
    actors = getattr(broker, "_jobflow_actors", None)
    return actors.runner.registry if actors is not None else default_registry


def target_of(broker: dramatiq.Broker, message: Any) -> Target:
    """The target of a message (a Dramatiq message or a worker's proxy of one)."""
    registry = registry_of(broker)
    kind = KINDS.get(message.actor_name)
    name, version = envelope_identity(message.args)
    if kind is not None and name is not None and version is not None:
        options = registry.options_for(kind, name, version)
    else:
        options = TypeOptions(registry.retry_policy, registry.time_limit)
    return Target(kind, name, version, options)
