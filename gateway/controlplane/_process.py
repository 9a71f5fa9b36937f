"""The process's own metrics (``process_*``), read off the event loop.

prometheus_client's :class:`~prometheus_client.ProcessCollector` reads ``/proc`` when it is
collected, and counts open file descriptors by listing ``/proc/self/fd``: one entry per
subscriber, about 6 ms of CPU with 5,000 of them. A scrape must not hold the event loop that
long, so :class:`ProcessMetrics` runs the collector in a worker thread (:meth:`read`, awaited
by the ``/metrics`` handler before it encodes) and yields what that read gave when the registry
is collected on the loop.
"""

from __future__ import annotations

from collections.abc import Iterator

import trio
from prometheus_client import ProcessCollector
from prometheus_client.metrics_core import Metric


class ProcessMetrics:
    """A collector yielding the ``process_*`` families of its last :meth:`read` (none before)."""

    def __init__(self) -> None:
        # registry=None: registered by make_registry on the app's own registry, never on the
        # process-global one.
        self._collector = ProcessCollector(registry=None)
        self._families: list[Metric] = []

    async def read(self) -> None:
        """Read ``/proc`` now, in a worker thread."""
        self._families = await trio.to_thread.run_sync(self._read)

    def _read(self) -> list[Metric]:
        return list(self._collector.collect())

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
