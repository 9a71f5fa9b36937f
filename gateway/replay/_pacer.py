"""The pace of a replay: N frames a second, evenly. I/O-free (like ``Backoff`` and the
``ConnectLimiter``): it is told the time and answers with delays, so it is tested with plain
numbers or under ``trio.testing.MockClock``.
"""

from __future__ import annotations

from typing import Final

#: The vendor's range of ``packetsPerSecond`` (and of the ``/v1/stream`` op's ``rate``).
MIN_RATE: Final = 1
MAX_RATE: Final = 1000
#: How far a replay may catch up after a scheduling delay (or a client that read nothing for a
#: while): at most this many frames, or this many seconds' worth when that is more (at a high
#: rate a disk read or a busy loop takes a few frame periods), never the whole backlog.
CATCH_UP: Final = 2
CATCH_UP_SECONDS: Final = 0.05


def valid_rate(value: object) -> bool:
    """*value* is an integer (not a bool) from :data:`MIN_RATE` to :data:`MAX_RATE`."""
    return type(value) is int and MIN_RATE <= value <= MAX_RATE


class Pacer:
    """Frame *k* of a replay is due ``k / rate`` seconds after :meth:`start`; a frame sent
    late moves the schedule so that it never falls further behind the clock than
    :data:`CATCH_UP` periods or :data:`CATCH_UP_SECONDS`, whichever is longer: after a delay at
    most that many frames go back to back (3 at 40/s, 51 at 1000/s)::

        pacer = Pacer(40)
        pacer.start(trio.current_time())
        while ...:
            await trio.sleep(pacer.delay(trio.current_time()))
            send(frame)
            pacer.sent(trio.current_time())
    """

    __slots__ = ("_due", "catch_up", "max_lag", "period", "rate")

    def __init__(self, rate: int, *, catch_up: int = CATCH_UP) -> None:
        if not valid_rate(rate):
            raise ValueError(f"rate must be an integer {MIN_RATE} to {MAX_RATE}, got {rate!r}")
        if catch_up < 0:
            raise ValueError(f"catch_up must be >= 0, got {catch_up}")
        self.rate = rate
        self.period = 1.0 / rate
        self.catch_up = catch_up
        #: The most the schedule may lag behind the clock (seconds).
        self.max_lag = max(catch_up * self.period, CATCH_UP_SECONDS if catch_up else 0.0)
        self._due: float | None = None

    def start(self, now: float) -> None:
        """The first frame is due at *now*."""
        self._due = now

    def delay(self, now: float) -> float:
        """Seconds until the next frame is due (0: now). Starts the schedule if not started."""
        if self._due is None:
            self._due = now
        return max(0.0, self._due - now)

    def sent(self, now: float) -> None:
        """A frame went out at *now*: the next is due a period after the one just due, but
        no earlier than :attr:`max_lag` before *now*."""
        due = now if self._due is None else self._due
        self._due = max(due + self.period, now - self.max_lag)
