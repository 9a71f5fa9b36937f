"""Frames in/out per second, computed from the facade's monotonic totals.

The facade exposes counters, not rates. A small task samples them every
:data:`DEFAULT_SAMPLE_INTERVAL` seconds into a ring covering :data:`DEFAULT_RATE_WINDOW` seconds;
a rate is (counter now - oldest counter in the ring) / elapsed time, so ``/v1/status`` reflects
the last few seconds, not the average since start. The clock is ``trio.current_time()``, so
tests can drive it with a MockClock.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Final

import attrs
import trio

from gateway.controlplane._target import Totals

logger = logging.getLogger("gateway.http")

DEFAULT_SAMPLE_INTERVAL: Final = 1.0
DEFAULT_RATE_WINDOW: Final = 10.0


@attrs.frozen
class Rates:
    frames_in_per_second: float
    frames_out_per_second: float


class RateSampler:
    """A ring of ``(time, frames_in, frames_out)`` samples. Holds no resources."""

    def __init__(
        self, *, window: float = DEFAULT_RATE_WINDOW, min_span: float = DEFAULT_SAMPLE_INTERVAL
    ) -> None:
        if not window > 0:
            raise ValueError(f"window must be > 0, got {window!r}")
        if not 0 < min_span <= window:
            raise ValueError(f"min_span must be in (0, window], got {min_span!r}")
        self._window = window
        self._min_span = min_span
        self._samples: deque[tuple[float, int, int]] = deque()

    def sample(self, now: float, totals: Totals) -> None:
        """Record the counters at *now*; drop samples that fell out of the window."""
        self._samples.append((now, totals.frames_in, totals.frames_out))
        # Keep one sample older than the window so the rate always spans a full window.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self._window:
            self._samples.popleft()

    def rates(self, now: float, totals: Totals) -> Rates:
        """Rates from the oldest kept sample up to *totals* at *now*; 0.0 without a sample.

        The span divided by is at least ``min_span``: right after start a burst over a few
        milliseconds would otherwise read as a huge rate. A counter that went backwards (a
        facade bug) yields 0.0, never a negative rate.
        """
        if not self._samples:
            return Rates(0.0, 0.0)
        t0, in0, out0 = self._samples[0]
        elapsed = max(now - t0, self._min_span)
        return Rates(
            max(0, totals.frames_in - in0) / elapsed,
            max(0, totals.frames_out - out0) / elapsed,
        )

    async def run(
        self,
        totals: Callable[[], Totals],
        *,
        interval: float = DEFAULT_SAMPLE_INTERVAL,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Sample ``totals()`` every *interval* seconds until cancelled.

        The first sample is taken before ``started()``. An exception from ``totals()`` is a facade
        bug: it is logged (once per run of failures) and the sample skipped, because the control
        plane is a side channel and must not take the data path down with it.
        """
        failing = False
        while True:
            try:
                self.sample(trio.current_time(), totals())
            except Exception:
                if not failing:
                    logger.exception("reading totals for the rate sampler failed")
                failing = True
            else:
                failing = False
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            await trio.sleep(interval)
