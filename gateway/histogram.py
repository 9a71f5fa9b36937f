"""A fixed-bucket histogram: one bisect and three integer/float adds per observation.

A leaf module (no gateway imports), so that any layer can count durations on its hot path and
the control plane can publish them (``gateway.controlplane`` reads ``buckets``, ``counts``,
``sum`` and ``count``). The fan-out latency (``gateway.hub``) and the vendor's data age
(``gateway.upstream``) are both one of these.
"""

from __future__ import annotations

import bisect
import math


class Histogram:
    """Counts of observed values per bucket (per bucket, not cumulative), with sum and count.

    ``buckets`` are upper bounds (the last is ``inf``); ``counts[i]`` is the number of
    observations ``<= buckets[i]`` and ``> buckets[i-1]``.
    """

    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        if not buckets or buckets[-1] != math.inf or list(buckets) != sorted(buckets):
            raise ValueError("buckets must be sorted upper bounds ending with inf")
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        """Record *times* observations of *value*."""
        self.counts[bisect.bisect_left(self.buckets, value)] += times
        self.sum += value * times
        self.count += times
