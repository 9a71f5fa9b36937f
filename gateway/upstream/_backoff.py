"""Reconnect delays: capped exponential backoff with full jitter.

Full jitter (``uniform(0, min(max, initial * 2**n))``) spreads the reconnects of many fixtures that
failed together (one upstream outage drops them all at once) over the whole window instead of
bunching them at the same instants. The global connect limiter still bounds the attempt rate; the
backoff only decides how eagerly one fixture asks for a slot.
"""

from __future__ import annotations

import random
from typing import Final

# 2**_MAX_EXPONENT * initial is far above any sane cap; stopping there keeps the float finite.
_MAX_EXPONENT: Final = 60


class Backoff:
    """Delay generator for one fixture. Holds no I/O and no clock: callers pass durations in.

    ``rng`` is injectable so tests get reproducible delays; by default each instance has its own
    unseeded :class:`random.Random`.
    """

    def __init__(
        self,
        initial: float,
        maximum: float,
        reset_after: float,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.configure(initial, maximum, reset_after)
        self._rng = rng if rng is not None else random.Random()
        self.failures = 0

    def configure(self, initial: float, maximum: float, reset_after: float) -> None:
        """Take new parameters (config reload); the failure count is kept."""
        if not 0 < initial <= maximum:
            raise ValueError("backoff needs 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self.reset_after = reset_after

    def ceiling(self) -> float:
        """The upper bound of the next delay: ``min(maximum, initial * 2**failures)``."""
        exponent = min(self.failures, _MAX_EXPONENT)
        return min(self.maximum, self.initial * 2.0**exponent)

    def next_delay(self) -> float:
        """Draw the delay before the next attempt and count one more failure."""
        delay = self._rng.uniform(0.0, self.ceiling())
        self.failures += 1
        return delay

    def connection_ended(self, live_for: float) -> None:
        """A connection that was live ``live_for`` seconds ended: a long one resets the backoff.

        A short-lived connection does not: a server that accepts and drops at once must not be
        hammered at the initial delay forever.
        """
        if live_for >= self.reset_after:
            self.reset()

    def reset(self) -> None:
        self.failures = 0
