"""A fixed-bucket latency histogram, cheap enough for the fan-out path.

Delivery latency is sampled: only one delivery in :data:`SAMPLE_EVERY` is timed, so the hot path
pays a counter increment for the others. The counts are therefore a sample, not a total; the
distribution they describe is the same.
"""

from __future__ import annotations

import math
import time
from typing import Final

from gateway.histogram import Histogram

#: Upper bounds in seconds; the last bucket (``inf``) catches everything slower.
LATENCY_BUCKETS: Final = (
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    math.inf,
)
#: One delivery in this many is timed.
SAMPLE_EVERY: Final = 8


class LatencyHistogram(Histogram):
    """Fan-out latencies in seconds (:data:`LATENCY_BUCKETS` unless told), sampled on the hot
    path by :meth:`sample` and :meth:`sample_many`."""

    __slots__ = ("_tick",)

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        super().__init__(buckets)
        self._tick = 0

    def sample(self, published: float) -> None:
        """Maybe record ``now - published`` (``time.perf_counter`` times): one call in N does."""
        self._tick += 1
        if self._tick >= SAMPLE_EVERY:
            self._tick = 0
            self.observe(time.perf_counter() - published)

    def sample_many(self, published: float, n: int) -> None:
        """*n* deliveries made just now of what was published at *published*: as *n* calls of
        :meth:`sample`, with one clock reading."""
        tick = self._tick + n
        if tick < SAMPLE_EVERY:
            self._tick = tick
            return
        times, self._tick = divmod(tick, SAMPLE_EVERY)
        self.observe(time.perf_counter() - published, times)
