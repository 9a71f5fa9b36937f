"""``[upstream] connect_rate`` across a cluster: ConnectLimiter with its ``reserve`` hook.

No Redis: :class:`ClusterSlot` models the ``CONNECT`` script (slots at least ``1 / rate`` apart,
whoever asks) on the trio clock, and several limiters share one, as the instances of a cluster
share the Redis key. Everything runs under ``MockClock(autojump_threshold=0)`` (pytest-trio's
``autojump_clock``), so the spacing is checked in exact virtual seconds.
"""

from __future__ import annotations

import itertools
import math

import pytest
import trio
import trio.testing

from gateway.upstream import ConnectLimiter

RATE = 5.0
SPACING = 1.0 / RATE
#: A request's trip to the fake Redis.
LATENCY = 0.003


class ClusterSlot:
    """The CONNECT script: reserve the next slot (at least ``1 / rate`` after the previous
    one, whichever instance reserved it) and say how long to wait for it; 0 while "Redis is
    down" (what ``ClusterNode.reserve_connect`` returns then)."""

    def __init__(self, rate: float) -> None:
        self.spacing = 1.0 / rate
        self.next = -math.inf
        self.down = False
        self.requests = 0

    async def reserve(self) -> float:
        self.requests += 1
        await trio.sleep(LATENCY)
        if self.down:
            return 0.0
        now = trio.current_time()
        slot = max(now, self.next)
        self.next = slot + self.spacing
        return slot - now


class ScriptedReserve:
    """Replies in order: seconds to wait, or None for a request that never answers."""

    def __init__(self, *replies: float | None) -> None:
        self.replies = list(replies)
        self.calls = 0

    async def __call__(self) -> float:
        self.calls += 1
        reply = self.replies.pop(0)
        if reply is None:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        assert reply is not None
        return reply


def assert_spaced(times: list[float], spacing: float) -> None:
    ordered = sorted(times)
    gaps = [b - a for a, b in itertools.pairwise(ordered)]
    assert all(g >= spacing - 1e-9 for g in gaps), gaps


async def grants(limiters: list[ConnectLimiter], per_limiter: int) -> list[tuple[int, float]]:
    """Start *per_limiter* attempts on each limiter at once; (limiter, grant time) each."""
    out: list[tuple[int, float]] = []

    async def one(i: int) -> None:
        await limiters[i].acquire()
        out.append((i, trio.current_time()))

    async with trio.open_nursery() as nursery:
        for _ in range(per_limiter):
            for i in range(len(limiters)):
                nursery.start_soon(one, i)
    return out


async def test_two_instances_share_one_rate(autojump_clock: trio.testing.MockClock) -> None:
    slot = ClusterSlot(RATE)
    a, b = ConnectLimiter(RATE), ConnectLimiter(RATE)
    a.reserve = b.reserve = slot.reserve
    with trio.fail_after(60):
        out = await grants([a, b], per_limiter=10)
    assert sorted(i for i, _ in out) == [0] * 10 + [1] * 10
    times = [t for _, t in out]
    # Spaced in total, not per limiter: 20 attempts take 19 spacings, not 9.
    assert_spaced(times, SPACING)
    assert max(times) - min(times) == pytest.approx(19 * SPACING, abs=0.01)
    assert slot.requests == 20


async def test_without_the_cluster_slot_each_instance_has_the_whole_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The contrast that makes the test above mean something: limiters alone do not share."""
    a, b = ConnectLimiter(RATE), ConnectLimiter(RATE)
    with trio.fail_after(60):
        out = await grants([a, b], per_limiter=10)
    times = sorted(t for _, t in out)
    assert max(times) - min(times) == pytest.approx(9 * SPACING)


async def test_redis_down_falls_back_to_the_local_spacing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slot = ClusterSlot(RATE)
    slot.down = True
    limiter = ConnectLimiter(RATE)
    limiter.reserve = slot.reserve
    with trio.fail_after(60):
        out = await grants([limiter], per_limiter=6)
    times = [t for _, t in out]
    assert_spaced(times, SPACING)
    # Each attempt starts once its (failed) reservation answered: the spacing is measured from
    # there, so a reservation's round trip adds to it.
    assert max(times) - min(times) == pytest.approx(5 * (SPACING + LATENCY))


async def test_local_spacing_counts_from_the_cluster_slot_when_redis_then_fails(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An attempt that waited for a cluster slot starts at that slot: when the next reserve
    cannot tell (Redis just went down), the local spacing is measured from there."""
    slot = ClusterSlot(RATE)
    limiter = ConnectLimiter(RATE)
    limiter.reserve = slot.reserve
    with trio.fail_after(60):
        slot.next = trio.current_time() + 1.0  # other instances hold the next second's slots
        await limiter.acquire()
        first = trio.current_time()
        assert first == pytest.approx(1.0)
        slot.down = True
        await limiter.acquire()
        assert trio.current_time() - first >= SPACING - 1e-9


@pytest.mark.parametrize("stuck_in", ["request", "slot"])
async def test_cancelled_while_waiting_for_the_cluster_takes_no_local_slot(
    autojump_clock: trio.testing.MockClock, stuck_in: str
) -> None:
    """Cancelled during the reserve request or while sleeping until the cluster's slot, an
    attempt took nothing locally: the next waiter goes on at once."""
    limiter = ConnectLimiter(1.0)
    reserve = ScriptedReserve(0.0, None if stuck_in == "request" else 30.0, 0.0)
    limiter.reserve = reserve
    done: list[tuple[str, float]] = []

    async def one(name: str) -> None:
        await limiter.acquire()
        done.append((name, trio.current_time()))

    with trio.fail_after(60):
        await limiter.acquire()
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as doomed_scope:
                async with trio.open_nursery() as doomed:
                    doomed.start_soon(one, "doomed")  # local slot at t0 + 1, then the cluster's
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.start_soon(one, "next")  # queued behind it
                    await trio.sleep_until(t0 + 1.5)
                    assert reserve.calls == 2  # the doomed one is in the cluster's part
                    doomed_scope.cancel()
        assert [name for name, _ in done] == ["next"]
        assert done[0][1] == pytest.approx(t0 + 1.5)
        assert reserve.calls == 3
        # And the local spacing goes on from that real grant.
        limiter.reserve = None
        await limiter.acquire()
        assert trio.current_time() == pytest.approx(t0 + 2.5)
