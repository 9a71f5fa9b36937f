"""Batch groups: subscribers that get the same batches are written each batch once, joined.

With a ``write_delay``, a delayed connection's frames go out in batches: a batch opens with a
frame and its :class:`~gateway.dataplane._connection.WriteTicker` writes it ``write_delay``
later with every frame since, in publish order. Connections with the same delay, the same set
of topics and the same encoding (the envelope, compressed or not, or the vendor's frames as
they came) that are all keeping up would get exactly the same bytes. A :class:`BatchGroup` is
such a set of connections: each frame is handed to the group once (by the first member's
subscription the topic fans it out to; the others see it is there), the group joins a batch's
frames once and writes the same buffer to every member with one ``os.write`` each. Nothing is
queued per member and nothing per delivery but a check: the encode-once rule, extended from
frames to batches.

A connection joins (:func:`join_group`, called by the endpoint's handler when everything was
written - :func:`can_join` - and its subscriptions are plain and live: no backfill, no pending
gap, no ``max_rate``, no vendor state packet owed) and leaves (:meth:`BatchGroup.leave`) at
anything that is for it alone: a control message (status, error, pong, ping, heartbeat), a
subscription change, a close, a write the kernel did not take whole. Leaving queues the
group's frames it has not been written yet before anything else, so the order is that of the
frames and messages as they happened; a member that left rejoins once it has written
everything again. Example (what the ``/v1/stream`` handler does)::

    topics = {sub.topic: sub for sub in subscriptions}  # each topic with its subscription
    join_group(conn, topics)  # its subscriptions now call group.add(frame) instead of queueing
    ...
    conn.leave_group()        # before a control message: pending frames first, then it

Joining and leaving are synchronous and never happen during a topic's fan-out of a frame (a
member's subscriptions only hand frames to the group then), so a frame is never both in the
group's batch and in the member's queue, nor in neither.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Hashable, Mapping
from typing import TypeGuard

from gateway.dataplane._connection import Connection, DelayedConnection
from gateway.dataplane._sendqueue import DeliverySink
from gateway.hub import Frame, Topic


class _Member:
    """A member's place: the first pending part it has not been written (0 but for one that
    joined after the batch's first frame) and its subscription per topic (to queue the
    pending frames on leaving, droppable as its own frames are)."""

    __slots__ = ("sinks", "start")

    def __init__(self, start: int, sinks: Mapping[Topic, DeliverySink | None]) -> None:
        self.start = start
        self.sinks = sinks


class BatchGroup:
    """The connections of one ticker with the same *key* (topics, encoding, byte budget and
    slow policy), written together. *encoding* is the :class:`~gateway.hub.Frame` attribute
    its members get: ``envelope_ws`` (``/v1/stream``), ``deflate_ws`` (the same, compressed)
    or ``raw_ws`` (the vendor drop-in). Created and dropped by :func:`join_group` and
    :meth:`leave`; ``ticker.groups[key]`` is the live one.

    The pending frames are what each member would have queued: past the members' byte
    budget (a delay long for the rate, a burst) every member leaves when the batch is due, so
    each queues them itself under its own slow policy (drop-oldest with gap messages, or 4008).
    Not at once: :meth:`add` runs inside a topic's fan-out, where a member must not leave.
    """

    __slots__ = (
        "_encode",
        "_scheduled",
        "budget",
        "encoding",
        "frames",
        "key",
        "last",
        "latency",
        "members",
        "parts",
        "ticker",
        "topics",
    )

    def __init__(self, conn: DelayedConnection, key: Hashable, encoding: str) -> None:
        self.ticker = conn.ticker
        self.key = key
        self.encoding = encoding
        self._encode: Callable[[Frame], bytes] = operator.attrgetter(encoding)
        self.budget = conn.budget
        self.latency = conn.latency
        self.members: dict[DelayedConnection, _Member] = {}
        #: The open batch's frames, their topics and their encoded bytes (same order).
        self.frames: list[Frame] = []
        self.topics: list[Topic] = []
        self.parts: list[bytes] = []
        self.last: Frame | None = None
        self._scheduled = False

    def __repr__(self) -> str:
        return f"<BatchGroup {len(self.members)} members {len(self.parts)} pending>"

    def add(self, frame: Frame, topic: Topic) -> None:
        """A member's subscription to *topic* got *frame*: write it to every member with the
        open batch (the first frame opens one)."""
        self.last = frame
        self.frames.append(frame)
        self.topics.append(topic)
        self.parts.append(self._encode(frame))
        if not self._scheduled:
            self._scheduled = True
            self.ticker.schedule(self)

    def flush_tick(self) -> None:
        """The batch is due: join the pending frames once and write them to every member."""
        self._scheduled = False
        parts, frames = self.parts, self.frames
        if not parts:
            return
        buf = parts[0] if len(parts) == 1 else b"".join(parts)
        size = len(buf)
        if size > self.budget:
            for conn in tuple(self.members):
                self.leave(conn)
        self.parts = []
        self.frames = []
        self.topics = []
        count = len(parts)
        sampled = frames[0].published
        members = self.members
        write = os.write
        whole = 0
        # A snapshot: a member whose write falls short leaves during the loop. The common
        # case is inline (this loop is most of a delayed delivery's Python): one write, two
        # counters; the latency is sampled once for all below.
        for conn, member in tuple(members.items()):
            start = member.start
            if not start:
                try:
                    n = write(conn.fd, buf)
                except BlockingIOError:
                    n = 0
                except OSError:
                    conn.shared_failed()
                    continue
                conn.writer_writes += 1
                if n == size:
                    conn.frames_sent += count
                    conn.bytes_sent += size
                    whole += 1
                else:
                    conn.shared_short(buf, parts, count, sampled, n)
                continue
            # Joined after the batch's first frame: it had the frames before *start* already.
            member.start = 0
            if start < count:
                offset = sum(map(len, parts[:start]))
                first = frames[start].published
                conn.write_shared(buf[offset:], parts[start:], count - start, first)
        if whole and sampled:
            self.latency.sample_many(sampled, whole)

    def leave(self, conn: DelayedConnection) -> None:
        """*conn* writes alone from now on: the pending frames it has not been written are
        queued on it first. The last member to leave drops the group."""
        member = self.members.pop(conn, None)
        if member is None:
            return
        conn.group = None
        if not self.members and self.ticker.groups.get(self.key) is self:
            del self.ticker.groups[self.key]
        start = member.start
        if start < len(self.parts):
            sinks = member.sinks
            pending = zip(self.frames[start:], self.parts[start:], self.topics[start:], strict=True)
            conn.take_pending([(frame, data, sinks.get(topic)) for frame, data, topic in pending])


def can_join(conn: Connection) -> TypeGuard[DelayedConnection]:
    """Whether *conn* may join a batch group now, as far as the connection goes: a delayed
    connection in no group, nothing queued or in flight, not closing. Its subscriptions are
    the endpoint handler's to check."""
    return (
        isinstance(conn, DelayedConnection)
        and conn.group is None
        and conn.idle
        and not conn.closing
    )


def join_group(
    conn: DelayedConnection, topics: Mapping[Topic, DeliverySink | None], *, raw: bool = False
) -> BatchGroup:
    """Put *conn* (nothing queued, nothing in flight, in no group) in its ticker's group for
    its *topics* (each with the subscription that hears about frames dropped, if any), its
    encoding (*raw*: the upstream frames as they came, for the drop-in; else the envelope,
    compressed if the connection negotiated it), budget and policy, made if there is none.
    From now on frames reach it only through the group."""
    if conn.group is not None or not conn.idle:
        raise RuntimeError(f"{conn!r} cannot join a batch group now")
    encoding = "raw_ws" if raw else "deflate_ws" if conn.deflate else "envelope_ws"
    key = (frozenset(topics), encoding, conn.budget, conn.policy)
    group = conn.ticker.groups.get(key)
    if not isinstance(group, BatchGroup):
        group = BatchGroup(conn, key, encoding)
        conn.ticker.groups[key] = group
    group.members[conn] = _Member(len(group.parts), topics)
    conn.group = group
    return group
