"""Lazy backfill: a subscription's history frames, streamed as its connection drains.

A backfill (``backfill``, a resume with ``after``, the drop-in's ``backfill`` and
``startPosition``) is never copied into the send queue at once. A :class:`Backfill` is a cursor
into the topic's history: the connection pulls from it whenever its queue is below
``Connection.fill_target`` (at most half of ``queue_bytes``), and each pull builds and queues the
next few frames only. So a subscriber that does not read holds at most that much backfill,
however long the history, and the memory goes with the connection.

While it runs, the :class:`Backfill` is attached to the topic in the subscription's place: live
frames are not sent to it (the cursor reaches them through the history), status changes are
remembered. When the cursor reaches the topic's last seq, in the same synchronous step, the
backfill detaches and the subscription itself attaches: live frames follow the backfill with no
gap and no duplicate, exactly as if the whole backfill had been queued at subscribe time.

The history may drop frames the cursor has not reached (a subscriber reading its backfill more
slowly than the history turns over). Then the subscription decides (:meth:`Backfilled.missed`):
under ``drop-oldest`` the multiplexed endpoint reports the missed range with a ``gap`` message
before its next frame; otherwise (``disconnect``, the vendor drop-in) the connection is closed as
too slow (4008). Never a silent hole, never a duplicate.
"""

from __future__ import annotations

from typing import Final, Protocol

from gateway.dataplane._connection import Connection
from gateway.hub import Frame, Topic

#: Frames one pull queues at most (the kernel may take them all at once: the writer yields).
PULL_FRAMES: Final = 256


class Backfilled(Protocol):
    """The subscription a :class:`Backfill` is for (a topic subscriber with a few more hooks)."""

    backfill: Backfill | None

    def on_frame(self, frame: Frame) -> None: ...

    def on_status(self, topic: Topic) -> None: ...

    def on_closed(self, topic: Topic) -> None: ...

    def missed(self, first: int, last: int) -> bool:
        """Frames *first*..*last* fell out of the history before they could be sent.

        Called only when the connection has nothing queued or in flight. True: reported (a gap
        message goes before the next frame); False: the connection must close as too slow.
        """
        ...

    def went_live(self, status_changed: bool) -> None:
        """The backfill is done and the subscription attached; *status_changed*: the topic's
        status changed meanwhile (it was not sent)."""
        ...


class Backfill:
    """The cursor of one subscription's backfill; a ``TopicSubscriber`` while it runs.

    Start it with :meth:`start` (after ``subscribed``/``status``); frames from seq *start* on
    are sent. Until it finishes, ``sub.backfill`` is this object and it is what is attached to
    the topic: a subscription that ends first calls :meth:`stop` and leaves the topic with it.
    """

    __slots__ = ("active", "conn", "next_seq", "status_changed", "sub", "topic", "topic_closed")

    def __init__(self, conn: Connection, topic: Topic, sub: Backfilled, start: int) -> None:
        self.conn = conn
        self.topic = topic
        self.sub = sub
        self.next_seq = start
        self.active = True
        self.status_changed = False
        self.topic_closed = False

    def __repr__(self) -> str:
        return f"<Backfill {self.topic.feed.name}/{self.topic.fixture} next={self.next_seq}>"

    def start(self) -> None:
        """Attach in the subscription's place and send what fits now."""
        self.sub.backfill = self
        self.topic.attach(self)
        self.conn.add_backfill(self)

    def stop(self) -> None:
        """Send no more (still attached to the topic: whoever ends the subscription detaches)."""
        self.active = False
        self.conn.remove_backfill(self)

    # -- TopicSubscriber, while the backfill runs -------------------------------------------

    def on_frame(self, frame: Frame) -> None:
        pass  # The cursor gets it from the history.

    def on_status(self, topic: Topic) -> None:
        self.status_changed = True

    def on_closed(self, topic: Topic) -> None:
        # The history stays readable: finish the backfill, then end the subscription.
        self.topic_closed = True

    # -- the connection's BackfillSource ------------------------------------------------------

    def pull(self, target: int) -> bool:
        """Queue the next frames until the connection holds *target* bytes (or
        :data:`PULL_FRAMES` frames); True when finished."""
        if not self.active:
            return True
        conn = self.conn
        topic = self.topic
        sub = self.sub
        last = topic.seq
        first = topic.first_held
        if self.next_seq < first:
            # Fell out of the history: exactly like a resume that is too old.
            missed_to = min(first - 1, last)
            if conn.policy == "disconnect":
                self.stop()
                conn.too_slow()
                return True
            if not conn.idle:
                # Report it only once everything sent before is out (one gap, in order).
                return False
            if not sub.missed(self.next_seq, missed_to):
                self.stop()
                conn.too_slow()
                return True
            self.next_seq = missed_to + 1
        if self.next_seq <= last:
            for n, frame in enumerate(topic.frames_from(self.next_seq), 1):
                sub.on_frame(frame)
                self.next_seq = frame.seq + 1
                if conn.closing:
                    self.stop()
                    return True
                if n >= PULL_FRAMES or conn.queued_bytes >= target:
                    break
        if self.next_seq <= topic.seq:
            return False
        self._finish()
        return True

    def _finish(self) -> None:
        # Caught up with the topic: hand over to the subscription in this synchronous step.
        self.active = False
        topic, sub = self.topic, self.sub
        sub.backfill = None
        if self.topic_closed:
            if self.status_changed:
                sub.on_status(topic)
            sub.on_closed(topic)
            return
        topic.detach(self)
        topic.attach(sub)
        sub.went_live(self.status_changed)
