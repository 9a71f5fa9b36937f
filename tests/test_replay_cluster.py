"""Drop-in replays in a cluster (issue 23): two real gateways in this process (the harness of
tests/test_cluster_gateway.py), one real redis-server, the simulator.

A replay is served from the instance's own recording when it has one (the owner, recording),
else from the fixture's Redis stream when that reaches the start (the relay, without a
recorder, its memory history far shorter than the match), else passed through to the vendor
(a fixture the cluster joined late). Every wait is a condition with a deadline; everything
binds 127.0.0.1 port 0.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import trio

from tests.kit import wait_until
from tests.redis_kit import RedisServer
from tests.test_cluster_gateway import Member, cluster_of, ranked
from tests.test_replay_dropin import dropin, next_frame

FX = ranked(1, "gw-a", prefix="rpl")[0]
LATE = ranked(1, "gw-a", prefix="late")[0]
SECTIONS = {
    "feeds": {"tracking": {"history": 20}},
    "upstream": {"stall_timeout": 30.0},
}


def _request(fixture: str) -> str:
    replay = {"enabled": True, "packetsPerSecond": 1000, "looped": False}
    return orjson.dumps({"fixtureId": fixture, "replay": replay}).decode()


async def _replayed(member: Member, fixture: str, n: int) -> list[int]:
    """The ix of the first *n* frames of a replay of *fixture* on *member*'s drop-in."""
    async with dropin(member.gw) as ws:
        await ws.send_message(_request(fixture))
        return [(await next_frame(ws))[0] for _ in range(n)]


async def test_a_replay_comes_from_the_recording_else_the_stream_else_the_vendor(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    with trio.fail_after(120):
        async with cluster_of(
            tmp_path,
            redis_server,
            [],
            rate_hz=50,
            extra_sim_fixtures=[("tracking", FX), ("tracking", LATE)],
            **SECTIONS,
        ) as c:
            a = await c.start(
                "gw-a", recorder={"dir": str(tmp_path / "rec-a"), "segment_bytes": 64 * 1024}
            )
            b = await c.start("gw-b")  # no recorder
            a.gw.follow("tracking", FX, -1)  # from ix 0, shared with the cluster
            await wait_until(lambda: a.owns(FX), 20)
            await wait_until(lambda: min(a.seq(FX), b.seq(FX)) >= 150, 30)
            topic_b = b.gw.hub.get("tracking", FX)
            assert topic_b is not None and topic_b.first_held > 1  # the start: not in memory
            await wait_until(lambda: topic_b.first_available == 1, 10)  # the stream has it

            assert await _replayed(b, FX, 150) == list(range(150))
            assert b.gw.replays.counters.total["stream"] == 1
            assert await _replayed(a, FX, 150) == list(range(150))
            assert a.gw.replays.counters.total["recording"] == 1
            assert c.sim.replay_requests == []

            # Joined late (the vendor's ix 0 is nowhere in the cluster): the vendor replays it.
            await wait_until(lambda: c.sim.fixtures[LATE].available() > 100, 20)
            a.gw.follow("tracking", LATE, 0)
            await wait_until(lambda: b.seq(LATE) > 0, 20)
            assert await _replayed(b, LATE, 50) == list(range(50))
            assert [r.fixture_id for r in c.sim.replay_requests] == [LATE]
            assert b.gw.replays.counters.total["vendor"] == 1
            await c.stop(b)
            await c.stop(a)
