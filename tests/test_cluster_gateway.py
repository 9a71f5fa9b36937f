"""Several real gateways as one cluster, in this process: one simulator, one redis-server.

Each :class:`~gateway.service.Gateway` runs in a cancel scope of its own, so one can leave
cleanly (drain: its leases are released at once) or be *killed*: cancelled without its
goodbye, so its leases and heartbeat stay in Redis until they expire, as after ``kill -9``.
Everything binds 127.0.0.1 port 0; every wait is a condition with a deadline. ``lease_ttl`` is
2 s, so a round is 0.5 s and a dead owner's fixtures move within about 3 s.

What the cluster must show (docs/cluster.md): one owner and one vendor connection per
fixture; every instance serving every fixture under the same seq and epoch; balance by
rendezvous hashing; failover and resume across instances without gap or duplicate; fixtures
followed through the API or on demand shared cluster-wide; Redis restarts survived; and the
vendor's connect rate held across instances.
"""

from __future__ import annotations

import collections
import itertools
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
import trio_websocket

from gateway.cluster import rank
from gateway.model import FixtureStatus
from gateway.service import Gateway
from gateway.simulator import Simulator
from tests.conftest import TEST_TOKEN
from tests.kit import gateway_config, http_get, http_url, stream_url, wait_until
from tests.redis_kit import RedisServer, SentinelGroup

TTL = 2.0
ROUND = TTL / 4
NAMES = ("gw-a", "gw-b")


def ranked(n: int, first: str, *, feed: str = "tracking", prefix: str = "fx") -> list[str]:
    """*n* fixture ids whose rendezvous order over :data:`NAMES` puts *first* first."""
    out: list[str] = []
    for i in itertools.count():
        fx = f"{prefix}-{first[-1]}-{i:03d}"
        if rank(f"{feed}/{fx}", NAMES)[0] == first:
            out.append(fx)
            if len(out) == n:
                return out
    raise AssertionError("unreachable")


# -- the harness ---------------------------------------------------------------------------


@attrs.define
class Member:
    """One gateway of the cluster, running in its own cancel scope."""

    name: str
    gw: Gateway
    scope: trio.CancelScope
    done: trio.Event

    @property
    def node(self) -> Any:  # its ClusterNode (not exported: Gateway.cluster is its one user)
        assert self.gw.cluster is not None
        return self.gw.cluster

    def owns(self, fx: str, feed: str = "tracking") -> bool:
        cluster = self.gw.cluster
        assert cluster is not None
        return cluster.role(feed, fx) == "owner"

    def warm(self, fx: str, feed: str = "tracking") -> bool:
        """True while this instance holds a warm connection of *fx* (a handover to it)."""
        sink = self.node.desk.warm.get(f"{feed}/{fx}")
        return sink is not None and sink.target is None

    def seq(self, fx: str, feed: str = "tracking") -> int:
        topic = self.gw.hub.get(feed, fx)
        return 0 if topic is None else topic.seq

    def epoch(self, fx: str, feed: str = "tracking") -> str | None:
        topic = self.gw.hub.get(feed, fx)
        return None if topic is None else topic.epoch


@attrs.define
class Cluster:
    nursery: trio.Nursery
    sim: Simulator
    sim_port: int
    token_file: Path
    redis: RedisServer | SentinelGroup
    fixtures: list[tuple[str, str]]
    sections: dict[str, Any]
    members: list[Member] = attrs.Factory(list)
    #: The most connections the simulator ever had at once for a fixture (sampled).
    max_sessions: collections.Counter[str] = attrs.Factory(collections.Counter)

    async def start(self, name: str, **sections: Any) -> Member:
        """Start instance *name*: the cluster's *sections*, then this instance's own."""
        redis = self.redis
        where: dict[str, Any] = (
            {"sentinels": redis.addresses, "sentinel_master": redis.MASTER}
            if isinstance(redis, SentinelGroup)
            else {"redis_url": f"redis://127.0.0.1:{redis.port}/0"}
        )
        cluster = {
            "lease_ttl": TTL,
            "redis_timeout": 0.5,
            **self.sections.get("cluster", {}),
            **where,
            "instance": name,
        }
        config = gateway_config(
            self.sim_port,
            self.token_file,
            self.fixtures,
            **{**self.sections, **sections, "cluster": cluster},
        )
        member: Member = await self.nursery.start(self._run, name, config)
        self.members.append(member)
        return member

    async def _run(self, name: str, config: Any, *, task_status: trio.TaskStatus[Member]) -> None:
        done = trio.Event()
        try:
            with trio.CancelScope() as scope:
                gw = Gateway(config)
                async with trio.open_nursery() as nursery:
                    await nursery.start(gw.run)
                    task_status.started(Member(name, gw, scope, done))
        finally:
            done.set()

    async def kill(self, member: Member) -> None:
        """Stop *member* as ``kill -9`` would: no goodbye (its leases and heartbeat stay in
        Redis until they expire); its sockets close and its queued appends are lost."""
        member.node._left = True  # the node's finally: skip the release and leave
        member.scope.cancel()
        await member.done.wait()

    async def stop(self, member: Member) -> None:
        """A clean stop: drain (the node leaves first), then cancel."""
        await member.gw.drain()
        member.scope.cancel()
        await member.done.wait()

    async def watch_sessions(self) -> None:
        while True:
            for feed, fx in self.fixtures:
                # A planned handover's warm connection publishes nothing until the owner's
                # has closed (make-before-break): it is not a second publishing connection.
                n = self.sim.sessions(fx) - sum(m.warm(fx, feed) for m in self.members)
                if n > self.max_sessions[fx]:
                    self.max_sessions[fx] = n
            await trio.sleep(0.005)

    def check_healthy(self) -> None:
        """No round of any instance hit a bug; never two publishing vendor connections for a
        fixture (a planned handover's warm one aside: see :meth:`watch_sessions`)."""
        assert {m.name: m.node.round_errors for m in self.members} == dict.fromkeys(
            (m.name for m in self.members), 0
        )
        assert max(self.max_sessions.values(), default=0) <= 1, self.max_sessions


@asynccontextmanager
async def cluster_of(
    tmp_path: Path,
    redis: RedisServer | SentinelGroup,
    fixtures: Sequence[tuple[str, str]],
    *,
    rate_hz: float = 50.0,
    extra_sim_fixtures: Sequence[tuple[str, str]] = (),
    **sections: Any,
) -> AsyncIterator[Cluster]:
    token_file = tmp_path / "token"
    token_file.write_text(TEST_TOKEN)
    sim = Simulator(
        tokens={TEST_TOKEN}, rate_hz=rate_hz, heartbeat_interval=1.0, action_interval=0.2
    )
    for feed, fx in [*fixtures, *extra_sim_fixtures]:
        sim.add_fixture(fx, kind="tracking" if feed == "tracking" else "fastpath")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve, "127.0.0.1", 0)
        cluster = Cluster(nursery, sim, port, token_file, redis, list(fixtures), sections)
        nursery.start_soon(cluster.watch_sessions)
        yield cluster
        nursery.cancel_scope.cancel()


def longest_pause(times: Sequence[float], start: float) -> float:
    """The longest time without a frame from *start* on."""
    later = [start, *(t for t in times if t >= start)]
    return max(b - a for a, b in itertools.pairwise(later))


class Subscriber:
    """A ``/v1/stream`` client in a task of its own; keeps everything it receives."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.frames: dict[str, list[tuple[int, int | None]]] = collections.defaultdict(list)
        self.subscribed: dict[str, dict[str, Any]] = {}
        self.states: dict[str, list[str]] = collections.defaultdict(list)
        self.errors: list[str] = []
        self.gaps: list[dict[str, Any]] = []
        self.closed = trio.Event()
        #: The close code the gateway sent (None: still open, or closed by this side).
        self.close_code: int | None = None
        #: When (trio time) each frame arrived, beside :attr:`frames`.
        self.arrivals: dict[str, list[float]] = collections.defaultdict(list)
        self._ws: trio_websocket.WebSocketConnection | None = None
        self._scope = trio.CancelScope()

    @classmethod
    async def open(cls, nursery: trio.Nursery, member: Member) -> Subscriber:
        sub = cls(stream_url(member.gw))
        await nursery.start(sub._run)
        return sub

    async def _run(self, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            with self._scope:
                async with trio_websocket.open_websocket_url(self.url) as ws:
                    self._ws = ws
                    task_status.started()
                    while True:
                        self._on(orjson.loads(await ws.get_message()))
        except trio_websocket.ConnectionClosed as exc:
            self.close_code = None if exc.reason is None else exc.reason.code
        except (trio.BrokenResourceError, OSError):
            pass
        finally:
            self.closed.set()

    def _on(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "frame":
            data = msg["data"]
            self.frames[msg["fixture"]].append((msg["seq"], data.get("ix")))
            self.arrivals[msg["fixture"]].append(trio.current_time())
        elif kind == "subscribed":
            self.subscribed[msg["fixture"]] = msg
        elif kind == "status":
            self.states[msg["fixture"]].append(msg["state"])
        elif kind == "error":
            self.errors.append(msg["message"])
        elif kind == "gap":
            self.gaps.append(msg)

    async def subscribe(self, feed: str, fx: str, **extra: Any) -> dict[str, Any]:
        """Subscribe and wait for the reply (``subscribed``, or an error: AssertionError)."""
        assert self._ws is not None
        errors = len(self.errors)
        self.subscribed.pop(fx, None)
        request = {"op": "subscribe", "feed": feed, "fixture": fx, **extra}
        await self._ws.send_message(orjson.dumps(request).decode())
        await wait_until(lambda: fx in self.subscribed or len(self.errors) > errors)
        if fx not in self.subscribed:
            raise AssertionError(self.errors[-1])
        return self.subscribed[fx]

    async def refused(self, feed: str, fx: str) -> str:
        """Subscribe expecting an error; its message."""
        assert self._ws is not None
        errors = len(self.errors)
        request = {"op": "subscribe", "feed": feed, "fixture": fx}
        await self._ws.send_message(orjson.dumps(request).decode())
        await wait_until(lambda: fx in self.subscribed or len(self.errors) > errors)
        assert fx not in self.subscribed, f"{fx} was admitted"
        return self.errors[-1]

    def count(self, fx: str) -> int:
        return len(self.frames[fx])

    def worst_gap(self, fx: str, since: float) -> float:
        """The longest time without a frame of *fx* from *since* to now."""
        return longest_pause([*self.arrivals[fx], trio.current_time()], since)

    async def close(self) -> None:
        """Drop the connection (no close handshake: the test is done with it)."""
        self._scope.cancel()
        await self.closed.wait()


def assert_contiguous(frames: list[tuple[int, int | None]], what: str) -> None:
    """seq and the vendor's tracking ix both go up by exactly one from frame to frame."""
    assert frames, f"{what}: no frames"
    seqs = [s for s, _ in frames]
    ixs = [ix for _, ix in frames]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{what}: seq {_breaks(seqs)}"
    assert all(ix is not None for ix in ixs), what
    assert ixs == list(range(ixs[0], ixs[0] + len(ixs))), f"{what}: ix {_breaks(ixs)}"  # type: ignore[arg-type,operator]


def _breaks(values: Sequence[int | None]) -> list[tuple[int | None, int | None]]:
    return [(a, b) for a, b in itertools.pairwise(values) if a is None or b != a + 1][:10]


def settled(members: Sequence[Member], fixtures: Sequence[str], sim: Simulator) -> bool:
    """Every fixture: exactly one owner (the one Redis names to all), one vendor connection,
    and every instance serving it under the owner's epoch with frames."""
    for fx in fixtures:
        owners = [m for m in members if m.owns(fx)]
        if len(owners) != 1 or sim.sessions(fx) != 1:
            return False
        owner = owners[0]
        for m in members:
            if m.node.owner("tracking", fx) != owner.name:
                return False
            if m.epoch(fx) != owner.epoch(fx) or m.seq(fx) == 0:
                return False
    return True


def balanced(members: Sequence[Member], fixtures: Sequence[str]) -> bool:
    """Every fixture owned by its first instance in rendezvous order."""
    names = [m.name for m in members]
    by_name = {m.name: m for m in members}
    return all(by_name[rank(f"tracking/{fx}", names)[0]].owns(fx) for fx in fixtures)


def tracking(fixtures: Sequence[str]) -> list[tuple[str, str]]:
    return [("tracking", fx) for fx in fixtures]


# -- 1. one owner, one vendor connection, the same numbering everywhere ---------------------


async def test_one_owner_one_connection_and_the_same_frames_everywhere(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    fixtures = ranked(2, "gw-a") + ranked(2, "gw-b")
    with trio.fail_after(45):
        async with cluster_of(tmp_path, redis_server, tracking(fixtures)) as c:
            a = await c.start("gw-a")
            b = await c.start("gw-b")
            # b joined after a took everything: b's share moves to it once b is live a ttl.
            await wait_until(
                lambda: settled([a, b], fixtures, c.sim) and balanced([a, b], fixtures), 20
            )
            async with trio.open_nursery() as nursery:
                on_a = await Subscriber.open(nursery, a)
                on_b = await Subscriber.open(nursery, b)
                for fx in fixtures:
                    sa = await on_a.subscribe("tracking", fx)
                    sb = await on_b.subscribe("tracking", fx)
                    assert sa["epoch"] == sb["epoch"] == a.epoch(fx)
                await wait_until(
                    lambda: all(min(on_a.count(fx), on_b.count(fx)) >= 30 for fx in fixtures), 20
                )
                await on_a.close()
                await on_b.close()
            for fx in fixtures:
                assert_contiguous(on_a.frames[fx], f"{fx} on gw-a")
                assert_contiguous(on_b.frames[fx], f"{fx} on gw-b")
                # The same vendor frame has the same seq on both instances.
                by_ix_a = {ix: seq for seq, ix in on_a.frames[fx]}
                by_ix_b = {ix: seq for seq, ix in on_b.frames[fx]}
                common = by_ix_a.keys() & by_ix_b.keys()
                assert len(common) >= 20, fx
                assert all(by_ix_a[ix] == by_ix_b[ix] for ix in common), fx
                assert c.sim.sessions(fx) == 1
            c.check_healthy()


# -- 2. balance, and a clean leave --------------------------------------------------------


async def test_balance_over_two_and_a_clean_leave(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    fixtures = [f"bal-{i:02d}" for i in range(20)]
    firsts = collections.Counter(rank(f"tracking/{fx}", NAMES)[0] for fx in fixtures)
    assert set(firsts) == set(NAMES), firsts  # the names split them (rendezvous)
    with trio.fail_after(50):
        async with cluster_of(tmp_path, redis_server, tracking(fixtures), rate_hz=20.0) as c:
            a = await c.start("gw-a")
            # b joins once a, alone, owns everything: b's share moves to it.
            await wait_until(lambda: all(a.owns(fx) for fx in fixtures), 10)
            b = await c.start("gw-b")
            await wait_until(
                lambda: settled([a, b], fixtures, c.sim) and balanced([a, b], fixtures), 30
            )
            owned = {m.name: sum(m.owns(fx) for fx in fixtures) for m in (a, b)}
            assert owned == {"gw-a": firsts["gw-a"], "gw-b": firsts["gw-b"]}
            assert a.node.handovers == firsts["gw-b"]  # b's share moved from a
            # gw-a leaves cleanly: it releases its leases, b takes them at its next round.
            rounds = b.node.rounds
            await c.stop(a)
            await wait_until(lambda: all(b.owns(fx) for fx in fixtures), 10)
            assert b.node.rounds - rounds <= 4, "b took over more slowly than a few rounds"
            await wait_until(lambda: settled([b], fixtures, c.sim), 20)
            c.check_healthy()


async def test_instances_started_together_claim_a_fair_share_from_the_start(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Issue 22 5g: at start-up all leases went to the first instance (it ranked every free
    lease over itself alone) and were handed over for many rounds (37 s in the probe). Each
    instance's first round now only looks: instances started within a round of each other
    each take their rendezvous share at once, and nothing is handed over."""
    fixtures = [f"bal-{i:02d}" for i in range(20)]
    firsts = collections.Counter(rank(f"tracking/{fx}", NAMES)[0] for fx in fixtures)
    with trio.fail_after(50):
        async with cluster_of(tmp_path, redis_server, tracking(fixtures), rate_hz=20.0) as c:
            async with trio.open_nursery() as starting:
                for name in NAMES:
                    starting.start_soon(c.start, name)
            a, b = sorted(c.members, key=lambda m: m.name)
            started = trio.current_time()
            await wait_until(
                lambda: settled([a, b], fixtures, c.sim) and balanced([a, b], fixtures), 30
            )
            print(f"balanced {trio.current_time() - started:.2f} s after both started")
            owned = {m.name: sum(m.owns(fx) for fx in fixtures) for m in (a, b)}
            assert owned == {"gw-a": firsts["gw-a"], "gw-b": firsts["gw-b"]}
            # Each took its own share: nothing was handed over, no second vendor connection.
            assert (a.node.handovers, b.node.handovers) == (0, 0)
            assert (a.node.leases_gained, b.node.leases_gained) == (firsts["gw-a"], firsts["gw-b"])
            c.check_healthy()


# -- 3 and 4. an owner dies: no gap, no duplicate, on the survivor and after a resume ------


async def test_failover_without_gap_or_duplicate(tmp_path: Path, redis_server: RedisServer) -> None:
    """gw-a owns every fixture (rendezvous puts it first) and dies without a goodbye: its
    leases expire after ``lease_ttl`` and gw-b takes over from the streams' last vendor
    positions. gw-b's subscriber sees every fixture's seq and ix contiguous across the death;
    gw-a's subscriber, cut off, resumes on gw-b with ``after`` + ``epoch``: recovered, the
    missed frames next, none twice."""
    fixtures = ranked(3, "gw-a")
    with trio.fail_after(50):
        async with cluster_of(tmp_path, redis_server, tracking(fixtures)) as c:
            a = await c.start("gw-a")
            await wait_until(lambda: settled([a], fixtures, c.sim), 20)
            b = await c.start("gw-b")
            await wait_until(lambda: settled([a, b], fixtures, c.sim), 20)
            async with trio.open_nursery() as nursery:
                survivor = await Subscriber.open(nursery, b)
                victim = await Subscriber.open(nursery, a)
                for fx in fixtures:
                    await survivor.subscribe("tracking", fx)
                    await victim.subscribe("tracking", fx)
                await wait_until(
                    lambda: all(min(survivor.count(fx), victim.count(fx)) >= 10 for fx in fixtures)
                )
                before = {fx: survivor.count(fx) for fx in fixtures}
                killed_at = trio.current_time()
                await c.kill(a)
                await victim.closed.wait()
                await wait_until(lambda: all(b.owns(fx) for fx in fixtures), 15)
                took = trio.current_time() - killed_at
                await wait_until(
                    lambda: all(survivor.count(fx) >= before[fx] + 30 for fx in fixtures), 15
                )
                # 4: gw-a's subscriber resumes on gw-b once gw-b's numbering has passed what it
                # saw (a resume beyond a topic's last seq is not recovered).
                last = {fx: victim.frames[fx][-1] for fx in fixtures}
                await wait_until(lambda: all(b.seq(fx) > last[fx][0] for fx in fixtures), 15)
                resumed = await Subscriber.open(nursery, b)
                for fx in fixtures:
                    epoch = victim.subscribed[fx]["epoch"]
                    reply = await resumed.subscribe("tracking", fx, after=last[fx][0], epoch=epoch)
                    assert reply["recovered"] is True and reply["epoch"] == epoch, reply
                await wait_until(lambda: all(resumed.count(fx) >= 20 for fx in fixtures), 15)
                for sub in (survivor, resumed):
                    await sub.close()
            # Not before the dead owner's leases expired (a released lease would go at once).
            assert TTL - 2 * ROUND <= took <= TTL + 4 * ROUND + 2.0, took
            for fx in fixtures:
                assert_contiguous(survivor.frames[fx], f"{fx} on the survivor")
                assert_contiguous(victim.frames[fx] + resumed.frames[fx], f"{fx} resumed")
                assert resumed.frames[fx][0][0] == last[fx][0] + 1
            assert not survivor.gaps and not resumed.gaps
            assert b.node.leases_gained == len(fixtures)
            c.check_healthy()


async def test_a_killed_owner_is_shown_silent_and_its_fixtures_taken_over(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Issue 22 5c: after kill -9 the survivors listed the dead instance and reported its
    fixtures ``live`` until its leases ran out, while nothing arrived. Now an instance whose
    heartbeat has not moved for SILENT_ROUNDS rounds is *silent*: ``/v1/cluster`` says so (and
    for how long), ``dde_cluster_instances_silent`` counts it, and its fixtures show
    ``connecting`` ("taking over") in ``/v1/fixtures`` and to subscribers - before the
    takeover, which then brings them back live."""
    fixtures = ranked(2, "gw-a")
    taking_over = ("connecting", "cluster: owner gw-a silent: taking over")
    with trio.fail_after(60):
        async with cluster_of(tmp_path, redis_server, tracking(fixtures)) as c:
            a, b = await c.start("gw-a"), await c.start("gw-b")
            await wait_until(
                lambda: settled([a, b], fixtures, c.sim) and balanced([a, b], fixtures)
            )
            async with trio.open_nursery() as nursery:
                survivor = await Subscriber.open(nursery, b)
                for fx in fixtures:
                    await survivor.subscribe("tracking", fx)
                await wait_until(lambda: all(survivor.count(fx) >= 5 for fx in fixtures))
                killed_at = trio.current_time()
                await c.kill(a)

                def shown() -> dict[str, tuple[str, str]]:
                    out = {}
                    for fx in fixtures:
                        view = b.gw.fixture_view("tracking", fx)
                        assert view is not None
                        out[fx] = (view.state.value, view.detail)
                    return out

                await wait_until(
                    lambda: (
                        all(shown()[fx] == taking_over for fx in fixtures)
                        or all(b.owns(fx) for fx in fixtures)
                    ),
                    15,
                )
                told = trio.current_time() - killed_at
                print(f"the survivor showed the takeover {told:.2f} s after the kill")
                assert not any(b.owns(fx) for fx in fixtures), "taken over before it was shown"
                status, body = await http_get(http_url(b.gw, "/v1/cluster"))
                assert status == 200
                cluster = orjson.loads(body)
                silent = {i["name"]: i["silent"] for i in cluster["instances"]}
                assert silent["gw-b"] is None and silent["gw-a"] >= 3 * ROUND, silent
                for fx in fixtures:
                    status, body = await http_get(http_url(b.gw, f"/v1/fixtures/tracking/{fx}"))
                    assert status == 200
                    view = orjson.loads(body)
                    assert (view["state"], view["owner"]) == ("connecting", "gw-a"), view
                status, body = await http_get(http_url(b.gw, "/metrics"))
                assert status == 200
                assert b"\ndde_cluster_instances_silent 1.0\n" in body
                # Then the takeover: live again, and gw-a gone from the list.
                await wait_until(lambda: all(b.owns(fx) for fx in fixtures), 15)
                await wait_until(lambda: all(s == "live" for s, _ in shown().values()), 15)
                assert all(survivor.states[fx].count("connecting") >= 1 for fx in fixtures)
                await wait_until(lambda: "gw-a" not in b.node.live, 15)
                assert b.node.silent_for("gw-b") is None
                await survivor.close()
            for fx in fixtures:
                assert_contiguous(survivor.frames[fx], f"{fx} on the survivor")
            c.check_healthy()


# -- 5. fixtures followed through the API or on demand are the cluster's ---------------------


def http_call(member: Member, method: str, path: str, body: bytes | None = None) -> int:
    req = urllib.request.Request(http_url(member.gw, path), data=body, method=method)
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return int(resp.status)


async def test_api_follow_and_delete_reach_every_instance(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    fx = "api-fx-1"
    with trio.fail_after(45):
        async with cluster_of(
            tmp_path, redis_server, [], extra_sim_fixtures=[("tracking", fx)]
        ) as c:
            a = await c.start("gw-a")
            b = await c.start("gw-b")
            c.fixtures.append(("tracking", fx))  # watched for double connections from now on
            status = await trio.to_thread.run_sync(
                http_call, a, "PUT", f"/v1/fixtures/tracking/{fx}", b'{"backfill": 3}'
            )
            assert status == 201
            rounds = b.node.rounds
            await wait_until(lambda: b.gw.is_followed("tracking", fx), 10)
            assert b.node.rounds - rounds <= 3, "b followed more slowly than a couple of rounds"
            await wait_until(lambda: settled([a, b], [fx], c.sim), 15)
            # Deleted through the other instance: both stop, and so does the vendor connection.
            status = await trio.to_thread.run_sync(
                http_call, b, "DELETE", f"/v1/fixtures/tracking/{fx}"
            )
            assert status == 204
            await wait_until(
                lambda: (
                    not a.gw.is_followed("tracking", fx)
                    and not b.gw.is_followed("tracking", fx)
                    and c.sim.sessions(fx) == 0
                ),
                10,
            )
            c.check_healthy()


def http_status(member: Member, method: str, path: str, body: bytes | None = None) -> int:
    """:func:`http_call`, an error status returned rather than raised."""
    try:
        return http_call(member, method, path, body)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


async def test_delete_on_another_instance_right_after_the_put(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Issue 22 5a: a DELETE sent to another instance within a round of the PUT was a 404 and
    was lost (the fixture stayed followed for good). The PUT is in Redis before it is
    answered, and the DELETE reads the cluster's set before it answers. Redis unreachable: a
    DELETE of a fixture this instance does not know is a 503 (it cannot tell), not a 404."""
    fx = "api-fx-2"
    with trio.fail_after(45):
        async with cluster_of(
            tmp_path, redis_server, [], extra_sim_fixtures=[("tracking", fx)]
        ) as c:
            a = await c.start("gw-a")
            b = await c.start("gw-b")
            c.fixtures.append(("tracking", fx))
            path = f"/v1/fixtures/tracking/{fx}"
            assert await trio.to_thread.run_sync(http_status, a, "PUT", path, None) == 201
            # At once, long before b's next round (a round is 0.5 s, these take milliseconds).
            assert await trio.to_thread.run_sync(http_status, b, "DELETE", path, None) == 204
            assert not b.gw.is_followed("tracking", fx)
            await wait_until(lambda: not a.gw.is_followed("tracking", fx), 10)
            # Both have gone on for rounds: neither follows it again (it is not in Redis).
            rounds = a.node.rounds
            await wait_until(lambda: a.node.rounds >= rounds + 3 and b.node.rounds >= rounds + 3)
            assert not a.gw.is_followed("tracking", fx) and not b.gw.is_followed("tracking", fx)
            assert redis_server.call("HLEN", "dde:api") == 0
            assert c.sim.sessions(fx) == 0
            redis_server.stop()
            status = await trio.to_thread.run_sync(http_status, b, "DELETE", path, None)
            assert status == 503
            c.check_healthy()


async def test_a_deleted_fixtures_keys_expire_and_a_followed_ones_stay(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Issue 22 5b: a deleted fixture's stream and meta stayed in Redis for good. Its owner
    now renews their time to live (stream_retention) every round: once nobody follows a
    fixture nobody owns it, and its keys expire; a followed one's stay, however long."""
    kept, gone = "keep-1", "gone-1"
    retention = 3 * TTL
    with trio.fail_after(60):
        async with cluster_of(
            tmp_path,
            redis_server,
            [("tracking", kept)],
            extra_sim_fixtures=[("tracking", gone)],
            cluster={"stream_retention": retention},
        ) as c:
            a, b = await c.start("gw-a"), await c.start("gw-b")
            c.fixtures.append(("tracking", gone))
            path = f"/v1/fixtures/tracking/{gone}"
            assert await trio.to_thread.run_sync(http_status, a, "PUT", path, None) == 201
            await wait_until(lambda: settled([a, b], [kept, gone], c.sim), 15)
            started = trio.current_time()

            def pttl(fx: str, kind: str) -> int:
                value = redis_server.call("PTTL", f"dde:{kind}:tracking/{fx}")
                assert isinstance(value, int)
                return value

            # From its owner's next round on (the keys are made by the first append).
            await wait_until(lambda: all(pttl(gone, k) > 0 for k in ("stream", "meta")), 10)
            assert pttl(gone, "stream") <= retention * 1000
            assert await trio.to_thread.run_sync(http_status, b, "DELETE", path, None) == 204
            await wait_until(lambda: not a.gw.is_followed("tracking", gone), 10)
            deleted = trio.current_time()
            # -2: the key does not exist any more.
            await wait_until(
                lambda: pttl(gone, "stream") == -2 and pttl(gone, "meta") == -2, retention + 10
            )
            print(f"keys of the deleted fixture gone {trio.current_time() - deleted:.1f} s later")
            # The followed fixture's keys outlived the retention since: renewed by its owner.
            await wait_until(lambda: trio.current_time() - started > retention + 1)
            for kind in ("stream", "meta"):
                assert 0 < pttl(kept, kind) <= retention * 1000, kind
            assert a.seq(kept) > 0 and a.epoch(kept) == b.epoch(kept)
            c.check_healthy()


async def test_max_on_demand_is_counted_cluster_wide(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    act1, act2 = "act-1", "act-2"
    with trio.fail_after(45):
        async with cluster_of(
            tmp_path,
            redis_server,
            [],
            extra_sim_fixtures=[("actions", act1), ("actions", act2)],
            feeds={"actions": {"on_demand": True, "linger": 30.0, "max_on_demand": 1}},
        ) as c:
            a = await c.start("gw-a")
            b = await c.start("gw-b")
            c.fixtures += [("actions", act1), ("actions", act2)]
            async with trio.open_nursery() as nursery:
                on_a = await Subscriber.open(nursery, a)
                on_b = await Subscriber.open(nursery, b)
                await on_a.subscribe("actions", act1)
                await wait_until(lambda: on_a.count(act1) >= 1, 15)
                # b learns of a's on-demand fixture at its next round.
                await wait_until(lambda: b.node.cluster_on_demand("actions") == {act1}, 10)
                error = await on_b.refused("actions", act2)
                assert "max_on_demand" in error and act2 in error, error
                assert not b.gw.is_followed("actions", act2)
                assert not a.gw.is_followed("actions", act2)
                # One already followed on demand elsewhere takes no new vendor connection.
                await on_b.subscribe("actions", act1)
                await wait_until(lambda: on_b.count(act1) >= 1, 15)
                assert c.sim.sessions(act1) == 1 and c.sim.sessions(act2) == 0
                for sub in (on_a, on_b):
                    await sub.close()
            c.check_healthy()


# -- 6. Redis restarts -----------------------------------------------------------------------


async def two_settled(
    c: Cluster, fixtures: Sequence[str]
) -> tuple[list[Member], dict[str, Member]]:
    """gw-a and gw-b started, each fixture followed once and the leases balanced; returns the
    members and each fixture's owner."""
    members = [await c.start("gw-a"), await c.start("gw-b")]
    await wait_until(lambda: settled(members, fixtures, c.sim) and balanced(members, fixtures), 20)
    return members, {fx: next(m for m in members if m.owns(fx)) for fx in fixtures}


async def subscribed_everywhere(
    nursery: trio.Nursery, members: Sequence[Member], fixtures: Sequence[str]
) -> dict[str, Subscriber]:
    """A subscriber on each member to every fixture, each of them past its fifth frame."""
    subs = {m.name: await Subscriber.open(nursery, m) for m in members}
    for sub in subs.values():
        for fx in fixtures:
            await sub.subscribe("tracking", fx)
    await wait_until(lambda: all(s.count(fx) >= 5 for s in subs.values() for fx in fixtures))
    return subs


@pytest.mark.parametrize("keep_data", [True, False], ids=["with-data", "data-lost"])
async def test_redis_restart(tmp_path: Path, redis_factory: Any, keep_data: bool) -> None:
    """Redis goes away and comes back (with its data, or empty). Nothing crashes; each instance
    is degraded while Redis is down (its relayed fixtures too) and recovers by itself; frames
    flow again on both. Owners keep their fan-out meanwhile, and keep the epoch when Redis lost
    everything (they hold the numbering). Nothing is lost either way: with the data lost each
    owner appends its memory history again (the stream starts at seq 1 again)."""
    redis: RedisServer = redis_factory(persistence=True)
    fixtures = ranked(2, "gw-a") + ranked(2, "gw-b")
    with trio.fail_after(60):
        async with cluster_of(tmp_path, redis, tracking(fixtures)) as c:
            members, owner = await two_settled(c, fixtures)
            epochs = {fx: members[0].epoch(fx) for fx in fixtures}
            async with trio.open_nursery() as nursery:
                subs = await subscribed_everywhere(nursery, members, fixtures)
                await redis.astop()
                await wait_until(lambda: all(m.gw.degraded_reason() for m in members), 10)
                for m in members:
                    status, body = await http_get(http_url(m.gw, "/readyz"))
                    ready = orjson.loads(body)
                    # Still 200: the instance serves. The reason names no address.
                    assert status == 200 and ready["status"] == "degraded", ready
                    assert ready["reason"] and str(redis.port) not in ready["reason"]
                # Each instance's relayed fixtures show it (from its next round on).
                await wait_until(
                    lambda: all(
                        _state(m, fx) == ("owner" if owner[fx] is m else "relay/degraded")
                        for m in members
                        for fx in fixtures
                    ),
                    10,
                )
                # Owners fan out their own fixtures without Redis.
                down = {(m.name, fx): subs[m.name].count(fx) for m in members for fx in fixtures}
                await wait_until(
                    lambda: all(
                        subs[owner[fx].name].count(fx) >= down[owner[fx].name, fx] + 10
                        for fx in fixtures
                    )
                )
                await redis.arestart(keep_data=keep_data)
                await wait_until(lambda: not any(m.gw.degraded_reason() for m in members), 15)
                for m in members:
                    status, body = await http_get(http_url(m.gw, "/readyz"))
                    assert (status, orjson.loads(body)) == (200, {"status": "ready"})
                back = {(m.name, fx): subs[m.name].count(fx) for m in members for fx in fixtures}
                await wait_until(
                    lambda: all(
                        subs[m.name].count(fx) >= back[m.name, fx] + 20
                        for m in members
                        for fx in fixtures
                    ),
                    15,
                )
                await wait_until(
                    lambda: all(
                        _state(m, fx) == ("owner" if owner[fx] is m else "relay/live")
                        for m in members
                        for fx in fixtures
                    ),
                    15,
                )
                for sub in subs.values():
                    await sub.close()
            for m in members:
                assert not m.done.is_set(), f"{m.name} stopped"
                for fx in fixtures:
                    assert m.epoch(fx) == epochs[fx], (m.name, fx)
            for fx in fixtures:
                meta = redis.call("HGET", f"dde:meta:tracking/{fx}", "epoch")
                assert meta == epochs[fx].encode(), fx  # type: ignore[union-attr]
                # The owner's own subscriber never misses a vendor frame.
                assert_contiguous(subs[owner[fx].name].frames[fx], f"{fx} on its owner")
                # Appends were retried, not dropped: the relays caught up without a gap. Redis
                # back empty: each owner appended its memory history again first.
                for m in members:
                    assert_contiguous(subs[m.name].frames[fx], f"{fx} on {m.name}")
                first = redis.call("XRANGE", f"dde:stream:tracking/{fx}", "-", "+", "COUNT", "1")
                assert isinstance(first, list) and first, fx
                assert first[0][0] == b"1-0", (fx, first)  # type: ignore[index]
            if not keep_data:
                assert all(m.node.appender.frames_reappended > 0 for m in members)
            c.check_healthy()


async def test_a_cut_off_instance_dates_its_view(tmp_path: Path, redis_factory: Any) -> None:
    """Issue 22 5d: cut off from Redis, an instance went on showing its last view of the
    cluster (instances, leases, owners) as if current. ``/v1/cluster`` now dates it:
    ``view_at`` (the last round that reached Redis) stays put and ``unreachable_since`` says
    since when Redis has not answered; ``dde_cluster_view_age_seconds`` grows. Back in touch,
    the view is fresh again."""
    redis: RedisServer = redis_factory()
    fixtures = ranked(1, "gw-a") + ranked(1, "gw-b")
    with trio.fail_after(60):
        async with cluster_of(tmp_path, redis, tracking(fixtures)) as c:
            members, _ = await two_settled(c, fixtures)
            a = members[0]

            async def cluster_of_a() -> dict[str, Any]:
                status, body = await http_get(http_url(a.gw, "/v1/cluster"))
                assert status == 200
                view: dict[str, Any] = orjson.loads(body)
                return view

            before = await cluster_of_a()
            assert before["unreachable_since"] is None and before["view_at"] is not None
            cut = time.time()
            await redis.astop()
            await wait_until(lambda: a.node.unreachable_since is not None, 10)
            rounds = a.node.rounds
            await wait_until(lambda: a.node.rounds >= rounds + 2, 10)
            stale = await cluster_of_a()
            assert stale["state"] == "degraded"
            assert stale["view_at"] <= cut <= stale["unreachable_since"] <= time.time()
            # Still what it last knew (both instances), dated.
            assert [i["name"] for i in stale["instances"]] == ["gw-a", "gw-b"]
            _, metrics = await http_get(http_url(a.gw, "/metrics"))
            age = next(
                float(line.split()[1])
                for line in metrics.decode().splitlines()
                if line.startswith("dde_cluster_view_age_seconds ")
            )
            assert age >= time.time() - cut - 1.0 > 0, age
            await redis.arestart(keep_data=False)
            await wait_until(lambda: a.node.unreachable_since is None, 15)
            fresh = await cluster_of_a()
            assert fresh["unreachable_since"] is None and fresh["view_at"] > cut
            c.check_healthy()


@pytest.mark.slow
async def test_a_hung_redis_stops_no_upstream(tmp_path: Path, redis_server: RedisServer) -> None:
    """Redis stops answering (SIGSTOP: connections stay open, nothing is answered) for twice
    the lease's time to live. Every request gives up within ``redis_timeout``, so each instance
    turns degraded before its leases run out locally: owners keep their vendor connections and
    their fan-out (nobody fences itself), relays show degraded, and everything goes on when
    Redis answers again, with no frame lost (the appends were retried)."""
    fixtures = ranked(2, "gw-a") + ranked(2, "gw-b")
    with trio.fail_after(60):
        async with cluster_of(tmp_path, redis_server, tracking(fixtures)) as c:
            members, owner = await two_settled(c, fixtures)
            async with trio.open_nursery() as nursery:
                subs = await subscribed_everywhere(nursery, members, fixtures)
                before = {fx: subs[owner[fx].name].count(fx) for fx in fixtures}
                dropped: set[str] = set()
                redis_server.pause()
                try:
                    # For the whole hang, not only at its end: one vendor connection each.
                    end = trio.current_time() + 2 * TTL
                    while trio.current_time() < end:
                        dropped |= {fx for fx in fixtures if c.sim.sessions(fx) != 1}
                        await trio.sleep(0.02)
                    assert all(m.gw.degraded_reason() for m in members)
                    assert all(
                        _state(m, fx) in ("owner", "relay/degraded")
                        for m in members
                        for fx in fixtures
                    )
                finally:
                    redis_server.resume()
                assert not dropped, f"vendor connections stopped while redis hung: {dropped}"
                assert [m.node.fenced for m in members] == [0, 0]
                # The owners' subscribers got their frames all along.
                assert all(subs[owner[fx].name].count(fx) >= before[fx] + 50 for fx in fixtures)
                await wait_until(lambda: not any(m.gw.degraded_reason() for m in members), 15)
                back = {(m.name, fx): subs[m.name].count(fx) for m in members for fx in fixtures}
                await wait_until(
                    lambda: all(
                        subs[m.name].count(fx) >= back[m.name, fx] + 20
                        for m in members
                        for fx in fixtures
                    ),
                    15,
                )
                for sub in subs.values():
                    await sub.close()
            for fx in fixtures:
                for m in members:
                    assert_contiguous(subs[m.name].frames[fx], f"{fx} on {m.name}")
            c.check_healthy()


@pytest.mark.slow
async def test_redis_back_after_a_pause_resumes_subscribers_in_place(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Issue 22 5f: Redis answering again after a pause (SIGSTOP, 5 s here: longer than the
    leases) closed every relay subscriber with 4008 at once (the relay's catch-up burst passed
    their queue budget: a reconnect storm). Now the catch-up goes out no faster than the
    subscribers take it: each keeps its connection and gets every frame once, in order."""
    fixtures = ranked(2, "gw-a") + ranked(2, "gw-b")
    with trio.fail_after(90):
        async with cluster_of(
            tmp_path,
            redis_server,
            tracking(fixtures),
            # A budget of about half the frames made during the pause: their burst passed it.
            subscribers={"queue_bytes": 256 * 1024},
        ) as c:
            members, _ = await two_settled(c, fixtures)
            async with trio.open_nursery() as nursery:
                subs = await subscribed_everywhere(nursery, members, fixtures)
                start = trio.current_time()
                redis_server.pause()
                try:
                    await trio.sleep(8.0)  # the pause itself: what is measured is after it
                finally:
                    redis_server.resume()
                resumed = trio.current_time()
                back = {(m.name, fx): subs[m.name].count(fx) for m in members for fx in fixtures}
                await wait_until(
                    lambda: all(
                        subs[m.name].count(fx) >= back[m.name, fx] + 550
                        or subs[m.name].closed.is_set()
                        for m in members
                        for fx in fixtures
                    ),
                    40,
                )
                codes = {m.name: subs[m.name].close_code for m in members}
                assert codes == dict.fromkeys(codes), f"subscribers closed: {codes}"
                assert all(m.node.relay.holds for m in members)  # the catch-up was paced
                gaps = {
                    (m.name, fx): round(subs[m.name].worst_gap(fx, resumed), 2)
                    for m in members
                    for fx in fixtures
                }
                print(f"pause {resumed - start:.1f} s; worst gaps after it: {gaps}")
                # Caught up and live again: no gap after the pause near the pause itself.
                assert max(gaps.values()) < 4.0, gaps
                for sub in subs.values():
                    await sub.close()
            for fx in fixtures:
                for m in members:
                    assert_contiguous(subs[m.name].frames[fx], f"{fx} on {m.name}")
            c.check_healthy()


def _upstream(member: Member, fx: str) -> FixtureStatus:
    handle = member.gw.supervisor.get("tracking", fx)
    assert handle is not None, fx
    return handle.status


def freeze(seconds: float) -> None:
    """Stop this whole process for *seconds*, as SIGSTOP would (Redis and the vendor go on)."""
    time.sleep(seconds)


async def test_a_pause_shorter_than_the_lease_fences_nothing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Issue 22 5e: a pause shorter than the lease (SIGSTOP 4.5 s with lease_ttl 5) fenced every
    fixture: on waking its local validity had passed, and the owner stopped first and asked
    later (upstreams stopped, a reconnect each, an 8 s stall). Now a renewal gives the lease
    lease_ttl past the next renewal in Redis (the renew margin), and an owner past its local
    validity holds its frames back and asks Redis at once: still its own, it goes on. Here the
    whole process (both instances) freezes for 1.8 s with lease_ttl 2 (local validity 1.5 s)."""
    fixtures = ranked(2, "gw-a") + ranked(2, "gw-b")
    pause = 1.8
    with trio.fail_after(60):
        async with cluster_of(tmp_path, redis_server, tracking(fixtures)) as c:
            members, owner = await two_settled(c, fixtures)
            async with trio.open_nursery() as nursery:
                subs = await subscribed_everywhere(nursery, members, fixtures)
                statuses = {fx: _upstream(owner[fx], fx) for fx in fixtures}
                connects = {fx: statuses[fx].counters.connects for fx in fixtures}
                # Just after a round: the longest time since a renewal the pause can follow.
                rounds = members[0].node.rounds
                await wait_until(lambda: members[0].node.rounds > rounds)
                freeze(pause)
                woke = trio.current_time()
                back = {(m.name, fx): subs[m.name].count(fx) for m in members for fx in fixtures}
                await wait_until(
                    lambda: all(
                        subs[m.name].count(fx) >= back[m.name, fx] + 50
                        for m in members
                        for fx in fixtures
                    ),
                    20,
                )
                gaps = {
                    (m.name, fx): round(subs[m.name].worst_gap(fx, woke - pause), 2)
                    for m in members
                    for fx in fixtures
                }
                print(f"frozen {pause} s; worst gaps from the freeze on: {gaps}")
                fenced = {m.name: m.node.fenced for m in members}
                assert fenced == {"gw-a": 0, "gw-b": 0}, fenced
                for fx in fixtures:
                    assert owner[fx].owns(fx), fx
                    # The same upstream connection: never stopped.
                    status = _upstream(owner[fx], fx)
                    assert status is statuses[fx], fx
                    assert status.counters.connects == connects[fx], fx
                for sub in subs.values():
                    await sub.close()
            for fx in fixtures:
                for m in members:
                    assert_contiguous(subs[m.name].frames[fx], f"{fx} on {m.name}")
            c.check_healthy()


def _state(member: Member, fx: str) -> str:
    """``owner``, or ``relay/<state shown>`` (what ``GET /v1/fixtures/...`` says)."""
    view = member.gw.fixture_view("tracking", fx)
    assert view is not None
    return "owner" if view.role == "owner" else f"relay/{view.state}"


# -- 7. the vendor's connect rate, cluster-wide ----------------------------------------------


@pytest.mark.slow
async def test_connect_rate_holds_across_instances(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """``connect_rate`` is the vendor's limit for the whole cluster: the instances' attempts
    together, at the start and when every vendor connection drops at once (each instance then
    reconnects its share at the same moment), never pass ``rate + 1`` in a second."""
    rate = 2.0
    fixtures = ranked(4, "gw-a") + ranked(4, "gw-b")
    with trio.fail_after(60):
        async with cluster_of(
            tmp_path, redis_server, tracking(fixtures), upstream={"connect_rate": rate}
        ) as c:
            async with trio.open_nursery() as nursery:
                for name in NAMES:  # both at once: each wants its vendor connections now
                    nursery.start_soon(c.start, name)
            members = sorted(c.members, key=lambda m: m.name)
            await wait_until(
                lambda: settled(members, fixtures, c.sim) and balanced(members, fixtures), 40
            )
            # The vendor drops every connection at once: both instances reconnect their share.
            before = len(c.sim.attempts)
            for fx in fixtures:
                c.sim.remove_fixture(fx)  # its connections close (1001)
                c.sim.add_fixture(fx, kind="tracking")
            await wait_until(
                lambda: (
                    len(c.sim.attempts) >= before + len(fixtures)
                    and settled(members, fixtures, c.sim)
                ),
                20,
            )
            times = sorted(attempt.at for attempt in c.sim.attempts)
            busiest = max(sum(1 for t in times if t0 <= t <= t0 + 1.0) for t0 in times)
            assert busiest <= rate + 1, [round(t - times[0], 3) for t in times]
            # The instances did wait for cluster-wide slots (not only their own limiters).
            assert sum(m.node.connect_waits for m in members) > 0
            c.check_healthy()


# -- 7. Redis through Sentinel ---------------------------------------------------------------


@pytest.mark.slow
async def test_sentinel_failover_loses_and_duplicates_nothing(
    tmp_path: Path, sentinel_group: SentinelGroup
) -> None:
    """Two instances on a Sentinel-watched Redis (a primary, a replica, three sentinels), each
    owning two fixtures, a subscriber on each to all four. Replication is cut, then the primary
    is killed (-9) a moment later: the promoted replica lacks the last appends. Each owner
    finds its streams behind what Redis had confirmed and appends the missing frames again
    from memory: every subscriber sees every frame once, in order; frames flow again within
    the failover + 2 s (+ slack); no instance stopped. The streams are whole again: a third
    instance started afterwards sends a ``backfill: -1`` subscriber every frame from seq 1
    (the relays, caught up before the kill, would not have noticed a hole; the stream
    would have one). One fixture's vendor goes quiet before the kill: its owner has nothing
    to append, and its stream is made whole all the same (the next round notices)."""
    group = sentinel_group
    fixtures = ranked(2, "gw-a") + ranked(2, "gw-b")
    quiet = fixtures[0]
    with trio.fail_after(60):
        # No stall detection (reconnect) while the quiet fixture is quiet.
        async with cluster_of(
            tmp_path, group, tracking(fixtures), upstream={"stall_timeout": 60.0}
        ) as c:
            members, owner = await two_settled(c, fixtures)
            async with trio.open_nursery() as nursery:
                subs = await subscribed_everywhere(nursery, members, fixtures)

                def confirmed(fx: str) -> int:
                    appended: dict[str, int] = owner[fx].node.appender.appended
                    return appended.get(f"tracking/{fx}", 0)

                primary = await trio.to_thread.run_sync(group.cut_replication)
                cut = {fx: confirmed(fx) for fx in fixtures}
                # Appends the replica will never have: at least 10 per fixture.
                await wait_until(lambda: all(confirmed(fx) >= cut[fx] + 10 for fx in fixtures))
                c.sim.faults(quiet).stall = True
                quiet_owner = owner[quiet].node
                await wait_until(
                    lambda: (
                        quiet_owner.appender.appended.get(f"tracking/{quiet}")
                        == owner[quiet].seq(quiet)
                    )
                )
                killed_at = trio.current_time()
                await primary.akill()
                promoted = await group.await_failover(primary)
                failover = trio.current_time() - killed_at
                # A frame the simulator was sending when the stall began has arrived by now.
                quiet_seq = owner[quiet].seq(quiet)

                async def quiet_whole() -> bool:
                    rows = await trio.to_thread.run_sync(
                        promoted.call, "XREVRANGE", f"dde:stream:tracking/{quiet}", "+", "-",
                        "COUNT", "1",
                    )  # fmt: skip
                    return bool(rows) and rows[0][0] == b"%d-0" % quiet_seq  # type: ignore[index]

                with trio.fail_after(10):
                    while not await quiet_whole():  # noqa: ASYNC110 - the state is in Redis
                        await trio.sleep(0.05)
                assert owner[quiet].seq(quiet) == quiet_seq  # still quiet: no frame since
                c.sim.faults(quiet).stall = False
                back = {(n, fx): s.count(fx) for n, s in subs.items() for fx in fixtures}
                await wait_until(
                    lambda: all(
                        s.count(fx) >= back[n, fx] + 25 for n, s in subs.items() for fx in fixtures
                    ),
                    20,
                )
                for fx in fixtures:
                    rows = promoted.call("XRANGE", f"dde:stream:tracking/{fx}", "-", "+")
                    assert isinstance(rows, list)
                    ids = [row[0] for row in rows if isinstance(row, list)]
                    seqs = [int(i.split(b"-")[0]) for i in ids if isinstance(i, bytes)]
                    assert seqs == list(range(1, len(seqs) + 1)), f"{fx}: {_breaks(seqs)}"
                late_member = await c.start("gw-c")
                await wait_until(
                    lambda: all(
                        late_member.epoch(fx) == owner[fx].epoch(fx) and late_member.seq(fx)
                        for fx in fixtures
                    ),
                    15,
                )
                late = await Subscriber.open(nursery, late_member)
                for fx in fixtures:
                    await late.subscribe("tracking", fx, backfill=-1)
                await wait_until(
                    lambda: all(late.count(fx) >= back["gw-a", fx] + 25 for fx in fixtures), 20
                )
                for sub in [*subs.values(), late]:
                    await sub.close()
            for fx in fixtures:
                assert late.frames[fx][0][0] == 1, fx
                assert_contiguous(late.frames[fx], f"{fx} backfilled on gw-c")
            for name, sub in subs.items():
                for fx in fixtures:
                    # Every frame once, in order, on the owner and on the relay.
                    assert_contiguous(sub.frames[fx], f"{fx} on {name}")
                    if fx == quiet:
                        continue  # its vendor was quiet on purpose
                    pause = longest_pause(sub.arrivals[fx], killed_at)
                    assert pause <= failover + 2.0 + 3.0, (name, fx, pause, failover)
                    print(f"{name} {fx}: failover {failover:.2f} s, longest pause {pause:.2f} s")
                assert not sub.gaps, sub.gaps
            for m in members:
                assert not m.done.is_set(), f"{m.name} stopped"
                # What the promoted replica lacked came again from memory, all of it.
                assert m.node.appender.frames_reappended >= 20, m.name
                assert m.node.appender.frames_lost == 0, m.name
                # The failover moved no lease: no fencing, no lease lost, no takeover.
                assert (m.node.fenced, m.node.leases_lost) == (0, 0), m.name
            assert all(owner[fx].owns(fx) for fx in fixtures)
            c.check_healthy()
