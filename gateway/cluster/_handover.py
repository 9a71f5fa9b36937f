"""Planned handovers, make-before-break: the I/O-free part (docs/cluster.md, "Handovers").

A planned handover (a rebalance, a graceful stop) moves a fixture to a *successor* without
a stall: the successor first opens a *warm* vendor connection that publishes nothing and
appends nothing; it keeps what it receives in a :class:`WarmBuffer`, by vendor position
(tracking ``ix``, fastpath position: both go up by one per numbered frame). Once the buffer
reaches back to the frame after the stream's last one (:meth:`WarmBuffer.in_step`), the
successor says so in Redis (the connection's sink is a :class:`WarmSink`, which hands its
frames to the owner's sink once promoted); the owner stops its upstream, lets its queued
frames reach Redis and hands the lease over (fenced, as every lease change). The successor
then appends and publishes exactly the buffered frames after the stream's last position
(:meth:`WarmBuffer.take_after`) and goes on live on the same connection: no frame lost, none
twice, no reconnect.

What the handover key holds (``<prefix>:handover:<feed>/<fixture>``, written by the
``OFFER``/``READY`` scripts, taken by ``TRANSFER``):

- ``offer:<instance>``: the owner asks *instance* to warm up (it expires after the offer's
  time);
- ``ready:<token>``: the successor (its lease token) is in step and waits for the lease.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Final

from gateway.model import FixtureState, FrameSink

#: Frames a warm connection keeps beyond the stream's last position; past this many the
#: oldest are dropped and the buffer no longer reaches back (not in step until it does).
WARM_MAX: Final = 10_000
#: Seconds between two handover checks while handovers are under way (instead of a round).
HANDOVER_POLL: Final = 0.05
#: Least seconds an offer waits for its successor to be in step before the owner falls back
#: to a release (break-before-make); it also waits at least two lease times.
HANDOVER_TIMEOUT: Final = 15.0

#: The heartbeat info key of an instance that is stopping: it is offered nothing and ranks
#: for no fixture (its own are being handed over).
LEAVING_KEY: Final = "leaving"

OFFER: Final = "offer:"
READY: Final = "ready:"


def handover_timeout(ttl: float) -> float:
    """How long an owner's offer waits for its successor (``lease_ttl`` *ttl*)."""
    return max(HANDOVER_TIMEOUT, 2 * ttl)


def offer_value(instance: str) -> str:
    return OFFER + instance


def ready_value(token: str) -> str:
    return READY + token


def offered_to(value: str | None) -> str | None:
    """The instance an offer names (None: not an offer)."""
    if value is None or not value.startswith(OFFER):
        return None
    return value[len(OFFER) :]


def ready_token(value: str | None) -> str | None:
    """The lease token of a successor in step (None: not ready)."""
    if value is None or not value.startswith(READY):
        return None
    return value[len(READY) :]


class WarmBuffer:
    """A warm connection's frames, by vendor position, until its instance owns the fixture.

    ``add`` keeps each frame; ``trim(stream)`` forgets those at or before the stream's last
    position *stream* (the stream has them); ``in_step(stream)`` says whether the frames kept
    continue the stream with no hole; ``take_after(stream)`` gives the frames to append once
    the lease is this instance's. Frames without a position (fastpath status packets) are
    kept only after a numbered frame past the stream (before it they may repeat the old
    owner's).
    """

    def __init__(self, max_frames: int = WARM_MAX) -> None:
        self.max_frames = max_frames
        self._frames: collections.deque[tuple[str, int | None]] = collections.deque()
        #: The position of the first numbered frame from which every numbered frame is kept
        #: (None: none received yet).
        self.covered_from: int | None = None
        #: The last numbered position received (None: none yet).
        self.last: int | None = None
        #: Frames dropped because the buffer was full.
        self.overflowed = 0

    def __len__(self) -> int:
        return len(self._frames)

    def resume_after(self, position: int) -> None:
        """The connection resumes after vendor position *position* (the stream has it): every
        numbered frame after it is still to come, in order, so the buffer continues a stream
        ending at *position* or later before any frame arrived (a quiet fixture). A frame
        that does not follow (the vendor could not resume that far) starts coverage again."""
        if self.last is None:
            self.covered_from = position + 1
            self.last = position

    def add(self, raw: str, position: int | None) -> None:
        if position is not None:
            if self.covered_from is None or (self.last is not None and position != self.last + 1):
                # The first numbered frame, or a hole from the vendor: coverage starts again.
                self.covered_from = position
                if self.last is not None and position <= self.last:
                    self._frames.clear()  # the vendor went back: keep the new run only
            self.last = position
        self._frames.append((raw, position))
        while len(self._frames) > self.max_frames:
            self._frames.popleft()
            self.overflowed += 1
            first = next((p for _, p in self._frames if p is not None), None)
            self.covered_from = first

    def trim(self, stream: int | None) -> None:
        """Forget the frames the stream has (positions up to *stream*), and the unnumbered
        frames among them (:meth:`take_after` would not append those)."""
        if stream is None:
            return
        frames = self._frames
        while frames and (frames[0][1] is None or frames[0][1] <= stream):
            frames.popleft()

    def in_step(self, stream: int | None) -> bool:
        """True when the frames kept continue a stream whose last position is *stream*: every
        numbered frame after it is here or still to come on this connection."""
        if stream is None or self.covered_from is None or self.last is None:
            return False
        return self.covered_from <= stream + 1 and self.last >= stream

    def continues(self, stream: int | None) -> bool:
        """True when no frame after a stream ending at *stream* is missing here: the kept
        frames reach back to the one after it (the connection may not have got as far as the
        stream yet: those frames come, and the owner's sink drops them)."""
        if stream is None:
            return self.last is not None
        return self.covered_from is not None and self.covered_from <= stream + 1

    def take_after(self, stream: int | None) -> list[tuple[str, int | None]]:
        """The frames to append after a stream whose last position is *stream*, in order:
        the numbered ones after it, and unnumbered ones that follow one of those; emptied."""
        out: list[tuple[str, int | None]] = []
        started = stream is None
        for raw, position in self._frames:
            if position is not None:
                if stream is not None and position <= stream:
                    continue
                started = True
            if started:
                out.append((raw, position))
        self._frames.clear()
        return out


class WarmSink:
    """The sink of a warm connection: keeps its frames (:class:`WarmBuffer`) until
    :meth:`promote` hands them and every later frame to the owner's sink.

    *stream_position*: the last vendor position the local relay has seen of the stream (the
    stream has everything up to it: the buffer forgets those frames)."""

    __slots__ = ("buffer", "floor", "standby", "status", "stream_position", "target")

    def __init__(self, stream_position: Callable[[], int | None], *, standby: bool = False) -> None:
        self.buffer = WarmBuffer()
        #: A hot standby's connection (``[cluster] standby``), kept while this instance stands
        #: by rather than for one planned handover.
        self.standby = standby
        self.stream_position = stream_position
        self.target: FrameSink | None = None
        #: After promotion: frames at or below this position came late (the stream has them).
        self.floor: int | None = None
        #: The upstream's last state while warm (shown once promoted).
        self.status: tuple[FixtureState, str] | None = None

    def in_step(self) -> bool:
        return self.buffer.in_step(self.stream_position())

    def publish(self, raw: str, position: int | None) -> None:
        target = self.target
        if target is None:
            buffer = self.buffer
            buffer.add(raw, position)
            buffer.trim(self.stream_position())
            return
        if position is not None and self.floor is not None and position <= self.floor:
            return
        target.publish(raw, position)

    def set_status(self, state: FixtureState, detail: str) -> None:
        if self.target is None:
            self.status = (state, detail)
        else:
            self.target.set_status(state, detail)

    def promote(self, target: FrameSink, stream: int | None) -> int:
        """This instance owns the fixture now and its stream ends at vendor position
        *stream*: publish the frames kept after it, then every later one; how many."""
        frames = self.buffer.take_after(stream)
        self.floor = stream
        self.target = target
        if self.status is not None:
            target.set_status(*self.status)
        for raw, position in frames:
            target.publish(raw, position)
            if position is not None:
                self.floor = position
        return len(frames)
