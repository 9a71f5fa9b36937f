"""Where a replay's frames come from: what the gateway holds of a (feed, fixture).

A :class:`HeldSource` reads a topic's frames in seq order, in batches of about ``chunk_bytes``:
the frames older than its memory history from its archive (``Topic.archive``: the recorder's
segments on disk, in a cluster the instance's own recording or else the fixture's Redis stream
read with XRANGE) through the same cursor the data plane's backfill reads
(``ArchiveCursor.read``), each read in a worker thread; the rest from the memory history. It
holds one batch at a time, never the whole match.

:func:`open_source` answers whether a replay from a :class:`Start` can be served from what is
held (``None`` otherwise: the caller passes the request through to the vendor, or refuses it).
The start of the fixture is held when the oldest frame held is its first one: for tracking, the
vendor's ``ix`` 0; for other feeds, seq 1 of the topic's numbering.

The end: :meth:`HeldSource.read` returns ``[]`` once it has caught up with what the topic
holds *when it gets there*: a live fixture's replay ends at its newest frame at that moment.
"""

from __future__ import annotations

import time
from typing import Final, Literal, Protocol

import attrs
import trio

from gateway.cluster import StreamCursor
from gateway.hub import ArchiveCursor, Topic, TopicArchive
from gateway.replay._start import Start

#: Bytes of frames one read returns at most (one frame more when a frame is larger).
DEFAULT_CHUNK_BYTES: Final = 256 * 1024
#: Frames one read of the memory history returns at most.
MAX_BATCH_FRAMES: Final = 512
#: Disk (or Redis) reads of replays running at once in the process; more wait their turn.
#: Their own limiter: replays never hold up the backfills' reads.
REPLAY_READERS: Final = 4
#: Seconds between two looks at an archive whose writer thread is behind the history, and the
#: longest a replay waits for it before the frames between are skipped.
WRITER_POLL: Final = 0.05
WRITER_WAIT: Final = 5.0
#: The vendor position of a tracking fixture's first frame (``ix``).
FIRST_TRACKING_POSITION: Final = 0

SourceKind = Literal["recording", "memory", "stream"]
#: Every value of :data:`SourceKind` (the ``source`` label of the replay metrics).
SOURCE_KINDS: Final[tuple[SourceKind, ...]] = ("recording", "memory", "stream")

_READERS: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("replay_readers")


def _readers() -> trio.CapacityLimiter:
    try:
        return _READERS.get()
    except LookupError:
        limiter = trio.CapacityLimiter(REPLAY_READERS)
        _READERS.set(limiter)
        return limiter


@attrs.frozen(slots=True)
class ReplayFrame:
    """One frame of a replay: its seq in the topic's numbering, the upstream text verbatim
    (UTF-8 bytes) and the vendor position (tracking ``ix``; None when unnumbered)."""

    seq: int
    raw: bytes
    position: int | None


class SourceLost(Exception):
    """The source cannot go on (the frames it was at are no longer held): the replay ends
    with reason ``source_lost``. The message says why."""


class ReplaySource(Protocol):
    """Frames of one (feed, fixture), in seq order, from :attr:`first_seq` on."""

    @property
    def kind(self) -> SourceKind:
        """Where the first frame comes from: ``recording`` (disk), ``memory`` (the history)
        or ``stream`` (the cluster's Redis stream)."""
        ...

    @property
    def epoch(self) -> str:
        """The numbering the seqs belong to (the topic's epoch)."""
        ...

    @property
    def first_seq(self) -> int:
        """The seq of the replay's first frame (where :meth:`rewind` goes back to)."""
        ...

    async def read(self) -> list[ReplayFrame]:
        """The next frames (a batch of about the source's chunk), ``[]`` once caught up with
        what is held now. Raises :class:`SourceLost` when it cannot go on."""
        ...

    def rewind(self) -> None:
        """Back to :attr:`first_seq` (a looped replay's next pass)."""
        ...

    def close(self) -> None:
        """Release what it holds (a cursor); idempotent."""
        ...


@attrs.define
class ReadStats:
    """What a source read: tests and the bench look at it (bounded reads)."""

    reads: int = 0
    frames: int = 0
    bytes: int = 0
    #: The most bytes one read returned.
    largest_read: int = 0
    #: Frames skipped because no archive had them (retention, a recording that stopped).
    skipped: int = 0

    def count(self, frames: list[ReplayFrame]) -> None:
        size = sum(len(f.raw) for f in frames)
        self.reads += 1
        self.frames += len(frames)
        self.bytes += size
        self.largest_read = max(self.largest_read, size)


class HeldSource:
    """A :class:`ReplaySource` over a topic's archive and memory history (module docstring).

    Make it with :func:`open_source`. One ``read`` at a time (the replay's own task).
    """

    def __init__(self, topic: Topic, first_seq: int, kind: SourceKind, chunk_bytes: int) -> None:
        self.topic = topic
        self._first = first_seq
        self._kind: SourceKind = kind
        self.chunk_bytes = chunk_bytes
        self._next = first_seq
        self._cursor: ArchiveCursor | None = None
        self._cursor_archive: TopicArchive | None = None
        self._wait_since: float | None = None
        self._reading = False
        self.stats = ReadStats()

    def __repr__(self) -> str:
        t = self.topic
        return f"<HeldSource {t.feed.name}/{t.fixture} {self._kind} next={self._next}>"

    @property
    def kind(self) -> SourceKind:
        return self._kind

    @property
    def epoch(self) -> str:
        return self.topic.epoch

    @property
    def first_seq(self) -> int:
        return self._first

    @property
    def next_seq(self) -> int:
        return self._next

    def rewind(self) -> None:
        self._close_cursor()
        self._next = self._first
        self._wait_since = None

    def close(self) -> None:
        self._close_cursor()

    def _close_cursor(self) -> None:
        cursor, self._cursor, self._cursor_archive = self._cursor, None, None
        if cursor is not None and not self._reading:
            # (A read abandoned by a cancellation may still use it in its thread: then it is
            # left to that thread, and closed with its file objects when it is dropped.)
            cursor.close()

    async def read(self) -> list[ReplayFrame]:
        topic = self.topic
        while True:
            nxt = self._next
            if nxt > topic.seq:
                await trio.lowlevel.checkpoint()
                return []
            if nxt >= topic.first_held:
                self._close_cursor()
                frames = self._from_history(nxt)
                await trio.lowlevel.checkpoint()
                self._deliver(frames)
                return frames
            archive = topic.archive
            if archive is None:
                raise SourceLost(
                    f"frame {nxt} of {topic.feed.name}/{topic.fixture} is no longer held"
                )
            frames = await self._from_archive(archive, nxt)
            if frames:
                self._wait_since = None
                self._deliver(frames)
                return frames
            if self._writer_behind(archive):
                await trio.sleep(WRITER_POLL)
                continue
            # Not on disk (retention, a recording that stopped) nor in the history: skip to
            # what the history holds (or to the end).
            first = min(topic.first_held, topic.seq + 1)
            self.stats.skipped += max(0, first - nxt)
            self._next = max(nxt, first)
            self._close_cursor()

    def _deliver(self, frames: list[ReplayFrame]) -> None:
        self.stats.count(frames)
        self._next = frames[-1].seq + 1

    def _from_history(self, nxt: int) -> list[ReplayFrame]:
        out: list[ReplayFrame] = []
        size = 0
        for frame in self.topic.frames_from(nxt):
            raw = frame.raw_bytes
            out.append(ReplayFrame(frame.seq, raw, frame.position))
            size += len(raw)
            if size >= self.chunk_bytes or len(out) >= MAX_BATCH_FRAMES:
                break
        return out

    async def _from_archive(self, archive: TopicArchive, nxt: int) -> list[ReplayFrame]:
        if self._cursor is None or self._cursor_archive is not archive:
            self._close_cursor()
            self._cursor = archive.open_cursor(nxt)
            self._cursor_archive = archive
        cursor = self._cursor
        self._reading = True
        try:
            rows = await trio.to_thread.run_sync(
                cursor.read, self.chunk_bytes, limiter=_readers(), abandon_on_cancel=True
            )
        except OSError:
            rows = []  # unreadable from here on: what is missing is skipped, as retention's
        finally:
            self._reading = False
        return [ReplayFrame(seq, raw, pos) for seq, pos, raw in rows if seq >= nxt]

    def _writer_behind(self, archive: TopicArchive) -> bool:
        """The archive will have the next frames soon: still recording, its writer not yet at
        the history (for at most :data:`WRITER_WAIT`)."""
        if not archive.recording or archive.written_seq >= self.topic.first_held - 1:
            return False
        now = time.monotonic()
        if self._wait_since is None:
            self._wait_since = now
        return now - self._wait_since < WRITER_WAIT


@attrs.frozen
class NotHeld:
    """Why a replay cannot be served from what the gateway holds (the caller passes the
    request through, or refuses it with :attr:`reason`)."""

    reason: str


async def open_source(
    topic: Topic, start: Start, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> HeldSource | NotHeld:
    """A source for a replay of *topic* from *start*, or :class:`NotHeld`.

    Held when the oldest frame the gateway has (archive, else history) is the fixture's first
    (module docstring) or is before *start* (a seq, or a frame whose time is before it). A
    start found by time is looked up here, reading forward from the oldest frame in chunks.
    """
    name = f"{topic.feed.name}/{topic.fixture}"
    first = topic.first_available
    if first > topic.seq:
        return NotHeld(f"no recording reaches the start of {name}")
    probe = HeldSource(topic, first, "memory", chunk_bytes)
    try:  # the probe's cursor is closed however this ends (a stop_replay cancels it too)
        begin = await _begin(probe, topic, start, name)
    finally:
        probe.close()
    if isinstance(begin, NotHeld):
        return begin
    kind = _kind(topic, begin)
    return HeldSource(topic, begin, kind, chunk_bytes)


async def _begin(probe: HeldSource, topic: Topic, start: Start, name: str) -> int | NotHeld:
    """The seq a replay of *topic* from *start* begins at, read through *probe*."""
    try:
        head = await probe.read()
    except SourceLost:
        head = []
    if not head:
        return NotHeld(f"no recording reaches the start of {name}")
    oldest = head[0]
    from_start = _is_fixture_start(topic, oldest)
    if start.is_first:
        if not from_start:
            return NotHeld(f"no recording reaches the start of {name}")
        return oldest.seq
    if start.seq is not None:
        if start.seq > topic.seq:
            return NotHeld(f"seq {start.seq} of {name} is not there yet (last {topic.seq})")
        if not (from_start or oldest.seq <= start.seq):
            return NotHeld(f"no recording reaches the start of {name}")
        return max(start.seq, oldest.seq)
    if not (from_start or start.before(oldest.seq, oldest.raw)):
        return NotHeld(f"no recording reaches the start of {name}")
    found = await _find(probe, head, start)
    if found is None:
        return NotHeld(f"no frame of {name} at or after {start.describe()} yet")
    return found


async def _find(probe: HeldSource, batch: list[ReplayFrame], start: Start) -> int | None:
    """The seq of the first frame at or after *start*, reading on from *batch*."""
    while batch:
        for frame in batch:
            if start.reached(frame.seq, frame.raw):
                return frame.seq
        batch = await probe.read()
    return None


def _is_fixture_start(topic: Topic, frame: ReplayFrame) -> bool:
    if topic.feed.kind == "tracking":
        return frame.position == FIRST_TRACKING_POSITION
    return frame.seq == 1


def _kind(topic: Topic, begin: int) -> SourceKind:
    archive = topic.archive
    if begin >= topic.first_held or archive is None:
        return "memory"
    cursor = archive.open_cursor(begin)  # no I/O until its first read
    try:
        return "stream" if isinstance(cursor, StreamCursor) else "recording"
    finally:
        cursor.close()
