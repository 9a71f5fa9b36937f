"""One global connect limiter: upstream connection attempts, all fixtures together.

The vendor asks for about 5 requests per second across a client, and a mass reconnect after an
outage is exactly when a gateway would exceed that. Attempts are granted strictly spaced at least
``1 / rate`` seconds apart (so any closed 1-second window holds at most ``rate + 1`` grants), in
arrival order: waiters queue on a :class:`trio.Lock`, which is fair (FIFO). The spacing is
measured on the trio clock, so the limiter works under :class:`trio.testing.MockClock`.
"""

from __future__ import annotations

import math

import trio


class ConnectLimiter:
    """Grant connection attempts no faster than ``rate`` per second, first come first served.

    Cancellation-safe: a task cancelled while queued or while waiting for its slot takes nothing
    (the lock is released and no grant is recorded), so it neither shifts nor loses slots of
    others.
    """

    def __init__(self, rate: float) -> None:
        self._lock = trio.Lock()
        self._last_grant = -math.inf
        self.set_rate(rate)

    @property
    def rate(self) -> float:
        return self._rate

    def set_rate(self, rate: float) -> None:
        """Change the rate (config reload); applies from the next grant on."""
        if not rate > 0:
            raise ValueError(f"connect rate must be > 0, got {rate!r}")
        self._rate = rate

    async def acquire(self) -> None:
        """Wait for this caller's turn, then return: the caller may start one attempt now."""
        async with self._lock:
            await trio.sleep_until(self._last_grant + 1.0 / self._rate)
            # The grant time is read after waking, so scheduling delay can only widen the gap.
            self._last_grant = trio.current_time()
