"""Planned handovers are make-before-break (issue 22: 1; docs/cluster.md, "Planned handovers").

The I/O-free part (:class:`~gateway.cluster.WarmBuffer`: in step by vendor position, which
warm frames to append) in memory; the whole handover with two real gateways in this process,
one simulator and one redis-server (the harness of ``tests/test_cluster_gateway.py``): a
rebalance (an instance joins and takes its share) and a graceful stop of the owner. Subscribers
on both instances must get every frame once and in order, and no fixture may pause longer than
:data:`MAX_GAP` on either instance. Before, the old owner closed its vendor connection and
released the lease, the new owner took it a few rounds later and connected: a stall of a few
rounds plus a vendor connect (4.3-4.7 s per fixture in the probe's rolling restart).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from gateway.cluster import WarmBuffer, WarmSink
from gateway.model import FixtureState
from tests.kit import wait_until
from tests.redis_kit import RedisServer
from tests.test_cluster_gateway import (
    Subscriber,
    assert_contiguous,
    balanced,
    cluster_of,
    ranked,
    settled,
    tracking,
)


#: A round of a second, as in production (lease_ttl >= 4), and the vendor's connect rate at
#: one a second: a break-before-make handover of three fixtures shows its real stall (a
#: round, then three connects a second apart); make-before-break connects in the background.
def _cluster(tmp_path: Path, redis: RedisServer, fixtures: list[str]) -> Any:
    return cluster_of(
        tmp_path,
        redis,
        tracking(fixtures),
        rate_hz=25.0,
        cluster={"lease_ttl": 4.0},
        upstream={"connect_rate": 1.0},
        # Half of it for a stop's handovers: room for three connects on a loaded machine.
        gateway={"drain_timeout": 20.0},
    )


#: The longest pause in fresh frames allowed across a handover (healthy: 0.1-0.3 s at 50 Hz;
#: break-before-make: 2.5 s and more with a 1 s round).
MAX_GAP = 1.5


# -- the I/O-free part ----------------------------------------------------------------------


def _buffer(positions: list[int | None]) -> WarmBuffer:
    buf = WarmBuffer(max_frames=100)
    for p in positions:
        buf.add(f"f{p}", p)
    return buf


def test_in_step_once_the_warm_frames_continue_the_stream() -> None:
    buf = _buffer([11, 12, 13])
    assert buf.in_step(10)  # 11 follows the stream's 10, and the connection is past it
    assert buf.in_step(13)
    assert not buf.in_step(9)  # 10 is in neither: a hole
    assert not buf.in_step(14)  # the connection is behind the stream
    assert not buf.in_step(None)  # a stream without a position: nothing to match
    assert not WarmBuffer().in_step(10)


def test_take_after_gives_exactly_the_frames_after_the_stream() -> None:
    buf = _buffer([11, 12, 13, 14])
    assert buf.take_after(12) == [("f13", 13), ("f14", 14)]
    assert len(buf) == 0
    # Unnumbered frames count only after a numbered frame past the stream.
    buf = _buffer([11, None, 12, None])
    assert buf.take_after(11) == [("f12", 12), ("fNone", None)]
    # The old owner got further than the warm connection: nothing yet (later frames at or
    # below the stream are dropped by the sink's floor), and the buffer still continues it.
    behind = _buffer([11, 12])
    assert behind.continues(15) and not behind.continues(9) and behind.continues(None)
    assert behind.take_after(15) == []


def test_trim_keeps_only_what_the_stream_lacks_and_a_full_buffer_loses_step() -> None:
    buf = _buffer([11, 12, 13])
    buf.trim(12)
    assert len(buf) == 1 and buf.in_step(12) and buf.in_step(13)
    small = WarmBuffer(max_frames=3)
    for p in range(1, 6):
        small.add(f"f{p}", p)
    assert small.overflowed == 2 and not small.in_step(1)  # frames 2 and 3 are gone
    assert small.in_step(2)
    # A hole from the vendor starts coverage again from after it.
    holed = _buffer([1, 2, 5, 6])
    assert holed.covered_from == 5 and not holed.in_step(2) and holed.in_step(4)


class _Target:
    """Stands in for the owner's sink (an OwnedTopic) behind a promoted warm sink."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, int | None]] = []
        self.states: list[FixtureState] = []

    def publish(self, raw: str, position: int | None) -> None:
        self.frames.append((raw, position))

    def set_status(self, state: FixtureState, detail: str) -> None:
        self.states.append(state)


def test_a_promoted_warm_sink_publishes_each_frame_after_the_stream_once() -> None:
    relayed: list[int | None] = [10]
    sink = WarmSink(lambda: relayed[0])
    sink.set_status(FixtureState.LIVE, "")
    for p in (9, 10, 11, 12):  # 9 and 10: the stream has them (trimmed)
        sink.publish(f"f{p}", p)
    assert len(sink.buffer) == 2 and sink.in_step()
    target = _Target()
    # The old owner appended up to 11 before it handed over: 12 and later are this one's.
    assert sink.promote(cast(Any, target), 11) == 1
    for p in (11, 12, 13):  # late duplicates are dropped, the next one goes through
        sink.publish(f"f{p}", p)
    assert target.frames == [("f12", 12), ("f13", 13)]
    assert target.states == [FixtureState.LIVE]


# -- with two gateways ----------------------------------------------------------------------


async def _flowing(subs: list[Subscriber], fixtures: list[str], n: int = 25) -> None:
    """Wait until every subscriber got *n* more frames of every fixture."""
    counts = [{fx: sub.count(fx) for fx in fixtures} for sub in subs]
    await wait_until(
        lambda: all(
            sub.count(fx) >= had[fx] + n
            for sub, had in zip(subs, counts, strict=True)
            for fx in fixtures
        ),
        15,
    )


def _worst(subs: list[Subscriber], fixtures: list[str], since: float) -> dict[str, float]:
    return {f"{fx}@{i}": s.worst_gap(fx, since) for i, s in enumerate(subs) for fx in fixtures}


async def test_a_rebalance_hands_over_without_a_stall(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """gw-a owns every fixture alone; gw-b joins and takes its share (all of them: rendezvous
    ranks gw-b first). gw-b's warm connections get in step before gw-a closes its own."""
    fixtures = ranked(3, "gw-b")
    with trio.fail_after(45):
        async with _cluster(tmp_path, redis_server, fixtures) as c:
            a = await c.start("gw-a")
            await wait_until(lambda: settled([a], fixtures, c.sim), 20)
            async with trio.open_nursery() as nursery:
                on_a = await Subscriber.open(nursery, a)
                for fx in fixtures:
                    await on_a.subscribe("tracking", fx)
                b = await c.start("gw-b")
                on_b = await Subscriber.open(nursery, b)
                for fx in fixtures:
                    await on_b.subscribe("tracking", fx)
                await wait_until(lambda: all(on_b.count(fx) >= 10 for fx in fixtures), 15)
                since = trio.current_time()
                await wait_until(
                    lambda: balanced([a, b], fixtures) and settled([a, b], fixtures, c.sim), 25
                )
                await _flowing([on_a, on_b], fixtures)
                worst = _worst([on_a, on_b], fixtures, since)
                print("longest gaps:", {k: round(v, 2) for k, v in worst.items()})
                await on_a.close()
                await on_b.close()
            for fx in fixtures:
                assert_contiguous(on_a.frames[fx], f"{fx} on gw-a")
                assert_contiguous(on_b.frames[fx], f"{fx} on gw-b")
            assert max(worst.values()) <= MAX_GAP, worst
            assert not on_a.gaps and not on_b.gaps
            assert a.node.handovers == a.node.desk.made == len(fixtures)
            assert b.node.desk.received == b.node.desk.warmed == len(fixtures)
            assert b.node.fenced == a.node.fenced == 0
            c.check_healthy()


async def test_a_graceful_stop_hands_over_without_a_stall(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """gw-a owns every fixture, gw-b relays them; gw-a drains (as on SIGTERM): each fixture
    goes to gw-b with gw-b's connection in step first. gw-b's subscribers see no stall; gw-a's
    get every frame in order until the drain closes them (1001)."""
    fixtures = ranked(3, "gw-a")
    with trio.fail_after(45):
        async with _cluster(tmp_path, redis_server, fixtures) as c:
            a = await c.start("gw-a")
            await wait_until(lambda: settled([a], fixtures, c.sim), 20)
            b = await c.start("gw-b")
            await wait_until(lambda: settled([a, b], fixtures, c.sim) and "gw-b" in a.node.live, 20)
            async with trio.open_nursery() as nursery:
                on_a = await Subscriber.open(nursery, a)
                on_b = await Subscriber.open(nursery, b)
                for fx in fixtures:
                    await on_a.subscribe("tracking", fx)
                    await on_b.subscribe("tracking", fx)
                await wait_until(
                    lambda: all(min(on_a.count(fx), on_b.count(fx)) >= 10 for fx in fixtures), 15
                )
                since = trio.current_time()
                await c.stop(a)
                await on_a.closed.wait()
                await wait_until(lambda: all(b.owns(fx) for fx in fixtures), 10)
                await _flowing([on_b], fixtures)
                worst = _worst([on_b], fixtures, since)
                print("longest gaps on gw-b:", {k: round(v, 2) for k, v in worst.items()})
                await on_b.close()
            assert on_a.close_code == 1001
            for fx in fixtures:
                assert_contiguous(on_a.frames[fx], f"{fx} on gw-a")
                assert_contiguous(on_b.frames[fx], f"{fx} on gw-b")
                # gw-a's subscriber saw no pause either while it was served.
                arrivals = on_a.arrivals[fx]
                assert max(y - x for x, y in itertools.pairwise(arrivals)) <= MAX_GAP
            assert max(worst.values()) <= MAX_GAP, worst
            assert not on_b.gaps
            assert a.node.desk.made == b.node.desk.received == len(fixtures)
            assert b.node.fenced == 0
            c.check_healthy()


async def test_a_successor_never_in_step_falls_back_to_a_release(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gw-b never answers the offers (as an instance of an older version would): after the
    offer's time gw-a releases the leases as before (break-before-make, counted), gw-b takes
    them over from the stream; no frame lost or repeated on either instance."""
    monkeypatch.setattr("gateway.cluster._handover.HANDOVER_TIMEOUT", 3.0)
    fixtures = ranked(2, "gw-b")
    with trio.fail_after(45):
        async with _cluster(tmp_path, redis_server, fixtures) as c:
            a = await c.start("gw-a")
            await wait_until(lambda: settled([a], fixtures, c.sim), 20)
            async with trio.open_nursery() as nursery:
                on_a = await Subscriber.open(nursery, a)
                for fx in fixtures:
                    await on_a.subscribe("tracking", fx)
                b = await c.start("gw-b")
                monkeypatch.setattr(b.node.desk, "_warm_up", lambda key: None)
                on_b = await Subscriber.open(nursery, b)
                for fx in fixtures:
                    await on_b.subscribe("tracking", fx)
                await wait_until(
                    lambda: balanced([a, b], fixtures) and settled([a, b], fixtures, c.sim), 30
                )
                await _flowing([on_a, on_b], fixtures)
                await on_a.close()
                await on_b.close()
            for fx in fixtures:
                assert_contiguous(on_a.frames[fx], f"{fx} on gw-a")
                assert_contiguous(on_b.frames[fx], f"{fx} on gw-b")
            assert a.node.desk.fallbacks == a.node.handovers == len(fixtures)
            assert a.node.desk.made == b.node.desk.received == b.node.desk.warmed == 0
            c.check_healthy()
