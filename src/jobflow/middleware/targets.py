"""Which job or command type a Dramatiq message is for, and the options that type sets.

Every job travels through one actor, so Dramatiq's per-actor options cannot hold per-type retry
policies or time limits: they are looked up from the envelope's ``(name, version)`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dramatiq

from jobflow.broker.names import KINDS, Kind, routed_queue
from jobflow.envelope import envelope_identity
from jobflow.registry import JobRegistry, default_registry
from jobflow.retry import TypeOptions
from jobflow.settings import Settings
from jobflow.versioned import check_queue_name


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


def declare_routed_queues(broker: dramatiq.Broker) -> list[str]:
    """Declare the queue of every job and command type registered for ``broker``'s actors, so that a
    worker consumes them all (Dramatiq's ``--queues`` picks some); returns them."""
    actors = getattr(broker, "_jobflow_actors", None)
    if actors is None:
        return []
    registry: JobRegistry = actors.runner.registry
    types: list[Any] = [*registry.jobs(), *registry.commands()]
    names = {cls.__jobflow_queue__ for cls in types}
    settings = getattr(broker, "settings", None)
    if isinstance(settings, Settings):
        names.update(check_queue_name(name) for name in settings.extra_queue_names())
    queues = sorted(routed_queue(actors.queue_prefix, name) for name in names)
    for queue in queues:
        if queue not in broker.get_declared_queues():
            broker.declare_queue(queue)
    return queues


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
