"""The owner's appends to Redis: a byte-bounded queue in front of one writing task.

:meth:`Appender.append` is called from the publish path (synchronously, never blocking): the
frame is queued and the task writes batches, many fixtures per request (one fenced script call,
:data:`gateway.cluster._scripts.APPEND`). The fan-out never waits for Redis.

What happens to frames when Redis is slow or gone: the batch is retried (the script skips
entries already written, so a retry after a lost reply duplicates nothing) with a growing pause;
frames keep queueing meanwhile, and past ``max_bytes`` the oldest queued ones are dropped and
counted (``dropped``): the stream then misses them and relays see a gap. A fixture whose lease
is not ours any more is *fenced*: its queued frames are discarded and ``on_fenced`` is called
so the node stops its upstream.

Example::

    appender = Appender(store, token, "gw-a", max_bytes=64 << 20, on_fenced=node.fenced)
    await nursery.start(appender.run)
    appender.append("tracking/f1", epoch, seq, position, time.time(), frame_bytes)
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import trio
import trio.lowlevel

from gateway.cluster._retry import RedisRetry, RetryState
from gateway.cluster._store import AppendGroup, RedisUnavailable

log = logging.getLogger("gateway.cluster")

#: One request carries at most this many bytes of frames (and :data:`BATCH_FRAMES` frames).
BATCH_BYTES: Final = 1 << 20
BATCH_FRAMES: Final = 2000
#: Least time between the starts of two requests. A request costs about 0.2 ms of CPU here
#: whatever it carries, and a writer that sends as soon as the last reply came sends one per
#: loop turn under load (700-900 a second at 5,000 frames/s, 7 frames each): the frames of
#: this interval go in one request instead. An appender idle for longer sends at once. What
#: relays see: up to this much more latency (docs/performance.md, "Cluster").
APPEND_INTERVAL: Final = 0.005
#: Pause before retrying a failed batch: doubled per failure up to :data:`RETRY_MAX`.
RETRY_FIRST: Final = 0.05
RETRY_MAX: Final = 1.0

# (key, epoch, seq, position, received_at, data, status or None); seq 0 = a status only.
_Item = tuple[str, str, int, int | None, float, bytes, tuple[str, str] | None]


class AppendStore(Protocol):
    """What the appender needs of the store (:meth:`RedisStore.append`; a fake in tests)."""

    async def append(
        self, token: str, instance: str, groups: Sequence[AppendGroup]
    ) -> list[int | str]: ...


class Appender(RetryState):
    """See the module docstring. Counters are plain ints read by the API and metrics."""

    def __init__(
        self,
        store: AppendStore,
        token: str,
        instance: str,
        *,
        max_bytes: int,
        on_fenced: Callable[[str, str], None],
        interval: float = APPEND_INTERVAL,
    ) -> None:
        self._store = store
        self._interval = interval
        self._token = token
        self._instance = instance
        self._max_bytes = max_bytes
        self._on_fenced = on_fenced
        self._queue: collections.deque[_Item] = collections.deque()
        self._pending: collections.Counter[str] = collections.Counter()
        self._in_flight: set[str] = set()
        self.queued_bytes = 0
        self._wake = trio.Event()
        self._progress = trio.Event()
        self._retry = RedisRetry(
            "appends to redis failing", first=RETRY_FIRST, maximum=RETRY_MAX, log=log
        )
        #: The last seq Redis confirmed per fixture (what a relay of it would go on from).
        self.appended: dict[str, int] = {}
        self.frames_appended = 0
        self.frames_dropped = 0
        self.frames_fenced = 0

    # -- the publish side (synchronous) ------------------------------------------------------

    def append(  # noqa: PLR0917 - the hot path: positional, no tuple built by the caller
        self,
        key: str,
        epoch: str,
        seq: int,
        position: int | None,
        received_at: float,
        data: bytes,
    ) -> None:
        """Queue one frame of *key* (never blocks; may drop the oldest queued frames)."""
        self._push((key, epoch, seq, position, received_at, data, None), len(data))

    def status(self, key: str, epoch: str, state: str, detail: str) -> None:
        """Queue *key*'s upstream state for its meta (relays show it), in order with frames."""
        self._push((key, epoch, 0, None, 0.0, b"", (state, detail)), 0)

    def _push(self, item: _Item, size: int) -> None:
        self._queue.append(item)
        self._pending[item[0]] += 1
        self.queued_bytes += size
        while self.queued_bytes > self._max_bytes and self._queue:
            old = self._queue.popleft()
            self._done(old[0])
            self.queued_bytes -= len(old[5])
            if old[2]:
                self.frames_dropped += 1
        self._wake.set()

    def _done(self, key: str) -> None:
        n = self._pending[key] - 1
        if n > 0:
            self._pending[key] = n
        else:
            del self._pending[key]

    def discard(self, key: str) -> int:
        """Forget *key*'s queued frames (its lease is gone; a batch in flight is not retried);
        how many were discarded."""
        self._in_flight.discard(key)
        n = 0
        if key in self._pending:
            kept: collections.deque[_Item] = collections.deque()
            for item in self._queue:
                if item[0] == key:
                    self.queued_bytes -= len(item[5])
                    n += 1 if item[2] else 0
                else:
                    kept.append(item)
            self._queue = kept
            del self._pending[key]
            self.frames_fenced += n
        # Nothing of *key* is pending now: wake its wait_written() (the batch in flight may go
        # on retrying other fixtures for as long as Redis is down).
        self._signal_progress()
        return n

    def _signal_progress(self) -> None:
        progress, self._progress = self._progress, trio.Event()
        progress.set()

    def pending(self, key: str) -> bool:
        """True while frames of *key* are queued or being written."""
        return key in self._pending or key in self._in_flight

    async def wait_written(self, key: str) -> None:
        """Wait until nothing of *key* is queued or in flight (bound it with a timeout)."""
        while self.pending(key):
            await self._progress.wait()

    # -- the writing task --------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write queued frames until cancelled (what is still queued then is lost)."""
        task_status.started()
        last = -math.inf
        while True:
            if not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
            if trio.current_time() < last + self._interval:
                await trio.sleep_until(last + self._interval)
            last = trio.current_time()
            batch = self._take()
            if not batch:
                continue  # all discarded before this task ran: no empty request
            groups = _group(batch)
            self._in_flight = {g.key for g in groups}
            try:
                while True:
                    try:
                        results = await self._store.append(self._token, self._instance, groups)
                        break
                    except RedisUnavailable as exc:
                        await self._retry.failed(exc)
                        # Groups fenced meanwhile (discard) are not written any more.
                        groups = [g for g in groups if g.key in self._in_flight]
                        if not groups:
                            results = []
                            break
            finally:
                in_flight, self._in_flight = self._in_flight, set()
                self._signal_progress()
            self._retry.succeeded()
            for group, result in zip(groups, results, strict=True):
                if group.key not in in_flight:
                    continue
                if isinstance(result, int):
                    if result:
                        self.appended[group.key] = result
                    self.frames_appended += len(group.frames)
                else:
                    self.frames_fenced += len(group.frames)
                    self.discard(group.key)
                    self._on_fenced(group.key, result)
            await trio.lowlevel.checkpoint()

    def _take(self) -> list[_Item]:
        out: list[_Item] = []
        size = 0
        queue = self._queue
        while queue and len(out) < BATCH_FRAMES and size < BATCH_BYTES:
            item = queue.popleft()
            self._done(item[0])
            self.queued_bytes -= len(item[5])
            size += len(item[5])
            out.append(item)
        return out


def _group(items: list[_Item]) -> list[AppendGroup]:
    """Items by fixture (and epoch), in order of first appearance; the last status wins."""
    order: list[tuple[str, str]] = []
    frames: dict[tuple[str, str], list[tuple[int, int | None, float, bytes]]] = {}
    statuses: dict[tuple[str, str], tuple[str, str]] = {}
    for key, epoch, seq, position, received_at, data, status in items:
        k = (key, epoch)
        if k not in frames:
            frames[k] = []
            order.append(k)
        if status is not None:
            statuses[k] = status
        if seq:
            frames[k].append((seq, position, received_at, data))
    return [AppendGroup(k[0], k[1], frames[k], statuses.get(k)) for k in order]
