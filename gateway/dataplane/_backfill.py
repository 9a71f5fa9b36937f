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

Frames older than the history come from the topic's archive (the recorder's files) when it has
them: a disk phase before the history phase. Each read fetches about ``fill_target`` bytes of
frames in a worker thread (at most :data:`DISK_READERS` reads at once in the process) into a
small buffer the pulls then send from; while a read runs the backfill is ``waiting`` and the
writer sleeps. So a slow reader of a whole match holds one chunk read ahead plus its queue, like
any subscriber. The disk phase ends where the history begins, in the same pull; frames the
archive lacks (retention, a recording that stopped) are reported like frames the history
dropped. When the writer thread is a little behind the history, the backfill waits for it (at
most :data:`WRITER_WAIT`).
"""

from __future__ import annotations

import collections
import time
from typing import Final, Protocol

import trio

from gateway.dataplane._connection import Connection
from gateway.hub import ArchiveCursor, Frame, Hub, Topic, TopicArchive

#: Frames one pull queues at most (the kernel may take them all at once: the writer yields).
PULL_FRAMES: Final = 256
#: Disk reads of backfills running at once in the process; more wait their turn.
DISK_READERS: Final = 4
#: Seconds between two looks at an archive whose writer is behind the history, and the
#: longest a backfill waits for it before the frames between count as missed.
WRITER_POLL: Final = 0.05
WRITER_WAIT: Final = 5.0

_READERS: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("disk_readers")


def _readers() -> trio.CapacityLimiter:
    try:
        return _READERS.get()
    except LookupError:
        limiter = trio.CapacityLimiter(DISK_READERS)
        _READERS.set(limiter)
        return limiter


class Backfilled(Protocol):
    """The subscription a :class:`Backfill` is for (a topic subscriber with a few more hooks)."""

    backfill: Backfill | None

    def on_frame(self, frame: Frame) -> None: ...

    def on_status(self, topic: Topic) -> None: ...

    def on_closed(self, topic: Topic) -> None: ...

    def backlog(self) -> float: ...

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


def leave(hub: Hub, topic: Topic, sub: Backfilled) -> None:
    """Take *sub* off *topic* for good: while its backfill still runs, that is what is attached
    (stopped first, then detached); otherwise the subscription itself."""
    bf = sub.backfill
    if bf is not None:
        bf.stop()
        hub.leave(topic, bf)
    else:
        hub.leave(topic, sub)


class Backfill:
    """The cursor of one subscription's backfill; a ``TopicSubscriber`` while it runs.

    Start it with :meth:`start` (after ``subscribed``/``status``); frames from seq *start* on
    are sent. Until it finishes, ``sub.backfill`` is this object and it is what is attached to
    the topic: a subscription that ends first calls :meth:`stop` and leaves the topic with it.
    """

    __slots__ = (
        "_cursor",
        "_disk",
        "_exhausted",
        "_reading",
        "_wait_since",
        "active",
        "conn",
        "next_seq",
        "status_changed",
        "sub",
        "topic",
        "topic_closed",
        "waiting",
    )

    def __init__(self, conn: Connection, topic: Topic, sub: Backfilled, start: int) -> None:
        self.conn = conn
        self.topic = topic
        self.sub = sub
        self.next_seq = start
        self.active = True
        self.status_changed = False
        self.topic_closed = False
        #: A disk read is running: nothing to send until it is back.
        self.waiting = False
        # The disk phase: frames read ahead, the read position, whether the last read found
        # nothing more, and since when the backfill waits for the writer thread.
        self._disk: collections.deque[tuple[int, int | None, bytes]] = collections.deque()
        self._cursor: ArchiveCursor | None = None
        self._reading = False
        self._exhausted = False
        self._wait_since: float | None = None

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
        self._end_disk()

    # -- TopicSubscriber, while the backfill runs -------------------------------------------

    def on_frame(self, frame: Frame) -> None:
        pass  # The cursor gets it from the history.

    def on_status(self, topic: Topic) -> None:
        self.status_changed = True

    def on_closed(self, topic: Topic) -> None:
        # The history stays readable: finish the backfill, then end the subscription.
        self.topic_closed = True

    def backlog(self) -> float:
        # It pulls from the history as its connection drains: new frames queue nothing here.
        return 0.0

    # -- the connection's BackfillSource ------------------------------------------------------

    def pull(self, target: int) -> bool:
        """Queue the next frames until the connection holds *target* bytes (or
        :data:`PULL_FRAMES` frames); True when finished."""
        if not self.active:
            return True
        conn = self.conn
        topic = self.topic
        sub = self.sub
        archive = topic.archive
        if archive is not None and self.next_seq < topic.first_held:
            done = self._pull_disk(archive, target)
            if done is not None:
                return done
        last = topic.seq
        first = topic.first_held
        if self.next_seq < first:
            # Fell out of the history: exactly like a resume that is too old.
            done = self._skip(min(first - 1, last))
            if done is not None:
                return done
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

    def _skip(self, missed_to: int) -> bool | None:
        """Frames ``next_seq``..*missed_to* cannot be sent: the subscription's rule. None:
        reported, go on after them; False: wait until everything before is out; True: done
        (closed as too slow)."""
        conn = self.conn
        if conn.policy == "disconnect":
            self.stop()
            conn.too_slow()
            return True
        if not conn.idle:
            # Report it only once everything sent before is out (one gap, in order).
            return False
        if not self.sub.missed(self.next_seq, missed_to):
            self.stop()
            conn.too_slow()
            return True
        self.next_seq = missed_to + 1
        return None

    # -- the disk phase -----------------------------------------------------------------------

    def _pull_disk(self, archive: TopicArchive, target: int) -> bool | None:
        """Send frames older than the history from the archive; None: the history's turn."""
        conn = self.conn
        topic = self.topic
        sub = self.sub
        buf = self._disk
        prefix = topic.prefix
        sent = 0
        while self.next_seq < topic.first_held:
            if not buf:
                if self._reading:
                    self.waiting = True
                    return False
                if self._exhausted and not self._writer_behind(archive):
                    break  # nothing more on disk: what is missing is reported below
                self._read_more(archive)
                return False
            seq, position, raw = buf[0]
            if seq < self.next_seq:
                buf.popleft()
                continue
            if seq > self.next_seq:
                # Not in the archive (retention, a recording that stopped): reported.
                done = self._skip(min(seq, topic.first_held) - 1)
                if done is not None:
                    return done
                continue
            if sent >= PULL_FRAMES or conn.queued_bytes >= target:
                return False
            buf.popleft()
            sub.on_frame(Frame(seq, raw, 0.0, prefix, position))
            self.next_seq = seq + 1
            sent += 1
            if conn.closing:
                self.stop()
                return True
        self._end_disk()
        return None

    def _writer_behind(self, archive: TopicArchive) -> bool:
        """The archive will have the next frames soon: it is still recording, and its writer
        thread has not reached the history yet (for at most :data:`WRITER_WAIT`)."""
        if not archive.recording or archive.written_seq >= self.topic.first_held - 1:
            return False
        now = time.monotonic()
        if self._wait_since is None:
            self._wait_since = now
        return now - self._wait_since < WRITER_WAIT

    def _read_more(self, archive: TopicArchive) -> None:
        delay = WRITER_POLL if self._exhausted else 0.0
        self._exhausted = False
        if self._cursor is None:
            self._cursor = archive.open_cursor(self.next_seq)
        self._reading = self.waiting = True
        if not self.conn.start_soon(self._read, self._cursor, delay):
            self._reading = self.waiting = False

    async def _read(self, cursor: ArchiveCursor, delay: float) -> None:
        if delay:
            await trio.sleep(delay)
        try:
            frames = await trio.to_thread.run_sync(
                cursor.read, self.conn.fill_target, limiter=_readers(), abandon_on_cancel=True
            )
        except OSError:
            frames = []  # unreadable: what is missing is reported like retention's
        self._reading = self.waiting = False
        if not self.active or cursor is not self._cursor:
            return
        if frames:
            self._disk.extend(frames)
            self._wait_since = None
        else:
            self._exhausted = True
        self.conn.backfill_ready()

    def _end_disk(self) -> None:
        self._disk.clear()
        self.waiting = False
        cursor, self._cursor = self._cursor, None
        if cursor is not None and not self._reading:
            cursor.close()  # a local file's close: the read ahead is what took time

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
