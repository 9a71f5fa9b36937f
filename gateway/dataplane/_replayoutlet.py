"""How a replay's messages reach its connection: its own byte budget, never the live one's.

A replay on ``/v1/stream`` shares its subscriber's socket with the live subscriptions, but not
their budget. Its messages (``replay_frame``, ``replay_loop``, ``replay_end``) wait in the
replay's own :class:`ReplayOutlet` (at most the replay's budget, ``[replay] queue_bytes``:
:func:`gateway.replay.run_replay` waits while it is full); the connection takes them
the way it takes a backfill (it is a ``BackfillSource``): only while its send queue is below
``Connection.fill_target``, so replays hold at most that much of the queue and live frames
always have the rest of ``queue_bytes``. A client that does not read its replay fills the
outlet, and the replay then waits: it reads nothing more from its source (backpressure), and
is ended after ``[replay] stall_timeout`` without progress (slow consumer). The live frames of the
same connection are untouched by all this: they never wait behind a replay, and a replay never
makes the connection too slow (4008) by itself.

Synchronous except :meth:`ReplayOutlet.wait_below`; no I/O of its own (the connection writes).
"""

from __future__ import annotations

import collections

import trio

from gateway.dataplane._connection import Connection


class ReplayOutlet:
    """One replay's pending messages (JSON payloads), pulled by its connection as it drains.

    Register it with :meth:`open`, hand it messages with :meth:`push`, finish with :meth:`end`
    (the last message goes after every pending one) or :meth:`discard` (pending messages are
    dropped, the last one goes at once). It is the replay's ``ReplayBacklog``
    (:func:`gateway.replay.run_replay`): :meth:`unsent` is what waits here, and the replay
    pushes no more while that is at its budget (:meth:`wait_below`).
    """

    __slots__ = (
        "_conn",
        "_ended",
        "_pending",
        "_space",
        "last_seq",
        "pending_bytes",
        "sent",
        "waiting",
    )

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        #: (payload, seq): seq is the replayed frame's, 0 for the other messages.
        self._pending: collections.deque[tuple[bytes, int]] = collections.deque()
        #: Bytes of the messages not yet handed to the connection.
        self.pending_bytes = 0
        #: Messages handed to the connection.
        self.sent = 0
        #: The seq of the last frame handed to the connection (0: none yet).
        self.last_seq = 0
        #: BackfillSource: nothing to pull until the next push (the writer sleeps meanwhile).
        self.waiting = True
        self._space = trio.Event()
        self._ended = False

    def __repr__(self) -> str:
        return f"<ReplayOutlet {len(self._pending)} pending, {self.pending_bytes} B>"

    def open(self) -> None:
        """Start being pulled by the connection."""
        self._conn.add_backfill(self)

    # -- ReplayBacklog ---------------------------------------------------------------------

    def unsent(self) -> int:
        return self.pending_bytes

    async def wait_below(self, limit: int) -> None:
        conn = self._conn
        while self.pending_bytes >= limit and not self._ended and not conn.closing:
            # pull() sets the event whenever the connection took messages.
            self._space = trio.Event()
            await self._space.wait()

    # -- messages --------------------------------------------------------------------------

    def push(self, payload: bytes, seq: int = 0) -> None:
        """Queue one message (*seq*: of the frame it carries); what the connection can take
        now goes at once."""
        if self._ended:
            return
        self._pending.append((payload, seq))
        self.pending_bytes += len(payload)
        self.pull(self._conn.fill_target)
        if self._pending:
            self.waiting = False
            self._conn.backfill_ready()

    def pull(self, target: int) -> bool:
        """BackfillSource: hand pending messages to the connection while its queue is below
        *target*; True (forget me) once ended and empty."""
        conn = self._conn
        pending = self._pending
        freed = False
        while pending and conn.queued_bytes < target and not conn.closing:
            payload, seq = pending.popleft()
            self.pending_bytes -= len(payload)
            conn.send_control(payload)
            self.sent += 1
            if seq:
                self.last_seq = seq
            freed = True
        if conn.closing and pending:
            pending.clear()
            self.pending_bytes = 0
            freed = True
        self.waiting = not pending
        if freed:
            self._space.set()
        return self._ended and not pending

    def end(self, payload: bytes) -> None:
        """The last message, after every pending one; then the outlet leaves the connection."""
        if self._ended:
            return
        self._pending.append((payload, 0))
        self.pending_bytes += len(payload)
        self._ended = True
        self._space.set()
        if self.pull(self._conn.fill_target):
            self._conn.remove_backfill(self)
        else:
            self._conn.backfill_ready()

    def discard(self, payload: bytes | None = None) -> None:
        """Drop every pending message, send *payload* (if any) at once, leave the connection."""
        self._pending.clear()
        self.pending_bytes = 0
        self._ended = True
        self.waiting = True
        self._space.set()
        self._conn.remove_backfill(self)
        if payload is not None:
            self._conn.send_control(payload)
            self.sent += 1
