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

Every append tells Redis the last seq it confirmed for the fixture (``expect``). A stream
that ends below it lost frames this owner had appended (Redis restarted empty, or failed over
to a replica that had not received the last appends: replication is asynchronous); Redis then
writes nothing of the fixture and says where the stream ends (:class:`Behind`). The appender
takes the missing frames from ``history`` (the topic's memory history, by the node) and puts
them in front of the fixture's queued frames, so the next requests append them first, in
order and fenced like any append (``reappended``); missing frames no longer in memory are
counted (``lost``): relays see a gap there.

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

from gateway.cluster._keys import key_fields
from gateway.cluster._retry import RedisRetry, RetryState
from gateway.cluster._store import AppendGroup, Behind, RedisUnavailable

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
#: One frame as an append carries it: (seq, position, received_at, data).
Frame = tuple[int, int | None, float, bytes]
#: The frames of a fixture's memory history: (key, epoch, after, before) -> the frames of
#: that epoch with ``after < seq < before`` still held, in order.
History = Callable[[str, str, int, int], Sequence[Frame]]


class AppendStore(Protocol):
    """What the appender needs of the store (:meth:`RedisStore.append`; a fake in tests)."""

    async def append(
        self, token: str, instance: str, groups: Sequence[AppendGroup]
    ) -> list[int | str | Behind]: ...


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
        history: History | None = None,
        interval: float = APPEND_INTERVAL,
    ) -> None:
        self._store = store
        self._interval = interval
        self._token = token
        self._instance = instance
        self._max_bytes = max_bytes
        self._on_fenced = on_fenced
        self._history = history
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
        #: Frames appended again after Redis lost them (from the memory history).
        self.frames_reappended = 0
        #: Frames Redis lost that were no longer in the memory history (relays see a gap).
        self.frames_lost = 0

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
            groups = _group(batch, self.appended)
            self._in_flight = {g.key for g in groups}
            try:
                while groups:
                    try:
                        results = await self._store.append(self._token, self._instance, groups)
                    except RedisUnavailable as exc:
                        await self._retry.failed(exc)
                        # Groups fenced meanwhile (discard) are not written any more.
                        groups = [g for g in groups if g.key in self._in_flight]
                        continue
                    self._retry.succeeded()
                    self._settle(groups, results)
                    groups = []
            finally:
                self._in_flight = set()
                self._signal_progress()
            await trio.lowlevel.checkpoint()

    def _settle(self, groups: Sequence[AppendGroup], results: Sequence[int | str | Behind]) -> None:
        for group, result in zip(groups, results, strict=True):
            if group.key not in self._in_flight:
                continue  # discarded while in flight (fenced, stepped down)
            if isinstance(result, Behind):
                self._behind(group, result.seq)
            elif isinstance(result, int):
                if result:
                    self.appended[group.key] = result
                self.frames_appended += len(group.frames)
            else:
                self.frames_fenced += len(group.frames)
                self.discard(group.key)
                self._on_fenced(group.key, result)

    def _behind(self, group: AppendGroup, last: int) -> None:
        """Redis holds *group*'s stream only up to seq *last*, below what it had confirmed:
        the missing frames (from the memory history) go in front of the queue, then the
        group's own, so the next requests append them in order."""
        key = group.key
        confirmed = self.appended.get(key, 0)
        # Up to the group's first frame (frames dropped from the queue before it included),
        # else up to the last confirmed.
        before = group.frames[0][0] if group.frames else confirmed + 1
        found = list(self._history(key, group.epoch, last, before)) if self._history else []
        self.appended[key] = last
        held = {f[0] for f in found}
        lost = sum(1 for seq in range(last + 1, confirmed + 1) if seq not in held)
        self.frames_reappended += len(found)
        self.frames_lost += lost
        log.warning(
            "cluster: %s: redis holds the stream up to seq %d only, %d confirmed before: "
            "appending %d frames again from memory%s",
            key,
            last,
            confirmed,
            len(found),
            f", {lost} no longer held (a gap)" if lost else "",
            extra=key_fields(key),
        )
        items: list[_Item] = [
            (key, group.epoch, seq, position, received_at, data, None)
            for seq, position, received_at, data in [*found, *group.frames]
        ]
        if group.status is not None:
            items.append((key, group.epoch, 0, None, 0.0, b"", group.status))
        self._queue.extendleft(reversed(items))
        self._pending[key] += len(items)
        self.queued_bytes += sum(len(item[5]) for item in items)
        self._wake.set()

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


def _group(items: list[_Item], appended: dict[str, int]) -> list[AppendGroup]:
    """Items by fixture (and epoch), in order of first appearance; the last status wins;
    each expects the stream up to what Redis confirmed (*appended*)."""
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
    return [
        AppendGroup(k[0], k[1], frames[k], statuses.get(k), appended.get(k[0], 0)) for k in order
    ]
