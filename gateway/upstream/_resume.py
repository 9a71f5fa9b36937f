"""Resume bookkeeping: what to ask for on reconnect, and which received frames to deliver.

Pure state machines (no I/O, times passed in) so the rules are tested without sockets.

Tracking feeds number frames with ``ix`` (increasing per channel). On reconnect the gateway asks
for ``backfill = n`` (the last n messages): n must reach back past the last delivered ``ix``. It is
``(head - last) + ceil(dt * rate * SAFETY) + MARGIN`` where ``head`` is the newest vendor ``ix``
known, observed ``dt`` seconds ago: the last delivered frame, or - more recent after a
subscription that delivered nothing new - the head implied by that subscription's backfill (a
reply to ``backfill = n`` starts at ``head - n + 1``). Only the time since that observation is
scaled by the safety factor, so the overlap stays small however long the fixture has been
failing; an estimate from the whole outage would grow with it, and once it exceeded what a short
connection delivers, no connection would ever get past the overlap again.

Everything with ``ix <= last delivered`` is then dropped. If the first frame after resubscribing
still has ``ix > last + 1``, the request was too small: the caller closes and asks again, using
the head that reply revealed and at least ``BACKFILL_WIDEN`` times the last request; after
``MAX_WIDENINGS`` too-small replies in a row the whole feed (``-1``) is asked for.

Fastpath feeds number frames with ``fixtureSeqNum`` from 1 on every connection, and reconnect with
``?startPosition=K`` (K events skipped). K is the number of stream events consumed so far, which
equals the number delivered unless the vendor skipped some (a gap, counted).
"""

from __future__ import annotations

import collections
import enum
import math
from typing import Final

# Backfill estimate: (head - last) + ceil(dt * rate * SAFETY) + MARGIN messages (see above).
BACKFILL_SAFETY: Final = 1.25
BACKFILL_MARGIN: Final = 5
# After a too-small request the next one is at least this many times larger; after MAX_WIDENINGS
# too-small requests in a row, ask for everything.
BACKFILL_WIDEN: Final = 2
MAX_WIDENINGS: Final = 3
ALL_FRAMES: Final = -1
# The rate estimate is the ix progress over the last RATE_WINDOW seconds, from (time, ix) samples
# taken at most every RATE_SAMPLE_INTERVAL. A window in seconds, not frames, keeps a backfill
# burst (hundreds of frames in milliseconds) from inflating the estimate. Until the samples span
# MIN_RATE_SPAN seconds, assume FALLBACK_RATE (soccer tracking runs at 10-25 Hz); a too-small
# request is caught and widened anyway.
RATE_SAMPLE_INTERVAL: Final = 0.1
RATE_WINDOW: Final = 10.0
MIN_RATE_SPAN: Final = 0.5
FALLBACK_RATE: Final = 25.0


class Verdict(enum.Enum):
    DELIVER = "deliver"
    DUPLICATE = "duplicate"  # already delivered: drop and count
    GAP = "gap"  # deliver, but frames were missing before it: count
    TOO_SMALL = "too_small"  # first frame after resubscribe is past the gap: widen and reconnect
    OUT_OF_ORDER = "out_of_order"  # fastpath: behind the expected seq; forwarded and counted


class TrackingResume:
    """Resume state of one tracking fixture; survives reconnects and task restarts."""

    def __init__(self, initial_backfill: int) -> None:
        self.initial_backfill = initial_backfill
        self.last_ix: int | None = None
        self.last_at: float | None = None
        self.widenings = 0
        self._samples: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=round(RATE_WINDOW / RATE_SAMPLE_INTERVAL) + 1
        )
        self._first_after_subscribe = True
        self._request: int | None = None  # backfill n > 0 of the current subscription
        self._request_at = 0.0
        self._head: tuple[int, float] | None = None  # (ix, when) implied by a backfill reply
        self._awaiting_head = False
        self._widen = False

    def resume_at(self, ix: int, at: float) -> None:
        """Go on from frame *ix*, delivered (by an earlier run) at trio time *at*: the next
        subscription asks for a backfill reaching back past it instead of the initial one."""
        self.last_ix = ix
        self.last_at = at

    def rate(self) -> float:
        """Frames (ix steps) per second over the recent window; FALLBACK_RATE until known."""
        if len(self._samples) < 2:
            return FALLBACK_RATE
        (t0, ix0), (t1, ix1) = self._samples[0], self._samples[-1]
        if t1 - t0 < MIN_RATE_SPAN or ix1 <= ix0:
            return FALLBACK_RATE
        return (ix1 - ix0) / (t1 - t0)

    def backfill(self, now: float) -> int:
        """The ``backfill`` to request on a (re)subscribe at trio time ``now``."""
        self._first_after_subscribe = True
        self._awaiting_head = True
        previous, self._request = self._request, None
        widen, self._widen = self._widen, False
        if self.last_ix is None or self.last_at is None:
            return self.initial_backfill
        if self.widenings >= MAX_WIDENINGS:
            return ALL_FRAMES
        rate = self.rate()
        # Two observations of the head: the last delivered frame, and the head implied by the
        # last backfill reply. Trust the more recent one (the safety factor then covers only a
        # short time), unless the older one says the head is clearly further on: a frame
        # delivered from a backfill burst is old, not the head.
        head_ix, head_at = self.last_ix, self.last_at
        if self._head is not None:
            recent, older = (self._head, (head_ix, head_at))
            if recent[1] < older[1]:
                recent, older = older, recent
            head_ix, head_at = recent
            if older[0] + (now - older[1]) * rate > (
                recent[0] + (now - recent[1]) * rate + BACKFILL_MARGIN
            ):
                head_ix, head_at = older
        dt = max(0.0, now - head_at)
        n = max(0, head_ix - self.last_ix) + math.ceil(dt * rate * BACKFILL_SAFETY)
        n += BACKFILL_MARGIN
        if widen and previous is not None:
            # The reply said where the head is, so the estimate above should reach; the floor
            # guarantees progress if the vendor counts its backfill differently than assumed.
            n = max(n, previous * BACKFILL_WIDEN)
        self._request, self._request_at = n, now
        return n

    def check(self, ix: int) -> Verdict:
        """Judge a received frame; does not record it (call :meth:`delivered` after publishing)."""
        first = self._first_after_subscribe
        self._first_after_subscribe = False
        if self._awaiting_head and self._request is not None and ix > 0:
            # The reply to "the last n messages" starts at head - n + 1: the vendor's head at
            # (about, and not later than) the time of the request, whatever this frame's
            # verdict. A reply starting at ix 0 may have been cut short by the start of the
            # feed, so it says nothing.
            head = ix + self._request - 1
            self._head = (head, self._request_at)
            self._sample(self._request_at, head)
        self._awaiting_head = False
        if self.last_ix is None:
            return Verdict.DELIVER
        if ix <= self.last_ix + 1:
            if first:
                self.widenings = 0  # the request reached back far enough
            return Verdict.DUPLICATE if ix <= self.last_ix else Verdict.DELIVER
        if first and self.widenings < MAX_WIDENINGS:
            self.widenings += 1
            self._widen = True
            return Verdict.TOO_SMALL
        if first:
            self.widenings = 0
        return Verdict.GAP

    def delivered(self, ix: int, now: float) -> None:
        self.last_ix = ix
        self.last_at = now
        self._sample(now, ix)

    def _sample(self, now: float, ix: int) -> None:
        if not self._samples or now - self._samples[-1][0] >= RATE_SAMPLE_INTERVAL:
            self._samples.append((now, ix))


class FastpathResume:
    """Resume state of one fastpath fixture; survives reconnects and task restarts."""

    def __init__(self, position: int = 0) -> None:
        # Events of the stream consumed (delivered or skipped by a gap); a resumed fixture
        # starts from the position an earlier run reached.
        self.position = position
        self._connection_start = 0
        self._expected = 1

    def start_position(self) -> int:
        """The ``startPosition`` for a new connection; resets the per-connection sequence."""
        self._connection_start = self.position
        self._expected = 1
        return self.position

    def check(self, seq: int) -> Verdict:
        """Judge a received ``fixtureSeqNum``; call :meth:`delivered` after publishing.

        A frame behind the expected number is OUT_OF_ORDER: the gateway relays it (the vendor
        sent it, and subscribers can see its seq) but it does not move the position.
        """
        if seq == self._expected:
            return Verdict.DELIVER
        if seq > self._expected:
            return Verdict.GAP
        return Verdict.OUT_OF_ORDER

    def absolute(self, seq: int) -> int:
        """The position in the match of the event with ``fixtureSeqNum`` *seq* on the current
        connection: events up to and including it (what ``startPosition`` counts)."""
        return self._connection_start + seq

    def delivered(self, seq: int) -> None:
        if seq >= self._expected:
            self._expected = seq + 1
            self.position = self._connection_start + seq
