"""The relay: one task that reads the streams of every fixture this instance does not own.

One blocking ``XREAD`` covers all relayed streams, each from the seq after the last one this
instance has; what comes back goes to the fixture's :class:`RelaySink` (its hub topic, in
production) in order. The relay knows nothing of leases or topics: the node
(``gateway.service``) tells it what to follow, from where, and into which sink.

When Redis does not answer, the relay retries with a growing pause (``failing`` is set and the
node reports the fixtures' state); it goes on from the same seqs when Redis is back, so a
subscriber sees a pause, or a gap (counted by the topic) if the stream was trimmed or lost
meanwhile.

Catching up (a read brings more than :data:`CATCH_UP_CHUNK` entries of a stream: after Redis
paused, or a relay that fell behind) goes no faster than the subscribers take it: each read
hands over at most :data:`CATCH_UP_CHUNK` entries per stream (so every stream moves), one by
one while the fixture's fullest subscriber queue is below :data:`HOLD_BACKLOG` of its budget;
the rest waits in the stream (left out of the reads while the queues are that full) and is
read again, for at most :data:`HOLD_MAX` without progress. So subscribers
keep their connections and get every frame once, instead of all being closed as too slow
(4008) by one burst; one that does not drain at all is closed by its own slow policy once the
hold has passed.

Example::

    relay = Relay(store)
    await nursery.start(relay.run)
    relay.follow("tracking/f1", after=topic.seq, sink=sink)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Final, Protocol

import trio
import trio.lowlevel

from gateway.cluster._retry import RedisRetry, RetryState
from gateway.cluster._store import Entry, RedisUnavailable

log = logging.getLogger("gateway.cluster")

#: Seconds one read blocks in Redis when no stream has anything new: also the longest a newly
#: followed fixture waits to join the read (a read in progress is never cancelled: a cancelled
#: blocking read costs its connection).
READ_BLOCK: Final = 0.25
#: Least time between the starts of two reads. A read of every relayed stream costs about
#: 0.4 ms of CPU with 200 streams whatever it brings back, and a relay that reads again as soon
#: as a read returns reads once per loop turn under load (700-1,000 a second at 5,000
#: entries/s, 5-7 each): the entries of this interval come in one read instead. A relay idle
#: for longer reads at once. What its subscribers see: up to this much more latency.
READ_INTERVAL: Final = 0.005
RETRY_FIRST: Final = 0.1
#: The longest pause between two failed reads: relayed frames flow again within about this of
#: Redis answering again (a Sentinel failover, a restart). A failed read costs Redis nothing.
RETRY_MAX: Final = 1.0
#: A read bringing more entries of one stream than this is a catch-up: paced (module docstring).
CATCH_UP_CHUNK: Final = 16
#: A catching-up stream is held while a subscriber queue of its fixture is this full (of its
#: budget, ``[subscribers] queue_bytes``)...
HOLD_BACKLOG: Final = 0.25
#: ...for at most this many seconds at a time.
HOLD_MAX: Final = 2.0
#: How often held streams are looked at when every stream is held.
HOLD_POLL: Final = 0.01


class RelaySink(Protocol):
    def relay(self, entries: Sequence[Entry]) -> None:
        """Entries of one stream, in order (synchronous; must not block or raise)."""

    def backlog(self) -> float:
        """How full the fullest subscriber queue it feeds is (share of its budget)."""
        ...


class ReadStore(Protocol):
    """What the relay needs of the store (:meth:`RedisStore.read`; a fake in tests)."""

    async def read(
        self, after: Mapping[str, int], *, block: float
    ) -> list[tuple[str, list[Entry]]]: ...


class Relay(RetryState):
    """See the module docstring."""

    def __init__(
        self, store: ReadStore, *, block: float = READ_BLOCK, interval: float = READ_INTERVAL
    ) -> None:
        self._store = store
        self._block = block
        self._interval = interval
        self._after: dict[str, int] = {}
        self._sinks: dict[str, RelaySink] = {}
        self._changed = trio.Event()
        self._retry = RedisRetry(
            "relay reads from redis failing", first=RETRY_FIRST, maximum=RETRY_MAX, log=log
        )
        #: Streams catching up that wait for their subscribers: since when (trio time).
        self._held: dict[str, float] = {}
        self.entries_relayed = 0
        #: Times a catching-up stream was held for its subscribers to drain (their queues
        #: reached HOLD_BACKLOG).
        self.holds = 0
        #: Seconds between a relayed frame's receipt by its owner and its relay here (the
        #: last one), by fixture.
        self.lag: dict[str, float] = {}

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(self._after)

    def position(self, key: str) -> int | None:
        """The last seq relayed for *key* (None: not relayed)."""
        return self._after.get(key)

    def follow(self, key: str, *, after: int, sink: RelaySink) -> None:
        """Relay *key*'s stream from the entry after seq *after* into *sink* (replacing any
        earlier sink and position of *key*)."""
        self._after[key] = after
        self._sinks[key] = sink
        self._changed.set()

    def unfollow(self, key: str) -> None:
        self._after.pop(key, None)
        self._sinks.pop(key, None)
        self._held.pop(key, None)
        self.lag.pop(key, None)
        if not self._after:
            # Nothing left to read: not failing (else a relay that failed once and then lost
            # its last fixture, to a takeover, would keep the instance degraded for good).
            self._retry.idle()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        last = -math.inf
        while True:
            if not self._after:
                self._retry.idle()
                self._changed = trio.Event()
                await self._changed.wait()
                continue
            if trio.current_time() < last + self._interval:
                await trio.sleep_until(last + self._interval)
            last = trio.current_time()
            self._changed = trio.Event()
            after = self._readable(last)
            if not after:
                await trio.sleep(HOLD_POLL)  # every stream waits for its subscribers
                continue
            try:
                batch = await self._store.read(after, block=self._block)
            except RedisUnavailable as exc:
                await self._retry.failed(exc)
                continue
            self._retry.succeeded()
            now = time.time()
            for key, entries in batch:
                sink = self._sinks.get(key)
                # Only if nothing moved it meanwhile (unfollowed, or followed anew elsewhere).
                if sink is None or self._after.get(key) != after.get(key) or not entries:
                    continue
                if len(entries) > CATCH_UP_CHUNK or key in self._held:
                    taken = self._paced(key, sink, entries, trio.current_time())
                    if not taken:
                        continue
                else:
                    taken = entries
                    sink.relay(entries)
                self._after[key] = taken[-1].seq
                self.entries_relayed += len(taken)
                lag = now - taken[-1].received_at
                self.lag[key] = lag if math.isfinite(lag) else 0.0
            await trio.lowlevel.checkpoint()

    def _readable(self, now: float) -> dict[str, int]:
        """The streams to read now: all but those held whose subscribers are still full."""
        if not self._held:
            return dict(self._after)
        out: dict[str, int] = {}
        for key, seq in self._after.items():
            since = self._held.get(key)
            if (
                since is not None
                and now - since < HOLD_MAX
                and self._sinks[key].backlog() >= HOLD_BACKLOG
            ):
                continue
            out[key] = seq
        return out

    def _paced(
        self, key: str, sink: RelaySink, entries: Sequence[Entry], now: float
    ) -> Sequence[Entry]:
        """Hand over up to :data:`CATCH_UP_CHUNK` of *entries*, one by one while the
        subscribers have room (every stream catching up moves a little at each read; the rest
        is read again); the ones handed over. A stream held for :data:`HOLD_MAX` without
        progress hands a chunk over at each read whatever the subscribers hold, until they
        have room again (a subscriber that takes nothing is closed by its slow policy instead
        of stalling the fixture for the others)."""
        since = self._held.get(key)
        limit = min(len(entries), CATCH_UP_CHUNK)
        if since is not None and now - since >= HOLD_MAX:
            sink.relay(entries[:limit])
            if limit == len(entries):
                del self._held[key]
            return entries[:limit]
        n = 0
        while n < limit and sink.backlog() < HOLD_BACKLOG:
            sink.relay(entries[n : n + 1])
            n += 1
        if n == limit:
            self._held.pop(key, None)
        elif since is None:
            self.holds += 1
            self._held[key] = now
        elif n:
            self._held[key] = now  # progress: HOLD_MAX counts from here
        return entries[:n]
