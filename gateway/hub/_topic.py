"""One topic per followed (feed, fixture): sequence numbers, epoch, history and fan-out."""

from __future__ import annotations

import collections
import itertools
import secrets
import time
from collections.abc import Iterator, Mapping
from typing import Final, Protocol

from gateway.config import FeedConfig
from gateway.hub._frame import Frame, envelope_prefix
from gateway.hub._latency import LatencyHistogram
from gateway.model import FixtureState

# One held frame: (seq, vendor position or None, UTF-8 text).
_Held = tuple[int, int | None, bytes]

#: frames_per_second() averages over this many whole seconds.
RATE_WINDOW: Final = 5


class ArchiveCursor(Protocol):
    """A reading position in a :class:`TopicArchive`. Its methods block (disk): call them in a
    worker thread, one call at a time."""

    def read(self, max_bytes: int) -> list[tuple[int, int | None, bytes]]:
        """The next frames as ``(seq, position, text)``, about *max_bytes* of text (at least one
        frame when there is any); ``[]`` at the end of what is written. Seqs increase; one that
        jumps means the frames between are not in the archive."""
        ...

    def close(self) -> None: ...


class TopicArchive(Protocol):
    """A topic's frames kept beyond its memory history (the recorder's files, in production).

    The hub never reads it: the data plane's backfill does, in worker threads, for the frames
    older than :attr:`Topic.first_held`. The attributes are read on the trio thread and must
    be plain in-memory values.
    """

    @property
    def first_seq(self) -> int:
        """The oldest seq it holds (greater than :attr:`written_seq` when it holds none)."""
        ...

    @property
    def written_seq(self) -> int:
        """The newest seq that can be read now."""
        ...

    @property
    def recording(self) -> bool:
        """True while frames published now still reach it (the gap to the history closes)."""
        ...

    def open_cursor(self, seq: int) -> ArchiveCursor:
        """A cursor at seq *seq* (no I/O until its first read)."""
        ...


#: How far ahead of a topic a resume may be (frames) and still wait for it (a cluster relay
#: behind the stream: seconds at most in practice; the stream keeps ``stream_maxlen``, 20,000
#: by default). Further ahead is no lag but another numbering: not recovered.
RESUME_AHEAD_MAX: Final = 20_000


class TopicTap(Protocol):
    """Sees every frame a topic takes, published or only kept (a relay priming its history),
    in seq order: the service's recorder in a cluster. Called synchronously: it must not
    block and must not raise."""

    def on_frame(self, topic: Topic, seq: int, position: int | None, raw: bytes) -> None: ...


class TopicSubscriber(Protocol):
    """What a topic fans out to (one per subscriber and topic; the data plane implements it).

    Every method is called synchronously from :meth:`Topic.publish` / :meth:`Topic.set_status` /
    :meth:`Topic.close`: it must not block and must not raise. It may detach itself (or others)
    from the topic while being called; the topic iterates over a snapshot.
    """

    def on_frame(self, frame: Frame) -> None: ...

    def on_status(self, topic: Topic) -> None: ...

    def on_closed(self, topic: Topic) -> None: ...

    def backlog(self) -> float:
        """How full its connection's send queue is: queued bytes over the budget (0 when
        empty; 1 or more is past it)."""
        ...


class Topic:
    """A followed fixture as subscribers see it. Implements ``gateway.upstream.FrameSink``.

    ``seq`` is the number of the last frame published (0: none yet); it never restarts while
    the object lives, and ``epoch`` (random, new per object) tells a resuming client whether
    its ``seq`` still means anything here. ``history`` keeps the last ``feed.history`` frames,
    at most ``feed.history_bytes`` bytes of them.

    A topic that continues a recorded one (the service, after a restart) is given the recorded
    *epoch* and *seq*; *prior_epochs* maps earlier epochs to the last seq that still means the
    same frame under this topic's numbering (a resume with such an epoch and an ``after`` up to
    that seq continues here). Its :attr:`archive` then holds the frames before the history.
    """

    def __init__(
        self,
        feed: FeedConfig,
        fixture: str,
        *,
        latency: LatencyHistogram | None = None,
        epoch: str | None = None,
        seq: int = 0,
        prior_epochs: Mapping[str, int] | None = None,
    ) -> None:
        self.feed = feed
        self.fixture = fixture
        self.epoch = epoch or secrets.token_hex(8)
        self.seq = seq
        self._prior_epochs = dict(prior_epochs or {})
        #: Frames older than the history, read by the data plane's backfill (None: none kept).
        self.archive: TopicArchive | None = None
        self.state = FixtureState.CONNECTING
        self.detail = ""
        #: When :attr:`state` last changed (UNIX time).
        self.state_since = time.time()
        self.frames_in = 0
        #: Frames dropped for this topic's subscribers (drop-oldest policy).
        self.drops = 0
        #: Subscribers of this topic disconnected for being too slow.
        self.slow_disconnects = 0
        self.closed = False
        self.latency = latency if latency is not None else LatencyHistogram()
        # (seq, position, UTF-8 text) tuples, not Frame objects: one copy of the text, and a
        # tuple of atomic values is untracked by the cyclic garbage collector, so 300,000 held
        # frames add nothing to its full scans (the paced benchmark's latency tail,
        # docs/performance.md).
        self._history: collections.deque[_Held] = collections.deque()
        #: Bytes of frame text in the history, bounded by ``feed.history_bytes``.
        self.history_bytes = 0
        self._latest: Frame | None = None
        self._prefix = envelope_prefix(feed.name, fixture)
        #: Every subscriber, those waiting to be :meth:`attach`-ed at a later seq included.
        self._subscribers: dict[TopicSubscriber, None] = {}
        #: Subscribers that resumed *ahead* of this topic (a cluster relay still catching up):
        #: the last seq each already has; they join the fan-out at the frame after it.
        self._waiting: dict[TopicSubscriber, int] = {}
        # A tuple snapshot: iterating it is fast and survives subscribers leaving mid-fan-out.
        self._fanout: tuple[TopicSubscriber, ...] = ()
        self._rate_second = 0
        self._rate_counts = [0] * (RATE_WINDOW + 1)
        #: Jumps in a relayed numbering (:meth:`publish_at`): frames that never came.
        self.gaps = 0
        #: Sees every frame taken, after the fan-out (None: nobody).
        self.tap: TopicTap | None = None

    def __repr__(self) -> str:
        return (
            f"<Topic {self.feed.name}/{self.fixture} seq={self.seq} state={self.state} "
            f"subscribers={len(self._subscribers)}>"
        )

    # -- FrameSink -------------------------------------------------------------------------

    def publish(self, raw: str | bytes, position: int | None) -> None:
        """Number *raw*, keep it in the history and hand it to every subscriber, synchronously.

        *position* is the vendor's number for it (see ``gateway.model.FrameSink``); it is kept
        with the frame, in the history too.

        Each subscriber does a small constant amount of work (queue the shared bytes, maybe
        write them to its socket without blocking); none of them can delay the others.
        """
        self.seq += 1
        if self._waiting:
            self._admit(self.seq)
        frame = Frame(self.seq, raw, time.perf_counter(), self._prefix, position)
        self._keep(frame)
        self._latest = frame
        self.frames_in += 1
        self._count_rate()
        for sub in self._fanout:
            sub.on_frame(frame)
        tap = self.tap
        if tap is not None:
            tap.on_frame(self, frame.seq, position, frame.raw_bytes)

    def publish_at(self, seq: int, raw: str | bytes, position: int | None) -> None:
        """Publish *raw* as frame *seq* of a numbering made elsewhere (a cluster relay).

        *seq* must be above :attr:`seq`. When it is not the next one, the frames between are
        not coming (the stream that carried them was trimmed or lost): the history is emptied,
        so what it holds stays contiguous, the jump is counted in :attr:`gaps`, and subscribers
        see the seq jump.
        """
        self._jump_to(seq)
        self.publish(raw, position)

    def keep_at(self, seq: int, raw: str | bytes, position: int | None) -> None:
        """Hold *raw* as frame *seq* without handing it to subscribers (a relay priming its
        history from the stream: the frames are old news to anyone attached now)."""
        self._jump_to(seq)
        self.seq = seq
        frame = Frame(seq, raw, 0.0, self._prefix, position)
        self._keep(frame)
        self._latest = frame
        tap = self.tap
        if tap is not None:
            tap.on_frame(self, seq, position, frame.raw_bytes)

    def _jump_to(self, seq: int) -> None:
        if seq != self.seq + 1:
            if seq <= self.seq:
                raise ValueError(f"seq {seq} is not after {self.seq}")
            self._history.clear()
            self.history_bytes = 0
            self.gaps += 1
            self.seq = seq - 1

    def backlog(self) -> float:
        """The fullest send queue among its subscribers (see :meth:`TopicSubscriber.backlog`);
        0 without subscribers. A cluster relay catching up waits while it is high."""
        return max((sub.backlog() for sub in self._fanout), default=0.0)

    def held_bytes(self, seq: int) -> bytes | None:
        """The text of held frame *seq* (None: not held)."""
        history = self._history
        if not history:
            return None
        i = seq - history[0][0]
        return history[i][2] if 0 <= i < len(history) else None

    def renumber(self, epoch: str, seq: int) -> None:
        """Adopt another numbering (a cluster's *epoch*, its last *seq*) while no frame was
        published here. A resume with the epoch this topic had and ``after`` 0 stays valid.
        Raises RuntimeError once a frame was published."""
        if self.seq or self._history:
            raise RuntimeError(f"topic {self.feed.name}/{self.fixture} already has frames")
        if epoch != self.epoch:
            self._prior_epochs[self.epoch] = 0
            self.epoch = epoch
        self.seq = seq

    def set_status(self, state: FixtureState, detail: str) -> None:
        """Record the upstream state; subscribers hear about real changes only."""
        if state == self.state and detail == self.detail:
            return
        if state != self.state:
            self.state_since = time.time()
        self.state = state
        self.detail = detail
        for sub in tuple(self._subscribers) if self._waiting else self._fanout:
            sub.on_status(self)

    # -- views -----------------------------------------------------------------------------

    @property
    def latest_frame(self) -> Frame | None:
        """The last published frame (its ``raw_bytes`` are the bytes the history holds)."""
        return self._latest

    @property
    def latest(self) -> str | None:
        """The last published upstream text (kept even when ``feed.history`` is 0)."""
        return None if self._latest is None else self._latest.raw

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def history(self) -> tuple[Frame, ...]:
        """The frames held, oldest first (a copy: for inspection, not the hot path)."""
        return tuple(self.frames_from(self.first_held))

    @property
    def history_len(self) -> int:
        return len(self._history)

    def frame_age(self) -> float | None:
        """Seconds since the last frame was published to subscribers; None before the first
        (frames a relay only keeps for its history, :meth:`keep_at`, do not count)."""
        latest = self._latest
        if latest is None or not latest.published:
            return None
        return time.perf_counter() - latest.published

    def frames_per_second(self) -> float:
        """Published frames per second over the last :data:`RATE_WINDOW` whole seconds."""
        self._rotate(int(time.monotonic()))
        return sum(self._rate_counts[:-1]) / RATE_WINDOW

    def _count_rate(self) -> None:
        now = int(time.monotonic())
        if now != self._rate_second:
            self._rotate(now)
        self._rate_counts[-1] += 1

    def _rotate(self, now: int) -> None:
        # counts[-1] is the current second, counts[:-1] the RATE_WINDOW seconds before it.
        shift = now - self._rate_second
        if shift <= 0:
            return
        counts = self._rate_counts
        if shift > RATE_WINDOW:
            counts[:] = [0] * len(counts)
        else:
            counts[:] = counts[shift:] + [0] * shift
        self._rate_second = now

    # -- history ---------------------------------------------------------------------------

    def _keep(self, frame: Frame) -> None:
        """Hold *frame* in the history; the oldest go once ``history`` frames or
        ``history_bytes`` bytes are passed (a frame larger than the byte budget is not held at
        all). Only the oldest are dropped, so what is held is always contiguous."""
        history = self._history
        history.append((frame.seq, frame.position, frame.raw_bytes))
        self.history_bytes += len(frame.raw_bytes)
        max_frames = self.feed.history
        max_bytes = self.feed.history_bytes
        while history and (len(history) > max_frames or self.history_bytes > max_bytes):
            self.history_bytes -= len(history.popleft()[2])

    @property
    def first_held(self) -> int:
        """The seq of the oldest frame held; ``seq + 1`` when none is held."""
        return self._history[0][0] if self._history else self.seq + 1

    @property
    def prefix(self) -> bytes:
        """The multiplexed envelope's start for this topic (for :class:`Frame` objects built
        from archived frames)."""
        return self._prefix

    @property
    def first_available(self) -> int:
        """The oldest seq a backfill can send: from the :attr:`archive` when it holds frames
        older than the history, else :attr:`first_held`."""
        first = self.first_held
        archive = self.archive
        if archive is not None:
            oldest = archive.first_seq
            if oldest < first and oldest <= archive.written_seq:
                return max(1, oldest)
        return first

    def backfill_start(self, n: int | None, *, first: int | None = None) -> int:
        """The first seq a backfill of *n* sends (see :meth:`backfill`); ``seq + 1``: none.

        Counted back from :attr:`first_available` (the archive included) unless *first* says
        where the frames begin.
        """
        if n == 0:
            return self.seq + 1
        if first is None:
            first = self.first_available
        if n is None or n < 0:
            return first
        return max(first, self.seq + 1 - n)

    def resume_start(self, after: int, epoch: str, *, first: int | None = None) -> int | None:
        """The first seq a resume after seq *after* sends, or None when that cannot be done
        without a gap (see :meth:`resume`); ``seq + 1``: nothing was missed.

        *epoch* is this topic's, or a prior epoch with *after* at most the last seq it shares
        with this numbering. The frames must be available from :attr:`first_available` (the
        archive included) unless *first* says where they begin.
        """
        if after < 0:
            return None
        if epoch != self.epoch:
            shared = self._prior_epochs.get(epoch)
            if shared is None or after > shared:
                return None
        if after > self.seq:
            # The client has frames this topic has not yet: a cluster relay behind the stream
            # it reads (the client was on an instance further on). Same numbering, so nothing
            # is missed: it goes on at the frame after *after* (:meth:`attach_after`). Not for
            # a prior epoch (checked above), and not past what could be a relay's lag.
            if epoch != self.epoch or after - self.seq > RESUME_AHEAD_MAX:
                return None
            return after + 1
        if after == self.seq:
            return after + 1
        if first is None:
            first = self.first_available
        if after + 1 < first:
            return None
        return after + 1

    def start_after_events(self, n: int) -> int:
        """The seq right after the *n*-th sequenced frame held (``startPosition``); ``seq + 1``
        when fewer than *n* are held (nothing to send)."""
        seen = 0
        for seq, position, _ in self._history:
            if position is not None:
                seen += 1
                if seen == n:
                    return seq + 1
        return self.seq + 1

    def frames_from(self, seq: int) -> Iterator[Frame]:
        """The held frames from seq *seq* on, built one at a time (lazy backfill).

        *seq* must be held (``first_held <= seq``). Consume it without awaiting: a publish
        changes the history under it.
        """
        history = self._history
        start = seq - history[0][0] if history else 0
        prefix = self._prefix
        for s, position, raw in itertools.islice(history, max(0, start), None):
            yield Frame(s, raw, 0.0, prefix, position)

    def backfill(self, n: int | None) -> list[Frame]:
        """Frames for a new subscriber: None or -1 = all held, 0 = none, n > 0 = the last n.

        The memory history only (for inspection; the data plane's backfill reads the archive).
        """
        start = self.backfill_start(n, first=self.first_held)
        return list(self.frames_from(start)) if start <= self.seq else []

    def resume(self, after: int, epoch: str) -> list[Frame] | None:
        """Every frame after seq *after*, or None when that cannot be done without a gap.

        Possible when *epoch* is this topic's and frame ``after + 1`` is still held (or
        ``after`` is the last seq: nothing was missed). The memory history only, as
        :meth:`backfill`.
        """
        start = self.resume_start(after, epoch, first=self.first_held)
        if start is None:
            return None
        return list(self.frames_from(start)) if start <= self.seq else []

    # -- subscribers -----------------------------------------------------------------------

    def attach(self, sub: TopicSubscriber) -> None:
        """Start fanning out to *sub* (from the next publish on)."""
        if self.closed:
            raise RuntimeError(f"topic {self.feed.name}/{self.fixture} is closed")
        self._subscribers[sub] = None
        self._waiting.pop(sub, None)
        self._refan()

    def attach_after(self, sub: TopicSubscriber, seq: int) -> None:
        """Fan out to *sub* from frame ``seq + 1`` on (*seq* may be ahead of :attr:`seq`: a
        resume ahead, see :meth:`resume_start`). Until then it hears status changes and the
        close, not frames; a jump in a relayed numbering past ``seq + 1`` admits it at the
        frame after the jump (the jump is what every subscriber sees)."""
        if seq <= self.seq:
            self.attach(sub)
            return
        if self.closed:
            raise RuntimeError(f"topic {self.feed.name}/{self.fixture} is closed")
        self._subscribers[sub] = None
        self._waiting[sub] = seq
        self._refan()

    def detach(self, sub: TopicSubscriber) -> bool:
        """Stop fanning out to *sub*; True if it was attached (or waiting to be)."""
        if sub not in self._subscribers:
            return False
        del self._subscribers[sub]
        self._waiting.pop(sub, None)
        self._refan()
        return True

    def _admit(self, seq: int) -> None:
        """Frame *seq* is about to be fanned out: the waiting subscribers that have every
        frame before it join."""
        ready = [sub for sub, last in self._waiting.items() if last < seq]
        if ready:
            for sub in ready:
                del self._waiting[sub]
            self._refan()

    def _refan(self) -> None:
        waiting = self._waiting
        self._fanout = tuple(sub for sub in self._subscribers if sub not in waiting)

    def close(self) -> None:
        """The fixture is no longer followed: subscribers get status ``stopped``, then leave."""
        if self.closed:
            return
        self.set_status(FixtureState.STOPPED, self.detail or "fixture stopped")
        self.closed = True
        subs = tuple(self._subscribers)
        self._subscribers.clear()
        self._waiting.clear()
        self._fanout = ()
        for sub in subs:
            sub.on_closed(self)
