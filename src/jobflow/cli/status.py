"""``jobflow status``: counts per queue from passive declares alone (no management plugin).

AMQP's passive ``queue.declare`` reports the *ready* messages and the consumers of a queue, not
the messages delivered and not yet acknowledged: ``unacked`` is therefore reported as unknown
(``null``) rather than guessed; ``rabbitmqctl list_queues name messages_unacknowledged`` or the
management plugin has it. Scheduled messages are those waiting in the broker: jobflow's delay
topology (shared by all queues, so a total) and, per queue, any ready in Dramatiq's ``<queue>.DQ``
(which only producers that bypass jobflow's broker still use; what workers took from it waits
unacknowledged in their memory, where AMQP cannot count it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dramatiq.common import dq_name

from jobflow.broker.names import delay_queues, unroutable_queue
from jobflow.cli.amqp import Connection, QueueCounter
from jobflow.cli.selection import work_queues
from jobflow.dead_letter import dead_letter_queue

UNACKED_NOTE = (
    "AMQP reports ready messages and consumers only; for unacked messages use"
    " `rabbitmqctl list_queues name messages_unacknowledged` or the management plugin"
)


@dataclass(frozen=True)
class QueueStatus:
    queue: str
    exists: bool
    ready: int
    consumers: int
    unacked: int | None
    scheduled: int
    dead_lettered: int


@dataclass(frozen=True)
class Status:
    queues: list[QueueStatus]
    #: Messages waiting in the delay topology's levels, bound for any queue.
    delay_topology: int
    delay_levels_found: int
    #: Delayed messages whose destination queue no longer exists.
    unroutable: int

    def totals(self) -> dict[str, int]:
        return {
            "ready": sum(q.ready for q in self.queues),
            "consumers": sum(q.consumers for q in self.queues),
            "scheduled": sum(q.scheduled for q in self.queues) + self.delay_topology,
            "dead_lettered": sum(q.dead_lettered for q in self.queues),
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "queues": [asdict(q) for q in self.queues],
            "delay_topology": {
                "scheduled": self.delay_topology,
                "levels_found": self.delay_levels_found,
                "unroutable": self.unroutable,
            },
            "totals": self.totals(),
            "notes": {"unacked": UNACKED_NOTE},
        }


def collect_status(conn: Connection, prefix: str, shown: list[str] | None = None) -> Status:
    """One passive declare per queue (``shown``, else :func:`work_queues`); one that does not exist counts zero."""
    counter = QueueCounter(conn)
    try:
        queues = []
        for queue in shown if shown is not None else work_queues(prefix):
            work = counter.count(queue)
            queues.append(
                QueueStatus(
                    queue=queue,
                    exists=work.exists,
                    ready=work.ready,
                    consumers=work.consumers,
                    unacked=None,
                    scheduled=counter.count(dq_name(queue)).ready,
                    dead_lettered=counter.count(dead_letter_queue(queue)).ready,
                )
            )
        levels = [counter.count(name) for name in delay_queues(prefix)]
        return Status(
            queues=queues,
            delay_topology=sum(level.ready for level in levels),
            delay_levels_found=sum(level.exists for level in levels),
            unroutable=counter.count(unroutable_queue(prefix)).ready,
        )
    finally:
        counter.close()
