"""Which files retention removes: a pure choice over sizes and times, no I/O.

Two optional limits (``[recorder] retention_days`` and ``max_bytes``):

- age: a closed segment whose newest frame is older than ``retention_days`` goes;
- size: while all recordings together hold more than ``max_bytes``, closed segments go, the
  oldest fixtures' first (the fixture whose newest frame is oldest), each fixture's oldest
  segment first.

A segment still being written is never removed (its fixture is being recorded now), so a
recording loses its beginning before its end, and a fixture's files before a newer one's.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import attrs

SECONDS_PER_DAY = 86400.0


@attrs.frozen
class SegmentUsage:
    name: str
    last_t: float
    stored_bytes: int


@attrs.frozen
class FixtureUsage:
    """One fixture's files: its closed *segments* oldest first, and the bytes of the segment
    being written (never removed)."""

    key: Hashable
    last_t: float
    segments: Sequence[SegmentUsage]
    open_bytes: int = 0


def choose_deletions(
    fixtures: Sequence[FixtureUsage],
    *,
    now: float,
    retention_days: float | None,
    max_bytes: int | None,
) -> list[tuple[Hashable, str]]:
    """``(fixture key, segment name)`` pairs to remove, in the order to remove them."""
    out: list[tuple[Hashable, str]] = []
    kept: list[tuple[float, int, int, FixtureUsage, SegmentUsage]] = []
    cutoff = None if retention_days is None else now - retention_days * SECONDS_PER_DAY
    total = 0
    for j, fx in enumerate(fixtures):
        total += fx.open_bytes
        for i, seg in enumerate(fx.segments):
            if cutoff is not None and seg.last_t < cutoff:
                out.append((fx.key, seg.name))
                continue
            total += seg.stored_bytes
            kept.append((fx.last_t, j, i, fx, seg))
    if max_bytes is not None and total > max_bytes:
        kept.sort(key=lambda k: k[:3])
        for _, _, _, fx, seg in kept:
            if total <= max_bytes:
                break
            out.append((fx.key, seg.name))
            total -= seg.stored_bytes
    return out
