"""Lame-duck closes: a drain's subscriber closes spread evenly over a period.

Closing every subscriber at once makes them all reconnect (to the other instances) in the same
instant; NATS's lame-duck mode spreads the closes instead. Connection *i* of *n* is closed at
``start + period * i / n`` (or up to one :data:`TICK` later): the first at once, the last by the
end of ``period``. Closes that
fall due together (within :data:`TICK`) go in one step, so 10 000 subscribers cost a few hundred
wake-ups, not 10 000.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol

import trio

#: The finest spacing of two close steps (seconds).
TICK: Final = 0.01


class Closable(Protocol):
    def close(self, code: int, reason: str) -> None: ...


async def close_spread(
    conns: Sequence[Closable],
    period: float,
    code: int,
    reason: str,
) -> None:
    """Close *conns* with *code* and *reason*, spread evenly over *period* seconds (0: at once).

    Returns once the last close was started (``close`` does not wait for the peer)."""
    n = len(conns)
    start = trio.current_time()
    done = 0
    while done < n:
        now = trio.current_time()
        due = n if period <= 0 else min(n, int((now - start) * n / period + 1e-9) + 1)
        for conn in conns[done:due]:
            conn.close(code, reason)
        done = max(done, due)
        if done < n:
            await trio.sleep_until(max(start + period * done / n, now + TICK))
        else:
            await trio.lowlevel.checkpoint()
