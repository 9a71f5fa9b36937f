"""The failure state of a loop that keeps asking Redis: what it shows, logs and waits.

The appender and the relay each run one task that sends requests to Redis for as long as the
instance lives; when Redis does not answer, both count the failure, show it (``failing``,
``last_error``, read by the node and the control plane), log it at most once per throttle
interval, and wait a pause that doubles per failure in a row up to a cap. Example::

    retry = RedisRetry("relay reads from redis failing", first=0.1, maximum=2.0, log=log)
    while True:
        try:
            batch = await store.read(...)
        except RedisUnavailable as exc:
            await retry.failed(exc)  # counts, logs (throttled), sleeps the pause
            continue
        retry.succeeded()
"""

from __future__ import annotations

import logging

import trio

from gateway.logs import LogThrottle


class RedisRetry:
    """Failures in a row of one loop, and the pause before its next request.

    ``failures`` counts every failure since start; ``failing`` is True from a failure to the
    next success (or :meth:`idle`); ``last_error`` is the last failure's reason (RedisUnavailable
    texts carry no address and no password).
    """

    __slots__ = (
        "_errors",
        "_first",
        "_maximum",
        "_pause",
        "failing",
        "failures",
        "last_error",
        "what",
    )

    def __init__(self, what: str, *, first: float, maximum: float, log: logging.Logger) -> None:
        self.what = what
        self._first = first
        self._maximum = maximum
        self._pause = first
        self._errors = LogThrottle(log)
        self.failures = 0
        self.failing = False
        self.last_error: str | None = None

    async def failed(self, exc: Exception) -> None:
        """A request failed with *exc*: count and log it, then sleep the pause (doubled for
        the next failure in a row)."""
        self.failures += 1
        self.failing = True
        self.last_error = str(exc)
        self._errors.warning("%s: %s", self.what, exc)
        await trio.sleep(self._pause)
        self._pause = min(self._maximum, self._pause * 2)

    def succeeded(self) -> None:
        """A request got through: not failing, the next pause starts from the first again."""
        self.failing = False
        self._pause = self._first

    def idle(self) -> None:
        """Nothing to ask for: whatever failed before is not failing now."""
        self.failing = False


class RetryState:
    """``failing``, ``failures`` and ``last_error`` of a loop's :class:`RedisRetry` (its
    ``_retry``), read as the loop's own attributes (the appender and the relay)."""

    _retry: RedisRetry

    @property
    def failing(self) -> bool:
        """True from a failed request to the next one that got through."""
        return self._retry.failing

    @property
    def failures(self) -> int:
        """Failed requests since start."""
        return self._retry.failures

    @property
    def last_error(self) -> str | None:
        """Why the last request failed (None: none failed yet)."""
        return self._retry.last_error
