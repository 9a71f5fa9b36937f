"""Rate-limited logging: count every event, log at most one line per interval.

Some events can be caused by anyone at any rate (a wrong subscriber token, a refused on-demand
subscription, a hostile client's bad message): one log line each would let a client flood the
journal. A :class:`LogThrottle` lets the first line of an interval through and counts the rest;
the next line that passes carries how many were suppressed (its ``suppressed`` field). Every
event is still counted by the caller's own metric.

Example::

    refused = LogThrottle(log, interval=10.0)
    refused.warning("refused on-demand %s/%s: ...", feed, fixture)
    # -> "refused on-demand tracking/x: ..." once, then at most once per 10 s:
    # -> "refused on-demand tracking/y: ..." with the field suppressed=4994
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Final

from gateway.logs._fields import FIELDS_ATTR

#: The field of the next line let through: how many lines were suppressed before it.
SUPPRESSED_FIELD: Final = "suppressed"

#: Default seconds between two lines of one throttle.
DEFAULT_INTERVAL: Final = 10.0


class LogThrottle:
    """At most one log line per *interval* seconds through *logger*; the rest are counted.

    *clock* is injectable for tests (default :func:`time.monotonic`). Not thread-safe: use it
    from the trio thread.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._next_at = -float("inf")
        self._suppressed = 0

    @property
    def suppressed(self) -> int:
        """Events not logged since the last line that was."""
        return self._suppressed

    def log(
        self,
        level: int,
        msg: str,
        *args: object,
        exc_info: bool = False,
        extra: Mapping[str, object] | None = None,
    ) -> bool:
        """Log ``msg % args`` at *level* unless a line passed less than *interval* ago
        (*exc_info*, *extra*: as ``logging`` takes them). After suppressed lines the one let
        through carries their number in the ``suppressed`` field.

        Returns True when the line was written.
        """
        now = self._clock()
        if now < self._next_at:
            self._suppressed += 1
            return False
        if self._suppressed:
            extra = dict(extra or {})
            given = extra.get(FIELDS_ATTR)
            extra[FIELDS_ATTR] = {
                **(given if isinstance(given, Mapping) else {}),
                SUPPRESSED_FIELD: self._suppressed,
            }
        self._logger.log(level, msg, *args, exc_info=exc_info, extra=extra)
        self._suppressed = 0
        self._next_at = now + self._interval
        return True

    def warning(self, msg: str, *args: object, extra: Mapping[str, object] | None = None) -> bool:
        return self.log(logging.WARNING, msg, *args, extra=extra)

    def info(self, msg: str, *args: object, extra: Mapping[str, object] | None = None) -> bool:
        return self.log(logging.INFO, msg, *args, extra=extra)
