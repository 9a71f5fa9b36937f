"""One global connect limiter: upstream connection attempts, all fixtures together.

The vendor asks for about 5 requests per second across a client, and a mass reconnect after an
outage is exactly when a gateway would exceed that. Attempts are granted strictly spaced at least
``1 / rate`` seconds apart (so any closed 1-second window holds at most ``rate + 1`` grants). The
spacing is measured on the trio clock, so the limiter works under
:class:`trio.testing.MockClock`.

Order: two first-come-first-served queues. Attempts of fixtures the gateway already knows to be
real (configured ones, reconnects, re-adds of a fixture that went live before) go ahead of the
*backlog*: first attempts of fixtures added through the API or on demand. Hundreds of ids added
at once can then delay each other, but never a fixture that matters now.

In a cluster every instance also reserves each attempt's slot in Redis (:attr:`reserve`),
so ``rate`` holds across all instances together, not per process.

Example::

    limiter = ConnectLimiter(5.0)
    await limiter.acquire()                 # a configured fixture or a reconnect
    await limiter.acquire(backlog=True)     # a new fixture's first attempt: after the others
"""

from __future__ import annotations

import collections
import math
from collections.abc import Awaitable, Callable

import trio


class _Waiter:
    __slots__ = ("turn",)

    def __init__(self) -> None:
        self.turn = trio.Event()


class ConnectLimiter:
    """Grant connection attempts no faster than ``rate`` per second; see the module docstring.

    Cancellation-safe: a task cancelled while queued or while waiting for its slot takes nothing
    (it leaves its queue and no grant is recorded), so it neither shifts nor loses slots of
    others.
    """

    def __init__(self, rate: float) -> None:
        self._urgent: collections.deque[_Waiter] = collections.deque()
        self._backlog: collections.deque[_Waiter] = collections.deque()
        # True while one waiter (the next in line) sleeps until its slot: only one at a time.
        self._slot_taken = False
        self._last_grant = -math.inf
        #: A cluster's shared limit (``gateway.cluster``): called once the local slot is
        #: granted, returns the seconds to wait for the cluster-wide slot (0 when it cannot
        #: tell: the local limit alone then holds). Must not raise.
        self.reserve: Callable[[], Awaitable[float]] | None = None
        self.set_rate(rate)

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def waiting(self) -> tuple[int, int]:
        """``(urgent, backlog)`` attempts waiting now."""
        return len(self._urgent), len(self._backlog)

    def set_rate(self, rate: float) -> None:
        """Change the rate (config reload); applies from the next grant on."""
        if not rate > 0:
            raise ValueError(f"connect rate must be > 0, got {rate!r}")
        self._rate = rate

    def _next(self) -> _Waiter | None:
        if self._urgent:
            return self._urgent[0]
        return self._backlog[0] if self._backlog else None

    async def acquire(self, *, backlog: bool = False) -> None:
        """Wait for this caller's turn, then return: the caller may start one attempt now."""
        me = _Waiter()
        queue = self._backlog if backlog else self._urgent
        queue.append(me)
        sleeping = False
        try:
            while self._next() is not me or self._slot_taken:
                me.turn = trio.Event()
                await me.turn.wait()
            self._slot_taken = sleeping = True
            await trio.sleep_until(self._last_grant + 1.0 / self._rate)
            reserve = self.reserve
            if reserve is not None:
                # The queue stays blocked meanwhile: the cluster's rate is the binding one.
                # Cancelled while reserving or waiting for the cluster's slot, the caller has
                # recorded no grant: it takes no local slot from the next waiter.
                delay = await reserve()
                if delay > 0:
                    await trio.sleep(delay)
            # The grant time is read after waking (after the cluster's slot too: the attempt
            # starts then), so scheduling delay can only widen the gap, and the local spacing
            # still holds when the next reserve cannot tell (Redis down, 0).
            self._last_grant = trio.current_time()
        finally:
            queue.remove(me)
            if sleeping:
                self._slot_taken = False
            nxt = self._next()
            if nxt is not None:
                nxt.turn.set()
