"""The cluster's relay (gateway.cluster.Relay) over a fake store: no Redis, no sockets.

:class:`FakeReadStore` has ``RedisStore.read``'s signature; each read blocks until the test
answers it (a batch, or ``RedisUnavailable``), so every step is driven by the test and
observed through the reads the relay makes next, never by sleeping. Retry pauses run under
``MockClock(autojump_threshold=0)`` (pytest-trio's ``autojump_clock``).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from gateway.cluster import (
    CATCH_UP_CHUNK,
    HOLD_BACKLOG,
    HOLD_MAX,
    READ_INTERVAL,
    Entry,
    RedisUnavailable,
    Relay,
)
from tests.kit import wait_until

K1, K2 = "tracking/1", "tracking/2"

Batch = list[tuple[str, list[Entry]]]


def failing(x: Relay) -> bool:
    """``x.failing``, read through a call: mypy would otherwise narrow it between two asserts."""
    return x.failing


class Read:
    """One read the relay made: what it asked, and the test's answer."""

    def __init__(self, after: Mapping[str, int], block: float) -> None:
        self.after = dict(after)
        self.block = block
        self.cancelled = False
        self.reply: Batch | RedisUnavailable = []
        self.done = trio.Event()

    def answer(self, batch: Batch) -> None:
        self.reply = batch
        self.done.set()

    def fail(self, message: str = "redis unreachable: Connection reset by peer") -> None:
        self.reply = RedisUnavailable(message)
        self.done.set()


class FakeReadStore:
    def __init__(self) -> None:
        self.reads: list[Read] = []
        self._send, self._receive = trio.open_memory_channel[Read](math.inf)

    async def read(self, after: Mapping[str, int], *, block: float) -> Batch:
        r = Read(after, block)
        self.reads.append(r)
        self._send.send_nowait(r)
        try:
            await r.done.wait()
        finally:
            r.cancelled = not r.done.is_set()
        if isinstance(r.reply, RedisUnavailable):
            raise r.reply
        return r.reply

    async def next_read(self) -> Read:
        """The relay's next read (its previous answer has been delivered by then)."""
        return await self._receive.receive()


class Sink:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        #: What backlog() answers; each entry handed over adds ``per_entry``.
        self.full = 0.0
        self.per_entry = 0.0

    def relay(self, entries: Sequence[Entry]) -> None:
        self.batches.append([e.seq for e in entries])
        self.full += self.per_entry * len(entries)

    def backlog(self) -> float:
        return self.full

    @property
    def seqs(self) -> list[int]:
        return [seq for batch in self.batches for seq in batch]


def entry(seq: int, received_at: float | None = None) -> Entry:
    return Entry(
        seq=seq,
        position=10 * seq,
        received_at=time.time() if received_at is None else received_at,
        data=f"frame {seq}".encode(),
    )


def entries(*seqs: int) -> list[Entry]:
    return [entry(seq) for seq in seqs]


@asynccontextmanager
async def running(relay: Relay) -> AsyncIterator[None]:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.run)
            yield
            nursery.cancel_scope.cancel()


async def test_entries_go_to_their_sink_in_order_and_positions_advance() -> None:
    store = FakeReadStore()
    relay = Relay(store, block=0.5)
    s1, s2 = Sink(), Sink()
    async with running(relay):
        relay.follow(K1, after=0, sink=s1)
        relay.follow(K2, after=5, sink=s2)
        r = await store.next_read()
        assert (r.after, r.block) == ({K1: 0, K2: 5}, 0.5)
        r.answer([(K1, entries(1, 2)), (K2, entries(6))])
        r = await store.next_read()
        assert r.after == {K1: 2, K2: 6}
        assert (s1.batches, s2.batches) == ([[1, 2]], [[6]])
        r.answer([])  # the block ran out: nothing new
        r = await store.next_read()
        assert r.after == {K1: 2, K2: 6}
        r.answer([(K1, entries(3)), (K2, [])])
        r = await store.next_read()
        assert r.after == {K1: 3, K2: 6}
    assert s1.batches == [[1, 2], [3]]
    assert s2.batches == [[6]]
    assert (relay.position(K1), relay.position(K2)) == (3, 6)
    assert relay.keys == {K1, K2}
    assert relay.entries_relayed == 4


async def test_an_idle_relay_reads_nothing_until_a_fixture_is_followed() -> None:
    store = FakeReadStore()
    relay = Relay(store)
    async with running(relay):
        await trio.testing.wait_all_tasks_blocked()
        assert store.reads == []
        relay.follow(K1, after=0, sink=Sink())
        assert (await store.next_read()).after == {K1: 0}


async def test_a_fixture_followed_during_a_read_joins_the_next_one() -> None:
    """A read in progress is never cancelled (that would cost its connection): it returns
    within its short block, and the next read includes the new fixture."""
    store = FakeReadStore()
    relay = Relay(store)
    s1, s2, s1_again = Sink(), Sink(), Sink()
    async with running(relay):
        relay.follow(K1, after=0, sink=s1)
        first = await store.next_read()
        relay.follow(K2, after=7, sink=s2)
        await trio.testing.wait_all_tasks_blocked()
        assert not first.cancelled
        assert len(store.reads) == 1
        first.answer([(K1, entries(1))])
        second = await store.next_read()
        assert second.after == {K1: 1, K2: 7}
        # Following a fixture again replaces its sink and position; what the read in flight
        # brings for the old position is dropped.
        relay.follow(K1, after=10, sink=s1_again)
        second.answer([(K1, entries(2)), (K2, entries(8))])
        third = await store.next_read()
        assert third.after == {K1: 10, K2: 8}
        third.answer([(K1, entries(11))])
        assert (await store.next_read()).after == {K1: 11, K2: 8}
    assert (s1.batches, s1_again.batches, s2.batches) == ([[1]], [[11]], [[8]])


async def test_unfollow_stops_delivery_even_for_a_batch_in_flight() -> None:
    store = FakeReadStore()
    relay = Relay(store)
    s1, s2 = Sink(), Sink()
    async with running(relay):
        relay.follow(K1, after=0, sink=s1)
        relay.follow(K2, after=0, sink=s2)
        r = await store.next_read()
        relay.unfollow(K2)
        assert not r.cancelled  # no need to interrupt: what comes back is filtered
        r.answer([(K2, entries(1)), (K1, entries(1))])
        r = await store.next_read()
        assert r.after == {K1: 1}
        assert (s1.batches, s2.batches) == ([[1]], [])
        assert relay.position(K2) is None
        assert relay.entries_relayed == 1
        # The last one gone while a read is in flight: its batch is dropped, no read follows.
        relay.unfollow(K1)
        r.answer([(K1, entries(2))])
        await trio.testing.wait_all_tasks_blocked()
        assert len(store.reads) == 2
    assert s1.batches == [[1]]
    assert relay.keys == frozenset()


async def test_failing_is_set_while_reads_fail_and_cleared_by_the_next_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeReadStore()
    relay = Relay(store)
    sink = Sink()
    async with running(relay):
        relay.follow(K1, after=4, sink=sink)
        r = await store.next_read()
        t0 = trio.current_time()
        r.fail()
        r = await store.next_read()
        # Retried after a pause, from the same position.
        assert trio.current_time() - t0 == pytest.approx(0.1)
        assert r.after == {K1: 4}
        assert failing(relay)
        assert relay.last_error == "redis unreachable: Connection reset by peer"
        t0 = trio.current_time()
        r.fail("redis timed out")
        r = await store.next_read()
        assert trio.current_time() - t0 == pytest.approx(0.2)  # doubled
        assert (relay.failures, relay.last_error) == (2, "redis timed out")
        r.answer([(K1, entries(5))])
        r = await store.next_read()
        assert not failing(relay)
        assert r.after == {K1: 5}
        t0 = trio.current_time()
        r.fail()
        await store.next_read()
        assert trio.current_time() - t0 == pytest.approx(0.1)  # the pause started over
    assert sink.batches == [[5]]


async def test_retry_pauses_are_capped_at_a_second(autojump_clock: trio.testing.MockClock) -> None:
    """Reads failing for long (Redis down, a Sentinel failover): the pause doubles from 0.1 s
    up to 1 s, so relayed frames flow again within about a second of Redis being back."""
    store = FakeReadStore()
    relay = Relay(store)
    async with running(relay):
        relay.follow(K1, after=0, sink=Sink())
        r = await store.next_read()
        pauses = []
        for _ in range(7):
            t0 = trio.current_time()
            r.fail()
            r = await store.next_read()
            pauses.append(round(trio.current_time() - t0, 6))
        r.answer([])
    assert pauses == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]


async def test_a_relay_left_with_nothing_to_read_is_not_failing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A read failed, then the last relayed fixture was taken over (unfollowed): nothing is
    failing any more, so the instance must not stay degraded because of it."""
    store = FakeReadStore()
    relay = Relay(store)
    async with running(relay):
        relay.follow(K1, after=0, sink=Sink())
        (await store.next_read()).fail()
        r = await store.next_read()
        assert failing(relay)
        relay.unfollow(K1)
        assert not failing(relay)
        r.answer([])
        await trio.testing.wait_all_tasks_blocked()  # idle: nothing to read
        assert len(store.reads) == 2
        # Failing again while the last fixture goes: cleared once the relay is idle.
        relay.follow(K1, after=0, sink=Sink())
        r = await store.next_read()
        relay.unfollow(K1)
        r.fail()
        await wait_until(lambda: relay.failures == 2, timeout=5.0)
        assert failing(relay)  # in its retry pause (0.1 s), with nothing left to retry
        await wait_until(lambda: not failing(relay), timeout=5.0)
        assert len(store.reads) == 3


async def test_lag_is_recorded_per_fixture() -> None:
    store = FakeReadStore()
    relay = Relay(store)
    async with running(relay):
        relay.follow(K1, after=0, sink=Sink())
        relay.follow(K2, after=0, sink=Sink())
        r = await store.next_read()
        before = time.time()
        r.answer(
            [
                (K1, [entry(1, before - 60.0), entry(2, before - 5.0)]),  # the last one counts
                (K2, [entry(1, math.nan)]),  # no usable receive time: 0, not NaN
            ]
        )
        await store.next_read()
        after = time.time()
        assert 5.0 <= relay.lag[K1] <= 5.0 + (after - before) + 1e-6
        assert relay.lag[K2] == 0.0
        relay.unfollow(K1)
        assert set(relay.lag) == {K2}


async def test_reads_start_at_least_read_interval_apart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A read that returned at once is followed by the next one READ_INTERVAL after it
    started; after a read that took longer, the next one starts at once."""
    store = FakeReadStore()
    relay = Relay(store, block=0.5)
    sink = Sink()
    async with running(relay):
        relay.follow(K1, after=0, sink=sink)
        first = await store.next_read()
        t0 = trio.current_time()
        first.answer([(K1, entries(1))])
        second = await store.next_read()
        assert trio.current_time() - t0 == pytest.approx(READ_INTERVAL)
        assert second.after == {K1: 1}
        await trio.sleep(1.0)
        t1 = trio.current_time()
        second.answer([(K1, entries(2))])
        third = await store.next_read()
        assert trio.current_time() == t1
        assert third.after == {K1: 2}
        assert sink.batches == [[1], [2]]


async def test_a_catch_up_goes_no_faster_than_the_subscribers_take_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 22 5f: a read bringing many entries (Redis back after a pause) hands them over
    only while the subscribers' queues have room, at most CATCH_UP_CHUNK per stream and read;
    a stream whose subscribers are full is left out of the reads; one held for HOLD_MAX
    without progress hands a chunk over anyway (the subscriber's slow policy decides)."""
    store = FakeReadStore()
    relay = Relay(store, interval=0.0)
    full, free = Sink(), Sink()
    full.per_entry = HOLD_BACKLOG / 8  # eight entries fill it to the hold mark
    n = 3 * CATCH_UP_CHUNK

    async def scenario() -> None:
        async with running(relay):
            relay.follow(K1, after=0, sink=full)
            relay.follow(K2, after=0, sink=free)
            r = await store.next_read()
            r.answer([(K1, entries(*range(1, n + 1))), (K2, entries(*range(1, n + 1)))])
            r = await store.next_read()
            # K1's subscribers took eight and are full: held, left out; K2 moved a chunk.
            assert full.seqs == list(range(1, 9))
            assert free.seqs == list(range(1, CATCH_UP_CHUNK + 1))
            assert r.after == {K2: CATCH_UP_CHUNK}
            assert relay.holds == 1
            r.answer([(K2, entries(*range(CATCH_UP_CHUNK + 1, n + 1)))])
            r = await store.next_read()
            assert r.after == {K2: 2 * CATCH_UP_CHUNK}
            r.answer([])
            # K1's subscribers drained: it is read again from where it stopped.
            full.full = 0.0
            r = await store.next_read()
            assert r.after[K1] == 8
            r.answer([(K1, entries(*range(9, n + 1)))])
            r = await store.next_read()
            assert full.seqs == list(range(1, 17))
            r.answer([])
            # Never drained again: after HOLD_MAX without progress, a chunk goes anyway.
            r = await store.next_read()
            assert K1 not in r.after
            r.answer([])
            await trio.sleep(HOLD_MAX)
            (await store.next_read()).answer([])  # the read made before the time passed
            r = await store.next_read()
            assert r.after[K1] == 16
            r.answer([(K1, entries(*range(17, n + 1)))])
            r = await store.next_read()
            assert full.seqs == list(range(1, 17 + CATCH_UP_CHUNK))
            r.answer([])

    await scenario()
