"""Hot standby: ``[cluster] standby = true`` (issue 22: 2; docs/cluster.md, "Hot standby").

For every fixture a second instance (rendezvous, the owner left out) keeps a warm vendor
connection; when the owner dies the standby takes the lease first and goes on live on that
connection: no reconnect on the failure path, so the stall after a kill is ``lease_ttl`` plus
a round whatever the dead instance owned. Without it, the survivors wait their rank's rounds
and then connect each fixture at the vendor's connect rate.

- the I/O-free rules: who stands by (:func:`~gateway.cluster.standby_for`), the standby's free
  lease taken at once (``LeaseTable.plan(first=...)``), a warm connection that resumed after
  the stream's last position continuing it before any frame arrived (a quiet fixture);
- three real gateways in this process (the harness of ``tests/test_cluster_gateway.py``: one
  simulator, one redis-server), the owner killed without a goodbye: every fixture taken over
  by its standby without a vendor reconnect, every frame once on the survivors' subscribers,
  the longest pause per fixture at most ``lease_ttl`` + 2 s, new standbys chosen after;
- a planned handover (a graceful stop) to the instance that stands by uses its connection;
- a quiet fixture (no frame for a while) is taken over on the standby's connection too;
- one test with real ``dde-gateway run`` processes (the kit of
  ``tests/test_cluster_process.py``): kill -9 of the owner of 20 fixtures.
"""

from __future__ import annotations

import itertools
import signal
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from gateway.cluster import LeaseTable, WarmBuffer, rank, standby_for, tick_interval
from gateway.simulator import Simulator
from tests.cluster_proc_kit import breaks, longest_pause, report, wait_for
from tests.cluster_proc_kit import cluster as process_cluster
from tests.kit import wait_until
from tests.redis_kit import RedisServer
from tests.test_cluster_gateway import (
    Member,
    Subscriber,
    assert_contiguous,
    cluster_of,
    tracking,
)
from tests.test_cluster_process import GUARD, INSTANCES, LEASE_TTL, SETTINGS

TTL = 2.0
#: The promise: the longest pause in fresh frames after the owner dies (healthy here: about
#: ``TTL`` + a round, 2.5-3 s; without standby the survivors' rank and retake rounds and a
#: connect per fixture at 1/s come on top: 5 s and more).
MAX_STALL = TTL + 2.0
THREE = ("gw-a", "gw-b", "gw-c")


def ranked3(n: int, first: str, *, prefix: str = "sb") -> list[str]:
    """*n* fixture ids whose rendezvous order over :data:`THREE` puts *first* first, their
    second-ranked instances alternating between the two others (both stand by for some)."""
    out: list[str] = []
    seconds: dict[str, int] = {}
    for i in itertools.count():
        fx = f"{prefix}-{first[-1]}-{i:03d}"
        order = rank(f"tracking/{fx}", THREE)
        if order[0] != first or seconds.get(order[1], 0) >= (n + 1) // 2:
            continue
        seconds[order[1]] = seconds.get(order[1], 0) + 1
        out.append(fx)
        if len(out) == n:
            return out
    raise AssertionError("unreachable")


# -- the I/O-free rules -------------------------------------------------------------------------


def test_the_standby_is_the_first_ranked_instance_but_the_owner() -> None:
    key = "tracking/f1"
    order = rank(key, THREE)
    assert standby_for(key, order[0], THREE) == order[1]  # steady state: the second-ranked
    assert standby_for(key, order[1], THREE) == order[0]  # the owner is another: the first
    assert standby_for(key, None, THREE) == order[0]
    assert standby_for(key, "gw-a", ["gw-a"]) is None  # nobody else
    assert standby_for(key, "gw-a", []) is None
    # An instance that joins changes the standby only where it ranks above the standby.
    for i in range(50):
        k = f"tracking/x{i}"
        before = rank(k, THREE)
        after = standby_for(k, before[0], [*THREE, "gw-d"])
        joined = rank(k, [*THREE, "gw-d"])
        expected = "gw-d" if joined.index("gw-d") <= 1 else before[1]
        assert after == expected, (k, before, joined)


def test_a_standby_takes_a_free_lease_at_once_but_not_right_after_redis_came_back() -> None:
    """The standby ranks second (and the dead owner, its last holder, is still listed, which
    adds the retake rounds): without ``first`` it would wait 1 + RETAKE_ROUNDS rounds."""
    key = "tracking/f1"
    owner, standby = rank(key, ["gw-a", "gw-b"])
    table = LeaseTable(standby, TTL, token=f"{standby}/n")
    live = {owner, standby}
    table.observed({key: f"{owner}/n"}, sent=0.0)
    table.plan(1.0, followed={key}, live=live)
    table.observed({key: None}, sent=1.0)  # the dead owner's lease ran out
    assert key not in table.plan(1.1, followed={key}, live=live).acquire
    assert key in table.plan(1.1, followed={key}, live=live, first={key}).acquire
    # Just after Redis answered again the owner may not be listed yet: no shortcut then.
    table.unreachable()
    table.observed({key: None}, sent=2.0)
    assert key not in table.plan(2.1, followed={key}, live=live, first={key}).acquire
    later = 2.0 + TTL
    assert key in table.plan(later, followed={key}, live=live, first={key}).acquire
    assert tick_interval(TTL) == TTL / 4


def test_a_warm_connection_resumed_after_the_stream_continues_it_before_any_frame() -> None:
    """A quiet fixture: the standby resumed after the stream's last position R and has not
    received a frame since. It continues the stream (every frame after R comes on it) and
    is in step with a stream ending at R; a vendor that could not resume that far (the first
    frame after a hole) starts coverage again from that frame."""
    buf = WarmBuffer(max_frames=100)
    assert not buf.continues(40)
    buf.resume_after(40)
    assert buf.continues(40) and buf.in_step(40) and not buf.in_step(41)
    assert buf.take_after(40) == []
    buf.add("f41", 41)
    assert buf.in_step(40) and buf.in_step(41)
    holed = WarmBuffer(max_frames=100)
    holed.resume_after(40)
    holed.add("f45", 45)
    assert holed.covered_from == 45 and not holed.continues(40) and holed.continues(44)


# -- with gateways in this process ----------------------------------------------------------------


def _cluster(tmp_path: Path, redis: RedisServer, fixtures: list[str], **extra: Any) -> Any:
    """Standby on, ``lease_ttl`` 2 (a round of 0.5 s), the vendor's connects at 2 a second."""
    return cluster_of(
        tmp_path,
        redis,
        tracking(fixtures),
        rate_hz=25.0,
        cluster={"lease_ttl": TTL, "standby": True, **extra},
        upstream={"connect_rate": 2.0},
        gateway={"drain_timeout": 20.0},
    )


def standing_by(member: Member, fx: str) -> bool:
    """*member* holds a standby connection of *fx* in step with the stream."""
    sink = member.node.desk.warm.get(f"tracking/{fx}")
    return sink is not None and sink.standby and sink.target is None and sink.in_step()


def attempts(sim: Simulator, fx: str) -> int:
    """Connection attempts the simulator saw for *fx*."""
    return sum(1 for a in sim.attempts if a.fixture_id == fx)


def connects(member: Member, fx: str) -> int:
    """Connections *member*'s upstream of *fx* opened (its supervisor's count; 0: none)."""
    handle = member.gw.supervisor.get("tracking", fx)
    return 0 if handle is None else handle.status.counters.connects


def ready_with_standby(members: list[Member], fixtures: list[str], owner: Member) -> bool:
    """*owner* owns every fixture, each has its standby in step where rendezvous says, and
    no other instance holds a warm connection."""
    names = [m.name for m in members]
    by_name = {m.name: m for m in members}
    for fx in fixtures:
        if not owner.owns(fx):
            return False
        want = standby_for(f"tracking/{fx}", owner.name, names)
        for m in members:
            if m is not owner and standing_by(m, fx) != (m.name == want):
                return False
        if want is None or connects(by_name[want], fx) < 1:
            return False
    return True


async def test_a_killed_owners_fixtures_go_live_on_their_standbys_without_a_reconnect(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """gw-a owns every fixture, gw-b and gw-c each stand by for some; gw-a dies without a
    goodbye. Each fixture's standby takes the lease in its first round after it ran out and
    goes on on its warm connection: the simulator sees no new connection for the take-over,
    the survivors' subscribers every frame once, no pause longer than MAX_STALL. Then each
    fixture gets a new standby: the other survivor."""
    fixtures = ranked3(4, "gw-a")
    with trio.fail_after(90):
        async with _cluster(tmp_path, redis_server, fixtures) as c:
            a = await c.start("gw-a")
            await wait_until(lambda: all(a.owns(fx) for fx in fixtures), 20)
            b, c3 = await c.start("gw-b"), await c.start("gw-c")
            members = [a, b, c3]
            await wait_until(lambda: ready_with_standby(members, fixtures, a), 30)
            # Counted from the steady state on: while gw-c joined, gw-b dropped the standby
            # connections gw-c took over, and a dropped one closes in the background (it
            # published nothing, but the simulator counts it until it is gone).
            c.max_sessions.clear()
            survivors = [b, c3]
            # The standbys' connections, by fixture: the ones that must carry on.
            standby_of = {fx: next(m for m in survivors if standing_by(m, fx)) for fx in fixtures}
            async with trio.open_nursery() as nursery:
                subs = [await Subscriber.open(nursery, m) for m in survivors]
                for sub in subs:
                    for fx in fixtures:
                        await sub.subscribe("tracking", fx)
                await wait_until(
                    lambda: all(s.count(fx) >= 10 for s in subs for fx in fixtures), 15
                )
                tried = {fx: attempts(c.sim, fx) for fx in fixtures}
                killed = trio.current_time()
                await c.kill(a)
                await wait_until(lambda: all(standby_of[fx].owns(fx) for fx in fixtures), 15)
                took = trio.current_time() - killed
                # The take-over made no connection: the same attempt count, the same
                # connection on each new owner (its first and only one).
                assert {fx: attempts(c.sim, fx) for fx in fixtures} == tried
                assert all(connects(standby_of[fx], fx) == 1 for fx in fixtures)
                have = [{fx: s.count(fx) for fx in fixtures} for s in subs]
                await wait_until(
                    lambda: all(
                        s.count(fx) >= had[fx] + 25
                        for s, had in zip(subs, have, strict=True)
                        for fx in fixtures
                    ),
                    15,
                )
                stalls = {
                    f"{fx}@{m.name}": s.worst_gap(fx, killed)
                    for s, m in zip(subs, survivors, strict=True)
                    for fx in fixtures
                }
                print(
                    f"all taken over {took:.2f} s after the kill; longest pauses:",
                    {k: round(v, 2) for k, v in stalls.items()},
                )
                # A new standby for each: the other survivor, connected in the background.
                await wait_until(lambda: _restood(survivors, fixtures), 20)
                for sub in subs:
                    await sub.close()
            for sub, m in zip(subs, survivors, strict=True):
                for fx in fixtures:
                    assert_contiguous(sub.frames[fx], f"{fx} on {m.name}")
                assert not sub.gaps
            assert max(stalls.values()) <= MAX_STALL, stalls
            promoted = sum(m.node.standby.promoted for m in survivors)
            assert promoted == len(fixtures)
            assert sum(m.node.leases_gained for m in survivors) == len(fixtures)
            assert all(m.node.fenced == 0 for m in survivors)
            c.check_healthy()


def _restood(members: list[Member], fixtures: list[str]) -> bool:
    """Every fixture owned by one of *members* with the other standing by, in step."""
    for fx in fixtures:
        owners = [m for m in members if m.owns(fx)]
        if len(owners) != 1:
            return False
        if not all(standing_by(m, fx) for m in members if m is not owners[0]):
            return False
    return True


async def test_a_graceful_stop_hands_over_on_the_standbys_connection(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """gw-a owns every fixture, gw-b stands by for all; gw-a drains (SIGTERM). The offer
    names gw-b, whose standby connection is in step: it answers at once and takes over on
    it. No warm connection of its own for the handover, no new vendor connection."""
    fixtures = ranked3(2, "gw-a")
    with trio.fail_after(60):
        async with _cluster(tmp_path, redis_server, fixtures) as c:
            a = await c.start("gw-a")
            await wait_until(lambda: all(a.owns(fx) for fx in fixtures), 20)
            b = await c.start("gw-b")
            await wait_until(lambda: ready_with_standby([a, b], fixtures, a), 30)
            async with trio.open_nursery() as nursery:
                sub = await Subscriber.open(nursery, b)
                for fx in fixtures:
                    await sub.subscribe("tracking", fx)
                await wait_until(lambda: all(sub.count(fx) >= 10 for fx in fixtures), 15)
                tried = {fx: attempts(c.sim, fx) for fx in fixtures}
                since = trio.current_time()
                await c.stop(a)
                await wait_until(lambda: all(b.owns(fx) for fx in fixtures), 10)
                have = {fx: sub.count(fx) for fx in fixtures}
                await wait_until(lambda: all(sub.count(fx) >= have[fx] + 25 for fx in fixtures))
                worst = {fx: sub.worst_gap(fx, since) for fx in fixtures}
                await sub.close()
            for fx in fixtures:
                assert_contiguous(sub.frames[fx], f"{fx} on gw-b")
            assert {fx: attempts(c.sim, fx) for fx in fixtures} == tried
            assert all(connects(b, fx) == 1 for fx in fixtures)
            assert max(worst.values()) <= 1.5, worst
            assert a.node.desk.made == b.node.desk.received == len(fixtures)
            assert b.node.desk.warmed == 0  # no connection opened for the offers
            assert b.node.standby.started == len(fixtures)
            assert b.node.standby.promoted == b.node.standby.dropped == 0
            c.check_healthy()


async def test_a_quiet_fixture_is_taken_over_on_the_standbys_connection(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A fixture whose vendor has sent its last frame (a recording of 30 frames, ix 0-29): the
    standby's connection has nothing to keep (the stream has everything it received). When the owner
    dies the standby takes over on that connection all the same (it continues the stream:
    every later frame would come on it). Before, a warm connection that had received nothing
    did not count as continuing the stream: closed, and a new connection opened."""
    quiet = ranked3(1, "gw-a", prefix="quiet")
    recording = tmp_path / "quiet.jsonl"
    source = Simulator(tokens=set()).add_fixture("src")
    recording.write_text("".join(source.frame_text(ix) + "\n" for ix in range(30)))
    with trio.fail_after(60):
        async with _cluster(tmp_path, redis_server, quiet) as c:
            (fx,) = quiet
            c.sim.remove_fixture(fx)
            c.sim.add_fixture(fx, recording=recording)
            a = await c.start("gw-a")

            def at_the_end(m: Member) -> bool:
                topic = m.gw.hub.get("tracking", fx)
                frame = None if topic is None else topic.latest_frame
                return frame is not None and frame.position == 29

            await wait_until(lambda: a.owns(fx) and at_the_end(a), 20)
            b = await c.start("gw-b")  # after the last frame: its standby never gets one
            sink = None

            def quiet_and_standing_by() -> bool:
                nonlocal sink
                sink = b.node.desk.warm.get(f"tracking/{fx}")
                return (
                    ready_with_standby([a, b], quiet, a)
                    and a.seq(fx) == b.seq(fx) > 0
                    and sink is not None
                    and sink.stream_position() == 29  # the stream has the last frame (ix 29)
                    and len(sink.buffer) == 0  # and the standby keeps nothing beyond it
                )

            await wait_until(quiet_and_standing_by, 30)
            # Resumed after 29, nothing received: only the resume point says it continues.
            assert sink is not None and (sink.buffer.covered_from, sink.buffer.last) == (30, 29)
            last = b.seq(fx)
            async with trio.open_nursery() as nursery:
                sub = await Subscriber.open(nursery, b)
                await sub.subscribe("tracking", fx)
                tried = attempts(c.sim, fx)
                await c.kill(a)
                await wait_until(lambda: b.owns(fx), 15)
                await wait_until(lambda: sub.states[fx][-1:] == ["live"], 10)
                await sub.close()
            assert attempts(c.sim, fx) == tried
            assert connects(b, fx) == 1
            assert b.node.standby.promoted == 1 and b.node.standby.dropped == 0
            assert b.seq(fx) == last and not sub.frames[fx]  # nothing new, nothing twice
            c.check_healthy()


# -- real processes -------------------------------------------------------------------------------

#: Twenty fixtures that rendezvous hashing gives to gw-a (so gw-b stands by for all of them).
PROCESS_FIXTURES = [
    fx
    for fx in (f"sb-{n:03d}" for n in range(200))
    if rank(f"tracking/{fx}", INSTANCES)[0] == "gw-a"
][:20]


@pytest.mark.slow
async def test_kill_9_of_the_owner_of_20_fixtures_with_standby_processes(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Two ``dde-gateway run`` processes with ``standby = true``; gw-a owns 20 fixtures,
    gw-b stands by for all of them and relays them to its subscriber. kill -9 of gw-a: gw-b
    takes each over on its standby connection (no vendor connection attempt after the kill),
    its subscriber sees every frame once, in order, and no fixture pauses longer than
    ``lease_ttl`` + 2 s."""
    fixtures = PROCESS_FIXTURES
    assert len(fixtures) == 20
    with trio.fail_after(GUARD):
        async with process_cluster(
            tmp_path,
            redis_server,
            instances=INSTANCES,
            fixtures=fixtures,
            settings=attrs.evolve(SETTINGS, extra=("standby = true",)),
        ) as c:
            a, b = c.nodes["gw-a"], c.nodes["gw-b"]

            async def standing_by_all() -> bool:
                if not await a.owns(fixtures):
                    return False
                views = await b.views()
                cluster = await b.cluster()
                return cluster["standing_by"] == len(fixtures) and all(
                    views[fx]["role"] == "relay" and views[fx]["upstream"]["frames"] > 0
                    for fx in fixtures
                )

            took = await wait_for(standing_by_all, "gw-a owns all, gw-b stands by for all")
            report(f"standby: gw-b stands by for all {len(fixtures)} fixtures after {took:.2f} s")
            instances = {i["name"]: i["standbys"] for i in (await b.cluster())["instances"]}
            assert instances == {"gw-a": 0, "gw-b": len(fixtures)}, instances
            wb = await c.watch(b)
            await wait_for(lambda: wb.got_since(0, 25, fixtures), "frames on gw-b")
            before = {fx: attempts(c.sim, fx) for fx in fixtures}

            killed = trio.current_time()
            a.process.kill()
            owned = await wait_for(lambda: b.owns(fixtures), "gw-b owns every fixture")
            await wait_for(lambda: wb.got_since(killed + owned, 25, fixtures), "frames again")
            pauses = {fx: longest_pause(wb.frames[fx], killed)[0] for fx in fixtures}
            report(
                f"standby, kill -9: gw-b owned all {len(fixtures)} after {owned:.2f} s; longest "
                f"pause per fixture {min(pauses.values()):.2f}-{max(pauses.values()):.2f} s "
                f"(lease_ttl {LEASE_TTL:g})"
            )
            assert await a.process.wait() == -signal.SIGKILL
            # Every frame once, in order (seq and vendor ix): none lost, none twice.
            broken = {fx: breaks(wb.frames[fx]) for fx in fixtures if breaks(wb.frames[fx])}
            assert not broken, broken
            assert all(len(s) == 1 for s in wb.subscribed.values()), wb.subscribed
            assert not wb.other, wb.other
            assert max(pauses.values()) <= LEASE_TTL + 2.0, pauses
            # No reconnect on the failure path: not one attempt at the vendor since the kill.
            assert {fx: attempts(c.sim, fx) for fx in fixtures} == before
            # (gw-b may have owned them for a moment at the start, before the rebalance.)
            assert (await b.cluster())["counters"]["standby_promoted"] == len(fixtures)
            promoted = b.lines("standby promoted, took over from gw-a without a reconnect")
            assert len(promoted) == len(fixtures), promoted
