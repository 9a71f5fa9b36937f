"""How stale the vendor's data is when it reaches the gateway: one histogram per feed.

The data age of a frame is its receipt time here (this host's wall clock) minus the time the
vendor stamped on it (tracking ``ut``, fastpath ``timestamp``; read by the classifier in the
same parse that finds the sequence number). It includes the vendor's own processing, the
network and the difference between the two clocks; a vendor clock ahead of ours counts as 0.
Frames replayed by a backfill or a resume are old by nature and show as such. Frames without a
readable time are not counted.
"""

from __future__ import annotations

import math
from typing import Final

from gateway.histogram import Histogram

#: Upper bounds in seconds; the last bucket (``inf``) catches everything older.
DATA_AGE_BUCKETS: Final = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    math.inf,
)


def data_age_histogram() -> Histogram:
    """An empty histogram over :data:`DATA_AGE_BUCKETS`."""
    return Histogram(DATA_AGE_BUCKETS)
