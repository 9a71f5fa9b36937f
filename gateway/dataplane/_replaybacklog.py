"""A connection's send queue as a replay's backlog (``gateway.replay.ReplayBacklog``).

A replay (the drop-in's, the ``/v1/stream`` op's) writes into its connection's send queue and
waits while the connection holds its budget unsent. The wait uses the connection's backfill
hook (a source the writer pulls once the queue is below ``fill_target``): no new wake-up path
in the write path.
"""

from __future__ import annotations

import trio

from gateway.dataplane._connection import Connection


class _Drained:
    """A one-shot :class:`~gateway.dataplane._connection.BackfillSource`: the connection pulls
    it once its queue is below ``fill_target``, which is all it is for."""

    __slots__ = ("event",)
    waiting = False

    def __init__(self) -> None:
        self.event = trio.Event()

    def pull(self, target: int) -> bool:
        self.event.set()
        return True


class ConnectionBacklog:
    """A connection's unsent bytes as a replay's :class:`~gateway.replay.ReplayBacklog`; it
    waits for the queue to drain through the backfill hook (no new wake-up path)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def unsent(self) -> int:
        return self.conn.queued_bytes

    async def wait_below(self, limit: int) -> None:
        conn = self.conn
        while conn.queued_bytes >= limit and not conn.closing:
            drained = _Drained()
            conn.add_backfill(drained)
            await drained.event.wait()  # a closing connection cancels this task

    def budget(self, replay_bytes: int) -> int:
        """The replay's budget on this connection: ``[replay] queue_bytes``, at most half the
        connection's ``queue_bytes`` (never the 4008 rule), at least its ``fill_target``."""
        conn = self.conn
        return max(conn.fill_target, min(replay_bytes, conn.budget // 2))
