"""One global connect limiter: upstream connection attempts, all fixtures together.

The vendor asks for about 5 requests per second across a client, and a mass reconnect after an
outage is exactly when a gateway would exceed that. Attempts are granted strictly spaced at least
``1 / rate`` seconds apart (so any closed 1-second window holds at most ``rate + 1`` grants). The
spacing is measured on the trio clock, so the limiter works under
:class:`trio.testing.MockClock`.

Order, when attempts wait (a start, a restart, a cluster take-over, a vendor outage):

1. Two queues. Attempts of fixtures the gateway already knows to be real (configured ones,
   reconnects, re-adds of a fixture that went live before) go ahead of the *backlog*: first
   attempts of fixtures added through the API or on demand. Hundreds of ids added at once can
   then delay each other, but never a fixture that matters now.
2. Within a queue, by :class:`Priority`, read from each waiter's callable when a slot is granted
   (so a subscriber arriving while its fixture waits moves it up): fixtures with subscribers
   first, in arrival order; then the most recently active (the last frame received, by this run
   or, after a restart or a cluster take-over, by the one before it); then the rest, in arrival
   order.
3. No starvation: an attempt that has waited :data:`PROMOTE_AFTER` seconds joins the watched
   ones, in its arrival order. It then waits at most for the watched attempts that arrived
   before it: every attempt is granted within ``PROMOTE_AFTER`` plus the time the vendor's rate
   needs for those ahead of it.

In a cluster every instance also reserves each attempt's slot in Redis (:attr:`reserve`),
so ``rate`` holds across all instances together, not per process.

Example::

    limiter = ConnectLimiter(5.0)
    await limiter.acquire()                 # a configured fixture or a reconnect
    await limiter.acquire(backlog=True)     # a new fixture's first attempt: after the others
    await limiter.acquire(priority=lambda: Priority(watched=True, last_active=time.time()))
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Awaitable, Callable
from typing import Final, NamedTuple

import trio

#: Seconds (trio clock) after which a waiting attempt ranks as watched (rule 3 above).
PROMOTE_AFTER: Final = 30.0


class Priority(NamedTuple):
    """How much one waiting attempt matters now; a larger value goes first."""

    #: The fixture has subscribers.
    watched: bool = False
    #: UNIX time of its last frame received (``-inf``: never).
    last_active: float = -math.inf


_NONE: Final = Priority()
_arrivals = itertools.count()


class _Waiter:
    __slots__ = ("order", "priority", "since", "turn")

    def __init__(self, priority: Callable[[], Priority] | None) -> None:
        self.turn = trio.Event()
        self.priority = priority
        self.since = trio.current_time()
        self.order = next(_arrivals)

    def rank(self, now: float) -> tuple[bool, float, int]:
        p = self.priority() if self.priority is not None else _NONE
        if p.watched or now - self.since >= PROMOTE_AFTER:
            return (True, 0.0, -self.order)  # watched (or promoted): first come, first served
        return (False, p.last_active, -self.order)


class ConnectLimiter:
    """Grant connection attempts no faster than ``rate`` per second; see the module docstring.

    Cancellation-safe: a task cancelled while queued or while waiting for its slot takes nothing
    (it leaves its queue and no grant is recorded), so it neither shifts nor loses slots of
    others.
    """

    def __init__(self, rate: float) -> None:
        self._urgent: list[_Waiter] = []
        self._backlog: list[_Waiter] = []
        # True while one waiter (the first in line) sleeps until its slot: only one at a time.
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
        """The waiter to be granted now (priorities read now)."""
        queue = self._urgent or self._backlog
        if not queue:
            return None
        if len(queue) == 1:
            return queue[0]
        now = trio.current_time()
        return max(queue, key=lambda w: w.rank(now))

    def _pass_turn(self) -> None:
        """Wake the waiter next in line, unless one already holds the slot."""
        if not self._slot_taken:
            nxt = self._next()
            if nxt is not None:
                nxt.turn.set()

    async def acquire(
        self, *, backlog: bool = False, priority: Callable[[], Priority] | None = None
    ) -> None:
        """Wait for this caller's turn, then return: the caller may start one attempt now.

        *priority* is called (cheap, synchronous, must not raise) whenever the limiter picks
        the next attempt; without it the attempt ranks lowest within its queue.
        """
        me = _Waiter(priority)
        queue = self._backlog if backlog else self._urgent
        queue.append(me)
        sleeping = False
        try:
            while True:
                while self._slot_taken or self._next() is not me:
                    # Woken but no longer first (a priority changed): wake the one who is.
                    self._pass_turn()
                    me.turn = trio.Event()
                    await me.turn.wait()
                self._slot_taken = sleeping = True
                await trio.sleep_until(self._last_grant + 1.0 / self._rate)
                if self._next() is me:
                    break
                # Another attempt became more important while this one slept for the slot:
                # the slot is its (the priority is read when the slot is granted).
                self._slot_taken = sleeping = False
                self._pass_turn()
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
            self._pass_turn()
