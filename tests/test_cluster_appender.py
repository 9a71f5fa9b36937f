"""The cluster's appender (gateway.cluster.Appender) over a fake store: no Redis, no sockets.

:class:`FakeAppendStore` has ``RedisStore.append``'s signature and the APPEND script's
semantics that matter here (an entry id not above the stream's last is skipped, a fixture
whose lease is not ours is refused, a stream ending below the group's ``expect`` gets
``Behind`` and nothing written), records every request, can fail with
``RedisUnavailable`` a given number of times and can hold requests in flight. Retry pauses run
under ``MockClock(autojump_threshold=0)`` (pytest-trio's ``autojump_clock``), so they are exact.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from gateway.cluster import APPEND_INTERVAL, Appender, AppendGroup, Behind, RedisUnavailable

K1, K2 = "tracking/1", "tracking/2"
EPOCH = "e1"
TOKEN = "gw-a/n0nce"


def failing(x: Appender) -> bool:
    """``x.failing``, read through a call: mypy would otherwise narrow it between two asserts."""
    return x.failing


class FakeAppendStore:
    def __init__(self) -> None:
        #: Every request, failed ones too: (token, instance, groups).
        self.calls: list[tuple[str, str, list[AppendGroup]]] = []
        #: Seqs written per fixture, in order.
        self.streams: dict[str, list[int]] = collections.defaultdict(list)
        self.statuses: dict[str, tuple[str, str]] = {}
        #: Fail this many more requests with RedisUnavailable.
        self.fail = 0
        #: Fixtures refused, with the script's answer ("fenced" or "epoch").
        self.refused: dict[str, str] = {}
        #: While set, requests wait for it (in flight).
        self.gate: trio.Event | None = None
        self._called = trio.Event()

    @property
    def groups(self) -> list[list[AppendGroup]]:
        return [groups for _, _, groups in self.calls]

    async def append(
        self, token: str, instance: str, groups: Sequence[AppendGroup]
    ) -> list[int | str | Behind]:
        self.calls.append((token, instance, list(groups)))
        self._called.set()
        if self.gate is not None:
            await self.gate.wait()
        await trio.lowlevel.checkpoint()
        if self.fail:
            self.fail -= 1
            raise RedisUnavailable("redis unreachable: Connection refused")
        out: list[int | str | Behind] = []
        for g in groups:
            if g.key in self.refused:
                out.append(self.refused[g.key])
                continue
            last = 0
            stream = self.streams[g.key]
            if (stream[-1] if stream else 0) < g.expect:
                out.append(Behind(stream[-1] if stream else 0))
                continue
            for seq, _, _, _ in g.frames:
                if not stream or seq > stream[-1]:
                    stream.append(seq)
                    last = seq
            if g.status is not None:
                self.statuses[g.key] = g.status
            out.append(last)
        return out

    async def wait_calls(self, n: int) -> None:
        while len(self.calls) < n:
            self._called = trio.Event()
            await self._called.wait()


def data(key: str, seq: int, size: int | None = None) -> bytes:
    raw = f"{key}#{seq}".encode()
    return raw if size is None else raw.ljust(size, b".")[:size]


def frame(appender: Appender, key: str, seq: int, size: int | None = None) -> None:
    appender.append(key, EPOCH, seq, 1000 + seq, 1_700_000_000.0 + seq, data(key, seq, size))


def seqs(group: AppendGroup) -> list[int]:
    return [seq for seq, _, _, _ in group.frames]


class Fenced:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, key: str, result: str) -> None:
        self.calls.append((key, result))


def make(store: FakeAppendStore, max_bytes: int = 1 << 20) -> tuple[Appender, Fenced]:
    fenced = Fenced()
    return Appender(store, TOKEN, "gw-a", max_bytes=max_bytes, on_fenced=fenced), fenced


@asynccontextmanager
async def running(appender: Appender) -> AsyncIterator[None]:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(appender.run)
            yield
            nursery.cancel_scope.cancel()


async def test_frames_are_batched_by_fixture_in_order() -> None:
    store = FakeAppendStore()
    appender, fenced = make(store)
    async with running(appender):
        for key, seq in [(K1, 1), (K2, 1), (K1, 2), (K2, 2), (K1, 3)]:
            frame(appender, key, seq)
        assert appender.pending(K1)
        await appender.wait_written(K1)
        await appender.wait_written(K2)
    assert len(store.calls) == 1
    token, instance, groups = store.calls[0]
    assert (token, instance) == (TOKEN, "gw-a")
    assert [(g.key, g.epoch, seqs(g)) for g in groups] == [
        (K1, EPOCH, [1, 2, 3]),
        (K2, EPOCH, [1, 2]),
    ]
    assert groups[0].frames[1] == (2, 1002, 1_700_000_002.0, data(K1, 2))
    assert appender.appended == {K1: 3, K2: 2}
    assert appender.frames_appended == 5
    assert appender.queued_bytes == 0
    assert not failing(appender)
    assert fenced.calls == []


async def test_a_failed_batch_is_retried_whole_and_nothing_is_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeAppendStore()
    store.fail = 3
    appender, _ = make(store)
    async with running(appender):
        for key, seq in [(K1, 1), (K2, 1), (K1, 2), (K1, 3)]:
            frame(appender, key, seq)
        t0 = trio.current_time()
        await store.wait_calls(2)
        assert failing(appender)
        assert appender.last_error == "redis unreachable: Connection refused"
        frame(appender, K1, 4)  # queued while the batch is being retried
        await appender.wait_written(K1)
        await appender.wait_written(K2)
        # Three pauses, doubling: 0.05 + 0.1 + 0.2.
        assert trio.current_time() - t0 == pytest.approx(0.35)
        first = store.groups[0]
        assert store.groups[:4] == [first] * 4  # the same batch each time
        assert [[(g.key, seqs(g)) for g in groups] for groups in store.groups[4:]] == [[(K1, [4])]]
        assert store.streams == {K1: [1, 2, 3, 4], K2: [1]}
        assert appender.failures == 3
        assert not failing(appender)
        assert appender.frames_appended == 5
        assert appender.frames_dropped == 0
        # The pause starts over for the next failing batch (after APPEND_INTERVAL: the last
        # request started just now).
        store.fail = 1
        t1 = trio.current_time()
        frame(appender, K1, 5)
        await appender.wait_written(K1)
        assert trio.current_time() - t1 == pytest.approx(APPEND_INTERVAL + 0.05)
        assert store.streams[K1] == [1, 2, 3, 4, 5]


class LostReplyStore(FakeAppendStore):
    """Writes the first request, then loses its reply (a timeout after Redis did the work)."""

    async def append(
        self, token: str, instance: str, groups: Sequence[AppendGroup]
    ) -> list[int | str | Behind]:
        out = await super().append(token, instance, groups)
        if len(self.calls) == 1:
            raise RedisUnavailable("redis timed out")
        return out


async def test_a_retry_after_a_lost_reply_writes_nothing_twice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Redis wrote the batch but the reply was lost: the retry's entries are all skipped
    (ids not above the last), the batch still counts as written once."""
    store = LostReplyStore()
    appender, _ = make(store)
    async with running(appender):
        frame(appender, K1, 1)
        frame(appender, K1, 2)
        await appender.wait_written(K1)
    assert len(store.calls) == 2
    assert store.streams[K1] == [1, 2]
    assert appender.frames_appended == 2
    # The retry's answer was "0: nothing written": the last confirmed seq stays what it was.
    assert appender.appended == {}


async def test_overflow_drops_the_oldest_frames(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeAppendStore()
    appender, _ = make(store, max_bytes=100)
    for seq in range(1, 16):
        frame(appender, K1, seq, size=10)
    appender.status(K2, EPOCH, "live", "")  # a status weighs nothing: kept
    assert appender.frames_dropped == 5
    assert appender.queued_bytes == 100
    async with running(appender):
        await appender.wait_written(K1)
        await appender.wait_written(K2)
    assert store.streams[K1] == list(range(6, 16))
    assert store.statuses == {K2: ("live", "")}
    assert appender.frames_appended == 10
    assert appender.queued_bytes == 0


async def test_overflow_while_a_batch_is_in_flight_drops_only_queued_frames(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeAppendStore()
    store.gate = trio.Event()
    appender, _ = make(store, max_bytes=30)
    async with running(appender):
        frame(appender, K1, 1, size=10)
        await store.wait_calls(1)  # K1#1 is in flight, outside the queue's bytes
        for seq in range(2, 7):
            frame(appender, K1, seq, size=10)
        assert appender.frames_dropped == 2
        store.gate.set()
        await appender.wait_written(K1)
    assert store.streams[K1] == [1, 4, 5, 6]


@pytest.mark.parametrize("answer", ["fenced", "epoch"])
async def test_a_refused_fixture_is_discarded_and_reported(
    autojump_clock: trio.testing.MockClock, answer: str
) -> None:
    store = FakeAppendStore()
    store.refused[K1] = answer
    store.gate = trio.Event()
    appender, fenced = make(store)
    async with running(appender):
        frame(appender, K1, 1)
        frame(appender, K2, 1)
        await store.wait_calls(1)  # in flight
        frame(appender, K1, 2)
        frame(appender, K1, 3)
        frame(appender, K2, 2)
        store.gate.set()
        await appender.wait_written(K2)
        assert not appender.pending(K1)
    assert fenced.calls == [(K1, answer)]
    assert appender.frames_fenced == 3  # one refused in the batch, two queued behind it
    assert store.streams == {K2: [1, 2]}
    assert [[g.key for g in groups] for groups in store.groups] == [[K1, K2], [K2]]
    assert appender.appended == {K2: 2}


async def test_discard_during_a_failing_batch_stops_its_retry_for_that_fixture(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeAppendStore()
    store.fail = 1_000_000  # Redis is down until the test says otherwise
    appender, fenced = make(store)
    waited = trio.Event()

    async def wait_k1() -> None:
        await appender.wait_written(K1)
        waited.set()

    async with running(appender), trio.open_nursery() as nursery:
        frame(appender, K1, 1)
        frame(appender, K2, 1)
        await store.wait_calls(1)
        nursery.start_soon(wait_k1)
        await trio.testing.wait_all_tasks_blocked()
        assert not waited.is_set()
        assert appender.discard(K1) == 0  # nothing queued: its frame is in the batch
        discarded_at = len(store.calls)
        # wait_written() of the discarded fixture returns now, while Redis is still down.
        with trio.fail_after(1):
            await waited.wait()
        assert store.fail > 0
        store.fail = 0
        await appender.wait_written(K2)
    assert all([g.key for g in groups] == [K2] for groups in store.groups[discarded_at:])
    assert len(store.groups) > discarded_at
    assert store.streams == {K2: [1]}
    assert appender.frames_appended == 1
    assert fenced.calls == []


async def test_discard_of_everything_queued_sends_no_empty_request() -> None:
    store = FakeAppendStore()
    appender, _ = make(store)
    async with running(appender):
        frame(appender, K1, 1)  # wakes the writer...
        assert appender.discard(K1) == 1  # ...which finds nothing left when it runs
        await trio.testing.wait_all_tasks_blocked()
        assert store.calls == []
        assert appender.frames_fenced == 1
        assert appender.queued_bytes == 0
        frame(appender, K1, 2)
        await appender.wait_written(K1)
    assert store.streams == {K1: [2]}


async def test_wait_written_returns_once_written() -> None:
    store = FakeAppendStore()
    store.gate = trio.Event()
    appender, _ = make(store)
    returned = trio.Event()

    async def wait_k1() -> None:
        await appender.wait_written(K1)
        returned.set()

    async with running(appender), trio.open_nursery() as nursery:
        await appender.wait_written(K2)  # nothing of it: at once
        frame(appender, K1, 1)
        nursery.start_soon(wait_k1)
        await store.wait_calls(1)
        await trio.testing.wait_all_tasks_blocked()
        assert not returned.is_set()  # in flight: not written yet
        assert store.streams[K1] == []
        store.gate.set()
        await returned.wait()
        assert store.streams[K1] == [1]
        assert not appender.pending(K1)


async def test_status_rides_with_the_frames_last_one_wins() -> None:
    store = FakeAppendStore()
    appender, _ = make(store)
    async with running(appender):
        appender.status(K1, EPOCH, "connecting", "dialing")
        frame(appender, K1, 1)
        appender.status(K1, EPOCH, "live", "")
        frame(appender, K1, 2)
        appender.status(K2, EPOCH, "error", "refused")
        await appender.wait_written(K1)
        await appender.wait_written(K2)
        assert [[(g.key, seqs(g), g.status) for g in groups] for groups in store.groups] == [
            [(K1, [1, 2], ("live", "")), (K2, [], ("error", "refused"))]
        ]
        # A status alone is a request of its own, with no frames.
        appender.status(K1, EPOCH, "stopped", "bye")
        await appender.wait_written(K1)
    assert [(g.key, seqs(g), g.status) for g in store.groups[-1]] == [(K1, [], ("stopped", "bye"))]
    assert store.statuses == {K1: ("stopped", "bye"), K2: ("error", "refused")}
    assert appender.frames_appended == 2


async def test_requests_start_at_least_append_interval_apart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An idle appender sends a frame at once; frames that come within APPEND_INTERVAL of the
    last request's start wait for it and go together."""
    store = FakeAppendStore()
    appender, _ = make(store)
    async with running(appender):
        t0 = trio.current_time()
        frame(appender, K1, 1)
        await appender.wait_written(K1)
        assert trio.current_time() == t0
        for seq in (2, 3, 4):
            frame(appender, K1, seq)
            await trio.sleep(0.001)
        frame(appender, K2, 1)
        await appender.wait_written(K1)
        assert trio.current_time() - t0 == pytest.approx(APPEND_INTERVAL)
        assert [[(g.key, seqs(g)) for g in groups] for groups in store.groups] == [
            [(K1, [1])],
            [(K1, [2, 3, 4]), (K2, [1])],
        ]
        await trio.sleep(1.0)
        t1 = trio.current_time()
        frame(appender, K2, 2)
        await appender.wait_written(K2)
        assert trio.current_time() == t1
        assert len(store.calls) == 3


class History:
    """The node's memory history for the appender: frames ``1..held`` of :data:`EPOCH` per
    fixture (the oldest ``forgotten`` of them no longer held); records every question."""

    def __init__(self, held: int, forgotten: int = 0) -> None:
        self.held = held
        self.forgotten = forgotten
        self.asked: list[tuple[str, str, int, int]] = []

    def __call__(
        self, key: str, epoch: str, after: int, before: int
    ) -> list[tuple[int, int | None, float, bytes]]:
        self.asked.append((key, epoch, after, before))
        if epoch != EPOCH:
            return []
        start = max(after + 1, self.forgotten + 1)
        return [(s, 1000 + s, 2.0, data(key, s)) for s in range(start, min(before, self.held + 1))]


async def test_a_stream_behind_what_redis_confirmed_gets_the_missing_frames_first() -> None:
    """Redis confirmed K1 up to seq 6, then lost 4..6 (a replica promoted without them): the
    next append of K1 is refused as behind at 3; the appender puts 4..6 from the memory
    history in front of the queued frames and the stream ends up whole, in order, each frame
    once; K2 in the same request is written as usual. Counted as re-appended."""
    store = FakeAppendStore()
    history = History(held=9)
    appender = Appender(
        store, TOKEN, "gw-a", max_bytes=1 << 20, on_fenced=Fenced(), history=history
    )
    async with running(appender):
        for seq in range(1, 7):
            frame(appender, K1, seq)
        await appender.wait_written(K1)
        assert appender.appended[K1] == 6
        del store.streams[K1][3:]  # Redis lost 4..6
        for key, seq in [(K1, 7), (K2, 1), (K1, 8)]:
            frame(appender, key, seq)
        appender.status(K1, EPOCH, "live", "")
        await appender.wait_written(K1)
        await appender.wait_written(K2)
    assert store.streams == {K1: list(range(1, 9)), K2: [1]}
    assert history.asked == [(K1, EPOCH, 3, 7)]
    refused, again = store.groups[-2:]
    assert [(g.key, seqs(g), g.expect) for g in refused] == [(K1, [7, 8], 6), (K2, [1], 0)]
    assert [(g.key, seqs(g), g.expect, g.status) for g in again] == [
        (K1, [4, 5, 6, 7, 8], 3, ("live", ""))
    ]
    assert again[0].frames[0] == (4, 1004, 2.0, data(K1, 4))
    assert store.statuses[K1] == ("live", "")
    assert (appender.frames_reappended, appender.frames_lost) == (3, 0)
    assert appender.appended == {K1: 8, K2: 1}
    assert appender.frames_appended == 12  # 1..6, then 4..8 (re-appended 4..6 too), K2 1
    assert appender.queued_bytes == 0


async def test_frames_lost_beyond_the_memory_history_are_counted() -> None:
    """Redis came back without K1's stream; the memory no longer holds 1..2 of the 5 it had
    confirmed: 3..5 are appended again, 2 counted lost (relays see that gap). A status alone
    (the node's nudge for an idle fixture) finds the stream behind the same way."""
    store = FakeAppendStore()
    history = History(held=5, forgotten=2)
    appender = Appender(
        store, TOKEN, "gw-a", max_bytes=1 << 20, on_fenced=Fenced(), history=history
    )
    async with running(appender):
        for seq in range(1, 6):
            frame(appender, K1, seq)
        await appender.wait_written(K1)
        store.streams[K1].clear()
        appender.status(K1, EPOCH, "live", "")
        await appender.wait_written(K1)
    assert history.asked == [(K1, EPOCH, 0, 6)]
    assert store.streams[K1] == [3, 4, 5]
    assert (appender.frames_reappended, appender.frames_lost) == (3, 2)
    assert appender.appended[K1] == 5
