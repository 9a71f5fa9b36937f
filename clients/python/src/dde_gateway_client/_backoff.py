"""Full-jitter backoff between connection attempts (I/O-free; the random source is injectable)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final

#: The first attempts wait up to this long (seconds) ...
DEFAULT_MIN_DELAY: Final = 0.1
#: ... doubling per failed attempt, to at most this.
DEFAULT_MAX_DELAY: Final = 10.0
#: A connection that lived this long resets the doubling.
DEFAULT_RESET_AFTER: Final = 10.0


class Backoff:
    """Attempt *n* (0 first) after a failure waits ``rng() * min(max_delay, min_delay * 2**n)``
    seconds ("full jitter": many clients that lost one gateway do not come back in step)."""

    def __init__(
        self,
        min_delay: float = DEFAULT_MIN_DELAY,
        max_delay: float = DEFAULT_MAX_DELAY,
        *,
        reset_after: float = DEFAULT_RESET_AFTER,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < min_delay <= max_delay:
            raise ValueError(
                f"backoff: need 0 < min_delay <= max_delay, got {min_delay}, {max_delay}"
            )
        if reset_after < 0:
            raise ValueError(f"backoff: reset_after must be >= 0, got {reset_after}")
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.reset_after = reset_after
        self.rng = rng
        self.attempt = 0

    def cap(self) -> float:
        """The most the next delay can be."""
        # min() before the power would overflow: 2**1100 is fine for ints, not for floats.
        doubled: float = self.min_delay * 2.0 ** min(self.attempt, 64)
        return min(self.max_delay, doubled)

    def next_delay(self) -> float:
        delay = self.rng() * self.cap()
        self.attempt += 1
        return delay

    def connection_lived(self, seconds: float) -> None:
        """A connection that was open for *seconds* ended: long enough resets the doubling."""
        if seconds >= self.reset_after:
            self.attempt = 0
