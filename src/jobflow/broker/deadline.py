"""A deadline for one blocking pika RPC.

pika's ``BlockingConnection`` RPCs (declare, ``basic_get``, ``basic_cancel``…) wait for their
answer with no timeout of their own: a broker that accepts the connection but stops answering (a
frozen or partitioned node) would hold the caller forever. Heartbeats notice only after minutes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pika.exceptions
from pika.adapters.blocking_connection import BlockingConnection


class RpcDeadline:
    """Tears the connection down if an RPC is not answered in time: the waiting call then raises
    ``AMQPConnectionError`` naming what was not answered. pika's I/O loop runs timers while a blocking
    call waits, so the timer fires inside that wait, in the caller's thread."""

    def __init__(self, connection: BlockingConnection, seconds: float) -> None:
        self.connection = connection
        self.seconds = seconds

    @contextlib.contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        impl: Any = self.connection._impl  # type: ignore[attr-defined]
        expired = []

        def expire() -> None:
            expired.append(True)
            impl._terminate_stream(pika.exceptions.AMQPConnectionError(f"no answer to {what} in {self.seconds} s"))

        timer = impl.ioloop.call_later(self.seconds, expire)
        try:
            yield
        finally:
            if not expired:
                impl.ioloop.remove_timeout(timer)
