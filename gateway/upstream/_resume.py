"""Resume bookkeeping: what to ask for on reconnect, and which received frames to deliver.

Pure state machines (no I/O, times passed in) so the rules are tested without sockets.

Tracking feeds number frames with ``ix`` (increasing per channel). On reconnect the gateway asks
for ``backfill = n`` (the last n messages): n must reach back past the last delivered ``ix``, so it
is estimated from the observed frame rate and the time since the last delivered frame, with a
safety factor and a margin. Everything with ``ix <= last delivered`` is then dropped. If the first
frame after resubscribing still has ``ix > last + 1``, the request was too small: the caller
closes, the request is widened and retried; after a few widenings the whole feed (``-1``) is
asked for.

Fastpath feeds number frames with ``fixtureSeqNum`` from 1 on every connection, and reconnect with
``?startPosition=K`` (K events skipped). K is the number of stream events consumed so far, which
equals the number delivered unless the vendor skipped some (a gap, counted).
"""

from __future__ import annotations

import collections
import enum
import math
from typing import Final

# Backfill estimate: ceil(elapsed * rate * SAFETY) + MARGIN messages.
BACKFILL_SAFETY: Final = 1.5
BACKFILL_MARGIN: Final = 20
# Each too-small request multiplies the next one by this; after MAX_WIDENINGS ask for everything.
BACKFILL_WIDEN: Final = 4
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
        if self.last_ix is None or self.last_at is None:
            return self.initial_backfill
        if self.widenings >= MAX_WIDENINGS:
            return ALL_FRAMES
        elapsed = max(0.0, now - self.last_at)
        n = math.ceil(elapsed * self.rate() * BACKFILL_SAFETY) + BACKFILL_MARGIN
        return int(n * BACKFILL_WIDEN**self.widenings)

    def check(self, ix: int) -> Verdict:
        """Judge a received frame; does not record it (call :meth:`delivered` after publishing)."""
        first = self._first_after_subscribe
        self._first_after_subscribe = False
        if self.last_ix is None:
            return Verdict.DELIVER
        if ix <= self.last_ix:
            # The overlap of the backfill; the next frame is still "first" for the gap check.
            self._first_after_subscribe = first
            return Verdict.DUPLICATE
        if ix == self.last_ix + 1:
            if first:
                self.widenings = 0
            return Verdict.DELIVER
        if first and self.widenings < MAX_WIDENINGS:
            self.widenings += 1
            return Verdict.TOO_SMALL
        if first:
            self.widenings = 0
        return Verdict.GAP

    def delivered(self, ix: int, now: float) -> None:
        self.last_ix = ix
        self.last_at = now
        if not self._samples or now - self._samples[-1][0] >= RATE_SAMPLE_INTERVAL:
            self._samples.append((now, ix))


class FastpathResume:
    """Resume state of one fastpath fixture; survives reconnects and task restarts."""

    def __init__(self) -> None:
        self.position = 0  # events of the stream consumed (delivered or skipped by a gap)
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

    def delivered(self, seq: int) -> None:
        if seq >= self._expected:
            self._expected = seq + 1
            self.position = self._connection_start + seq
