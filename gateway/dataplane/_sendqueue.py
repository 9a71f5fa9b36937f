"""One subscriber's send queue: byte budget, slow-consumer policy, batches for the writer.

Synchronous and free of I/O: :class:`SendQueue` never touches a socket, never awaits and never
closes anything. The connection (:mod:`gateway.dataplane._connection`) writes, and asks the
queue what to write and what to keep. Example::

    q = SendQueue(budget=64 * 1024, policy="drop-oldest")
    if q.push(SendItem(frame_bytes, seq, published, subscription)):
        ...  # over budget: close the connection with 4008 (q.discard(), then q.push_close())
    # The writer task, after a wake-up:
    buf, frames, published = q.take_batch()  # everything queued, gap messages included
    while q.inflight:
        start = q.batch_end - q.inflight
        q.wrote(os.write(fd, buf[start : q.batch_end]))
    q.batch_done()

Rules:

- Budget: bytes queued plus the writer's unwritten in-flight bytes may not pass ``budget``.
  Every message counts: data frames, backfill frames (the connection streams a backfill from
  the topic's history as it drains, never more than part of the budget at a time) and control
  messages (errors, pongs, status, gap messages).
- Over budget, ``disconnect``: :meth:`SendQueue.push` returns True and changes nothing else;
  the caller closes, usually with :meth:`SendQueue.discard`.
- Over budget, ``drop-oldest``: the oldest droppable items (data frames with a sink, not tails)
  are dropped until under budget, each frame's sink hearing ``dropped(seq)``; the sink's
  ``take_gap(seq)`` message is written before its next frame that goes out. If dropping every
  droppable item is not enough (the rest is control messages, tails, frames without a sink),
  :meth:`SendQueue.push` returns True as under ``disconnect``: a peer that does not read its
  error replies or pongs is as slow as one that does not read its frames.
- Control messages (``seq`` None) and tails are never dropped. A *tail* is the unsent rest of
  a frame the connection started writing itself: it must be finished whatever happens, or the
  stream would be corrupt, so a discard keeps it, first.
- Closing: :meth:`SendQueue.discard` also trims the in-flight batch after the frame being
  written, so a close frame can follow it at once; :meth:`SendQueue.push_close` queues that
  close frame whatever the budget.
"""

from __future__ import annotations

import collections
from typing import Protocol

from gateway.config import SlowPolicy
from gateway.wire import encode_frame


class DeliverySink(Protocol):
    """A subscription whose frames may be dropped (drop-oldest): it hears about each drop."""

    def dropped(self, seq: int) -> None: ...

    def take_gap(self, seq: int) -> bytes | None:
        """The gap message to write before this subscription's frame *seq*, if one is due."""
        ...


class SendItem:
    """One queued WebSocket message, already encoded.

    ``seq`` is the data frame's number, or None for a control message. ``published``
    (``perf_counter``) is the publish time to sample latency with, 0.0 for none. ``sink`` hears
    about a drop; None means the item is never dropped. ``tail``: the unsent rest of a message
    partly written already (never dropped, never preceded by a gap message).
    """

    __slots__ = ("data", "published", "seq", "sink", "tail")

    def __init__(
        self,
        data: bytes,
        seq: int | None,
        published: float = 0.0,
        sink: DeliverySink | None = None,
        tail: bool = False,
    ) -> None:
        self.data = data
        self.seq = seq
        self.published = published
        self.sink = sink
        self.tail = tail

    def __repr__(self) -> str:
        kind = "control" if self.seq is None else f"seq={self.seq}"
        return f"<SendItem {kind} {len(self.data)} B{' tail' if self.tail else ''}>"


class SendQueue:
    """The queue of one connection. Attributes are for reading; change them through methods.

    ``items``: the queued :class:`SendItem` objects, oldest first. ``queued``: their bytes.
    ``inflight``: bytes of the writer's batch the kernel has not taken. ``writing``: a batch
    is out (between :meth:`take_batch` and :meth:`batch_done`). ``dropped``: data frames
    dropped so far.
    """

    __slots__ = (
        "_batch_parts",
        "_droppable",
        "batch_end",
        "budget",
        "dropped",
        "inflight",
        "items",
        "policy",
        "queued",
        "writing",
    )

    def __init__(self, budget: int, policy: SlowPolicy) -> None:
        self.budget = budget
        self.policy: SlowPolicy = policy
        self.items: collections.deque[SendItem] = collections.deque()
        self.queued = 0
        self.inflight = 0
        self.writing = False
        self.dropped = 0
        #: The end of the in-flight batch: its length, or less once trimmed.
        self.batch_end = 0
        self._batch_parts: list[bytes] = []
        #: Queued items drop-oldest may drop: with none, being over budget is decided at once.
        self._droppable = 0

    def __repr__(self) -> str:
        return (
            f"<SendQueue {len(self.items)} items {self.queued} B queued {self.inflight} B "
            f"in flight, budget {self.budget}, {self.policy}>"
        )

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch out: the next bytes may be written directly."""
        return not self.items and not self.writing

    @property
    def unsent(self) -> int:
        """Bytes accepted that the kernel has not taken yet (queued and in flight)."""
        return self.queued + self.inflight

    def push(self, item: SendItem) -> bool:
        """Queue *item*; True means over budget: the caller must close the connection (4008).

        Under ``drop-oldest`` being over budget first drops the oldest droppable items
        (possibly *item* itself); True only if that is not enough.
        """
        self.items.append(item)
        self.queued += len(item.data)
        if item.sink is not None and item.seq is not None and not item.tail:
            self._droppable += 1
        if self.queued + self.inflight > self.budget:
            if self.policy == "disconnect":
                return True
            return not self._drop_oldest()
        return False

    def push_close(self, item: SendItem) -> None:
        """Queue the close frame: always accepted, whatever the budget (nothing follows it)."""
        self.items.append(item)
        self.queued += len(item.data)

    def _drop_oldest(self) -> bool:
        """Drop the oldest droppable items until under budget; False if that is impossible."""
        q = self.items
        limit = self.budget
        if not self._droppable:
            return self.queued + self.inflight <= limit
        kept: list[SendItem] = []
        while q and self._droppable and self.queued + self.inflight > limit:
            item = q.popleft()
            sink = item.sink
            if sink is not None and item.seq is not None and not item.tail:
                self.queued -= len(item.data)
                self.dropped += 1
                self._droppable -= 1
                sink.dropped(item.seq)
            else:
                kept.append(item)
        if kept:
            q.extendleft(reversed(kept))
        return self.queued + self.inflight <= limit

    def take_batch(self) -> tuple[bytes, int, float]:
        """Move every queued item into the in-flight batch: ``(bytes, frames, published)``.

        *frames* counts the data frames in it (tails of data frames included); *published*
        is the first nonzero publish time among them (0.0: nothing to sample). Under
        ``drop-oldest`` a subscription's pending gap message goes right before its frame.
        """
        items = self.items
        self.items = collections.deque()
        gaps = self.policy == "drop-oldest"
        parts: list[bytes] = []
        frames = 0
        sampled = 0.0
        for item in items:
            seq = item.seq
            if seq is not None:
                sink = item.sink
                if gaps and sink is not None and not item.tail:
                    g = sink.take_gap(seq)
                    if g is not None:
                        parts.append(encode_frame(g))
                frames += 1
                if item.published and not sampled:
                    sampled = item.published
            parts.append(item.data)
        buf = parts[0] if len(parts) == 1 else b"".join(parts)
        self.queued = 0
        self._droppable = 0
        self.inflight = self.batch_end = len(buf)
        self._batch_parts = parts
        self.writing = True
        return buf, frames, sampled

    def adopt_batch(self, buf: bytes, parts: list[bytes], written: int) -> None:
        """Make *buf* (the join of *parts*, of which the kernel took *written* bytes) the
        in-flight batch: a batch written to several connections at once (a batch group) that
        this one did not take whole. Only while :attr:`idle`."""
        if not self.idle:
            raise RuntimeError("adopt_batch needs an idle queue")
        self.inflight = len(buf) - written
        self.batch_end = len(buf)
        self._batch_parts = parts
        self.writing = True

    def wrote(self, n: int) -> None:
        """The kernel took the next *n* bytes of the in-flight batch."""
        self.inflight -= n

    def batch_done(self) -> None:
        """The in-flight batch is written (up to ``batch_end``)."""
        self.writing = False
        self.inflight = 0
        self._batch_parts = []

    def discard(self) -> None:
        """Closing early: forget what is queued, keep only what must be finished.

        An unfinished tail stays (first); the in-flight batch is cut after the message being
        written.
        """
        q = self.items
        tail = q[0] if q and q[0].tail else None
        q.clear()
        self.queued = 0
        self._droppable = 0
        if tail is not None:
            q.append(tail)
            self.queued = len(tail.data)
        self._trim_inflight()

    def _trim_inflight(self) -> None:
        if not self.writing:
            return
        written = self.batch_end - self.inflight
        end = 0
        for part in self._batch_parts:
            end += len(part)
            if end > written:
                break
        if end < self.batch_end:
            self.batch_end = end
            self.inflight = end - written

    def clear(self) -> None:
        """The peer is gone: nothing queued will ever be written."""
        self.items.clear()
        self.queued = 0
        self._droppable = 0
