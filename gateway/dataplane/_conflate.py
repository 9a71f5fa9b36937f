"""Latest-wins conflation: at most ``rate`` items a second, and always the latest one.

A ``/v1/stream`` subscription with ``max_rate`` (:mod:`gateway.dataplane._multiplex`) puts a
:class:`Conflator` between its topic and its connection. The rule, all of it:

- An item offered when the rate allows (``1 / rate`` seconds or more since the last one went
  out) goes out at once, synchronously, from :meth:`Conflator.offer`.
- An item offered earlier is *held*; a newer one replaces it (the older is conflated away,
  never sent). Nothing else is ever held: one item at most, no queue of stale ones.
- The timer task (:meth:`Conflator.run`) sends the held item at the moment the rate allows it,
  so the latest item is never kept waiting longer than the rate requires.
- :meth:`Conflator.flush` sends the held item now, whatever the rate: for a message that must
  come after it (a status change), so order is kept.

Times are trio's clock (``trio.current_time()``), so the logic runs under
``trio.testing.MockClock`` in tests. Nothing here touches a socket: ``deliver`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final, Generic, TypeVar

import trio

#: The largest ``max_rate`` a subscription may ask for (items per second).
MAX_RATE: Final = 1000.0
#: The smallest: one item every 100 s. Below it a rate is absurd (5e-324 a second is one item,
#: then none for the age of the universe), so it is refused rather than honoured.
MIN_RATE: Final = 0.01

T = TypeVar("T")


class Conflator(Generic[T]):
    """Hands items to *deliver* at most *rate* times a second, the latest first.

    *rate* must be > 0 (the caller validates what a client sent). ``conflated`` counts the
    items replaced before they could go out. :meth:`run` must run in a task for held items to
    go out; cancel it (and call :meth:`discard`) to stop.
    """

    __slots__ = ("_deliver", "_due", "_held", "_wake", "conflated", "interval")

    def __init__(self, rate: float, deliver: Callable[[T], None]) -> None:
        if not MIN_RATE <= rate < math.inf:
            raise ValueError(f"rate must be a finite number >= {MIN_RATE:g}, got {rate!r}")
        self.interval = 1.0 / rate
        self._deliver = deliver
        self._held: T | None = None
        #: When the next item may go out (trio clock).
        self._due = -math.inf
        self._wake = trio.Event()
        self.conflated = 0

    def __repr__(self) -> str:
        held = "held" if self._held is not None else "empty"
        return f"<Conflator every {self.interval:g} s, {held}, {self.conflated} conflated>"

    @property
    def held(self) -> T | None:
        """The item waiting for the rate to allow it (None: nothing waits)."""
        return self._held

    def offer(self, item: T) -> bool:
        """Send *item* now if the rate allows, else hold it. Never blocks.

        Returns True when an older held item was replaced (conflated away) by this one.
        """
        replaced = self._held is not None
        if replaced:
            self.conflated += 1
        now = trio.current_time()
        if now >= self._due:
            self._held = None
            self._send(item, now)
            return replaced
        if not replaced:
            self._wake.set()
        self._held = item
        return replaced

    def flush(self) -> None:
        """Send the held item now, whatever the rate (the rate counts from now)."""
        item = self._held
        if item is not None:
            self._held = None
            self._send(item, trio.current_time())

    def discard(self) -> None:
        """Forget the held item (the subscription ended)."""
        self._held = None

    def _send(self, item: T, now: float) -> None:
        self._due = now + self.interval
        self._deliver(item)

    async def run(self) -> None:
        """The timer: sends each held item as soon as the rate allows. Runs until cancelled."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            # offer() may have sent an item directly meanwhile, moving the due time: re-check
            # (a deadline that moves, not an event to wait on).
            while self._held is not None and trio.current_time() < self._due:  # noqa: ASYNC110
                await trio.sleep_until(self._due)
            self.flush()
