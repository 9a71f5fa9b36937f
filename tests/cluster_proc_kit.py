"""The cluster as real processes: ``dde-gateway run`` instances on one redis-server and the
simulator of the test process (``tests/test_cluster_process.py``, ``test_cluster_rolling.py``).

:func:`cluster` starts the simulator (tracking fixtures at :data:`RATE_HZ`), a sampler of its
sessions and the named instances together; :meth:`Cluster.start` starts (or restarts) one
instance later. What an instance says comes from its API and its JSON log lines (stderr), the
lease holders and streams from Redis itself. :class:`Watcher` is a multiplexed ``/v1/stream``
subscriber of every fixture keeping each frame's (seq, vendor ix, arrival time).

Rules: real processes, real time, ports 0 learned from the "gateway ready" log line; every wait
polls a condition under a deadline (no sleep is taken as proof); the processes are SIGKILLed in
a ``finally`` whatever happens.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import attrs
import coredis
import orjson
import trio
import trio_websocket
from coredis.retry import NoRetryPolicy

from gateway.cluster import rank
from gateway.simulator import Simulator
from tests.conftest import TEST_TOKEN
from tests.kit import TRACKING_PATH, GatewayProcess
from tests.redis_kit import RedisServer

RATE_HZ: Final = 25.0
#: The deadline of waits for things that take a second or two.
WAIT: Final = 30.0
POLL: Final = 0.05


def balanced(instances: Sequence[str], each: int) -> dict[str, list[str]]:
    """*each* fixture ids per instance that rendezvous hashing gives to that instance."""
    home: dict[str, list[str]] = {name: [] for name in instances}
    for n in itertools.count():
        if all(len(ids) == each for ids in home.values()):
            break
        fixture = f"fx-{n:02d}"
        first = rank(f"tracking/{fixture}", instances)[0]
        if len(home[first]) < each:
            home[first].append(fixture)
    return home


def report(text: str) -> None:
    """A measured number, for docs/cluster.md (shown with ``pytest -s``)."""
    print(f"[cluster-process] {text}", file=sys.stderr)


async def wait_for(
    predicate: Callable[[], Any],
    what: str,
    timeout: float = WAIT,  # noqa: ASYNC109 - the deadline is the point
) -> float:
    """Poll *predicate* (plain or async) until it holds; the seconds that took. Fails naming
    *what* after *timeout*."""
    start = trio.current_time()
    with trio.move_on_after(timeout):
        while True:
            value = predicate()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return trio.current_time() - start
            await trio.sleep(POLL)
    raise AssertionError(f"not within {timeout} s: {what}")


async def get_json(url: str) -> tuple[int, Any]:
    """GET *url* in a worker thread: (status, parsed body). Never to a stopped process (the
    thread cannot be cancelled; its own timeout bounds it)."""

    def fetch() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    status, body = await trio.to_thread.run_sync(fetch)
    try:
        return status, orjson.loads(body)
    except orjson.JSONDecodeError:
        return status, body


# -- the gateway processes -------------------------------------------------------------------


@attrs.frozen
class Settings:
    """What every instance's config says beyond the fixtures and addresses."""

    lease_ttl: float
    connect_rate: float
    backoff_max: float = 0.5
    redis_timeout: float = 1.0  # below what a 3 s lease allows (check-config)
    #: ``[gateway] drain_timeout`` (None: the default); half of it is a stop's handover time.
    drain_timeout: float | None = None
    #: More ``[cluster]`` lines (e.g. ``standby = true``).
    extra: tuple[str, ...] = ()


def write_config(
    path: Path,
    *,
    sim_port: int,
    redis_url: str,
    instance: str,
    fixtures: Sequence[str],
    settings: Settings,
) -> None:
    lines = [
        "[gateway]",
        'stream_listen = "127.0.0.1:0"',
        'http_listen = "127.0.0.1:0"',
        *([f"drain_timeout = {settings.drain_timeout}"] if settings.drain_timeout else []),
        "[upstream]",
        f'token_file = "{path.parent / "token"}"',
        f"connect_rate = {settings.connect_rate}",
        "backoff_initial = 0.05",
        f"backoff_max = {settings.backoff_max}",
        # The test's subscribers share a loaded process with the simulator: never "too slow".
        "[subscribers]",
        "queue_bytes = 67108864",
        "[feeds.tracking]",
        'kind = "tracking"',
        f'url = "ws://127.0.0.1:{sim_port}{TRACKING_PATH}"',
        "[cluster]",
        f'redis_url = "{redis_url}"',
        f'instance = "{instance}"',
        f"lease_ttl = {settings.lease_ttl}",
        f"redis_timeout = {settings.redis_timeout}",
        *settings.extra,
    ]
    for fx in fixtures:
        lines += ["[[fixtures]]", 'feed = "tracking"', f'id = "{fx}"']
    path.write_text("\n".join(lines) + "\n")


class Node(GatewayProcess):
    """One ``dde-gateway run`` process: its JSON log lines, and its addresses once ready."""

    def __init__(self, name: str, process: trio.Process) -> None:
        super().__init__(process)
        self.name = name

    def lines(self, needle: str) -> list[str]:
        """The log messages containing *needle*."""
        return [r["msg"] for r in self.logs if needle in r.get("msg", "")]

    def stepped_down(self) -> list[str]:
        """Its step-downs other than handovers (a lost lease, fencing)."""
        return [m for m in self.lines("no longer owner (") if "(handed over" not in m]

    def handed_warm(self) -> set[str]:
        """The fixtures it handed over make-before-break: the vendor saw a second session of
        each while the successor's warm connection got in step (by design)."""
        return {m.split()[1].split("/")[1] for m in self.lines(", make-before-break")}

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    async def get(self, path: str) -> tuple[int, Any]:
        return await get_json(f"http://{self.http}{path}")

    async def views(self) -> dict[str, dict[str, Any]]:
        """``GET /v1/fixtures``, by fixture id."""
        status, body = await self.get("/v1/fixtures")
        assert status == 200, body
        return {v["fixture"]: v for v in body}

    async def roles(self) -> dict[str, tuple[str, str]]:
        """Each fixture's (role here, owner) as ``GET /v1/fixtures`` says."""
        return {fx: (v["role"], v["owner"]) for fx, v in (await self.views()).items()}

    async def cluster(self) -> dict[str, Any]:
        status, body = await self.get("/v1/cluster")
        assert status == 200, body
        return dict(body)

    async def readiness(self) -> str:
        """``/readyz``'s status: ``ready``, or ``degraded`` (200 both) while Redis is away."""
        status, body = await self.get("/readyz")
        assert status == 200, body
        return str(body["status"])

    async def owns(self, fixtures: Sequence[str]) -> bool:
        roles = await self.roles()
        return all(roles[fx] == ("owner", self.name) for fx in fixtures)


# -- what the simulator sees ------------------------------------------------------------------


class Sessions:
    """Samples the simulator's sessions of each fixture every 10 ms; keeps every sample with
    more than one."""

    def __init__(self, sim: Simulator, fixtures: Sequence[str]) -> None:
        self.sim = sim
        self.fixtures = list(fixtures)
        self.samples = 0
        #: (trio time, fixture, sessions) of each sample with more than one session.
        self.doubles: list[tuple[float, str, int]] = []

    async def run(self) -> None:
        while True:
            now = trio.current_time()
            for fx in self.fixtures:
                n = self.sim.sessions(fx)
                if n > 1:
                    self.doubles.append((now, fx, n))
            self.samples += 1
            await trio.sleep(0.01)

    def all_single(self) -> bool:
        return all(self.sim.sessions(fx) == 1 for fx in self.fixtures)

    def doubles_outside(self, start: float, end: float) -> list[tuple[float, str, int]]:
        return [d for d in self.doubles if not start <= d[0] <= end]


def most_in_a_second(times: list[float]) -> int:
    """The most of *times* in any closed 1-second window."""
    times = sorted(times)
    best = j = 0
    for i, t in enumerate(times):
        while times[j] < t - 1.0:
            j += 1
        best = max(best, i - j + 1)
    return best


def check_connect_rate(sim: Simulator, rate: float) -> None:
    times = [a.at for a in sim.attempts]
    most = most_in_a_second(times)
    report(f"{len(times)} connect attempts, at most {most} in a 1 s window (rate {rate})")
    assert most <= rate + 1, sorted(times)


# -- subscribers ------------------------------------------------------------------------------

#: (seq, vendor ix, arrival trio time) of a frame a subscriber got.
Got = tuple[int, int, float]


class Watcher:
    """A multiplexed ``/v1/stream`` subscriber of *fixtures*, keeping what it gets.

    *resume* maps fixtures to ``(after, epoch)``; the others are subscribed live.
    """

    def __init__(
        self,
        node: Node,
        fixtures: Sequence[str],
        resume: dict[str, tuple[int, str]] | None = None,
    ) -> None:
        self.node = node
        self.fixtures = list(fixtures)
        self.resume = resume or {}
        self.frames: dict[str, list[Got]] = {fx: [] for fx in fixtures}
        self.subscribed: dict[str, list[dict[str, Any]]] = {fx: [] for fx in fixtures}
        self.states: dict[str, list[str]] = {fx: [] for fx in fixtures}
        #: Messages other than frames, subscribed, status and heartbeats (gaps, errors).
        self.other: list[dict[str, Any]] = []
        self.closed: str | None = None
        #: The close code the server sent (None: open, or no close frame).
        self.close_code: int | None = None
        self._scope = trio.CancelScope()

    def stop(self) -> None:
        """Leave (the test has seen enough of this subscriber)."""
        self.closed = self.closed or "left"
        self._scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        url = f"ws://{self.node.stream}/v1/stream"
        try:
            with self._scope:
                await self._run(url, task_status)
        except trio_websocket.ConnectionClosed as exc:
            self.close_code = None if exc.reason is None else exc.reason.code
            self.closed = repr(exc)
        except OSError as exc:
            self.closed = repr(exc)

    async def _run(self, url: str, task_status: trio.TaskStatus[None]) -> None:
        async with trio_websocket.open_websocket_url(url) as ws:
            for fx in self.fixtures:
                req: dict[str, Any] = {"op": "subscribe", "feed": "tracking", "fixture": fx}
                if fx in self.resume:
                    req["after"], req["epoch"] = self.resume[fx]
                await ws.send_message(orjson.dumps(req).decode())
            task_status.started()
            while True:
                self._take(orjson.loads(await ws.get_message()))

    def _take(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "frame":
            got = (msg["seq"], msg["data"]["ix"], trio.current_time())
            self.frames[msg["fixture"]].append(got)
        elif kind == "subscribed":
            self.subscribed[msg["fixture"]].append(msg)
        elif kind == "status":
            self.states[msg["fixture"]].append(msg["state"])
        elif kind != "heartbeat":
            self.other.append(msg)

    def last(self, fx: str) -> Got:
        return self.frames[fx][-1]

    def epoch(self, fx: str) -> str:
        return str(self.subscribed[fx][-1]["epoch"])

    def got_since(self, t: float, n: int, fixtures: Sequence[str] | None = None) -> bool:
        """Each of *fixtures* (default: all it follows) got at least *n* frames after trio
        time *t*."""
        if self.closed is not None:
            raise AssertionError(f"{self.node.name}'s subscriber was closed: {self.closed}")
        return all(
            sum(1 for f in self.frames[fx] if f[2] > t) >= n for fx in fixtures or self.fixtures
        )


def breaks(frames: list[Got], *, ix: bool = True) -> list[str]:
    """Where *frames* do not follow one another (seq; and vendor ix if *ix*)."""
    return [
        f"seq {s0} -> {s1}, ix {i0} -> {i1}"
        for (s0, i0, _), (s1, i1, _) in itertools.pairwise(frames)
        if s1 != s0 + 1 or (ix and i1 != i0 + 1)
    ]


def all_breaks(watchers: list[Watcher], *, ix: bool = True) -> list[str]:
    return [
        f"{w.node.name} {fx}: {b}"
        for w in watchers
        for fx in w.fixtures
        for b in breaks(w.frames[fx], ix=ix)
    ]


def longest_pause(frames: list[Got], after: float) -> tuple[float, float]:
    """The longest time without a frame after trio time *after*, and when it ended."""
    times = [after] + [t for _, _, t in frames if t > after]
    return max(((b - a, b) for a, b in itertools.pairwise(times)), default=(0.0, after))


# -- Redis, as the test reads it --------------------------------------------------------------


@asynccontextmanager
async def redis_client(redis: RedisServer) -> AsyncIterator[coredis.Redis[bytes]]:
    async with coredis.Redis.from_url(
        redis.unix_url, retry_policy=NoRetryPolicy(), decode_responses=False
    ) as client:
        yield client


def _jumps(values: list[int]) -> list[tuple[int, int]]:
    return [(a, b) for a, b in itertools.pairwise(values) if b != a + 1][:10]


async def check_streams(redis: RedisServer, fixtures: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Every fixture's stream holds seqs one after the other (ids ``<seq>-0``) and vendor
    positions likewise: nothing twice, nothing left out, nothing from a stale owner. Returns
    the (first, last) seq of each."""
    out = {}
    async with redis_client(redis) as client:
        for fx in fixtures:
            seqs: list[int] = []
            positions: list[int] = []
            for entry in await client.xrange(f"dde:stream:tracking/{fx}"):
                ident = entry.identifier
                seq, sub = (ident.decode() if isinstance(ident, bytes) else ident).split("-")
                assert sub == "0", (fx, ident)
                seqs.append(int(seq))
                positions.append(int(entry.field_values[b"p"]))
            assert seqs, fx
            assert not _jumps(seqs), (fx, "seqs", _jumps(seqs))
            assert not _jumps(positions), (fx, "vendor positions", _jumps(positions))
            out[fx] = (seqs[0], seqs[-1])
    return out


async def stream_epochs(redis: RedisServer, fixtures: Sequence[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    async with redis_client(redis) as client:
        for fx in fixtures:
            epoch = await client.hget(f"dde:meta:tracking/{fx}", "epoch")
            out[fx] = None if epoch is None else epoch.decode()
    return out


async def lease_holders(redis: RedisServer, fixtures: Sequence[str]) -> dict[str, str | None]:
    """The instance holding each fixture's lease (None: free)."""
    out: dict[str, str | None] = {}
    async with redis_client(redis) as client:
        for fx in fixtures:
            token = await client.get(f"dde:lease:tracking/{fx}")
            out[fx] = None if token is None else token.decode().rsplit("/", 1)[0]
    return out


# -- the whole set-up -------------------------------------------------------------------------


class Cluster:
    """The simulator, its session sampler, Redis and the instances of one test."""

    def __init__(
        self,
        sim: Simulator,
        sessions: Sessions,
        redis: RedisServer,
        nursery: trio.Nursery,
        *,
        tmp_path: Path,
        sim_port: int,
        fixtures: Sequence[str],
        settings: Settings,
    ) -> None:
        self.sim = sim
        self.sessions = sessions
        self.redis = redis
        self.nursery = nursery
        self.tmp_path = tmp_path
        self.sim_port = sim_port
        self.fixtures = list(fixtures)
        self.settings = settings
        #: Fixture -> its owner as rendezvous hashing says over the instances started
        #: together (what :meth:`settle` waits for when not told otherwise).
        self.owner_of: dict[str, str] = {}
        #: The current process of each instance.
        self.nodes: dict[str, Node] = {}
        #: Every process started, restarted ones' earlier lives included.
        self.lives: list[Node] = []
        self._env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}

    async def spawn(self, name: str) -> Node:
        """Start instance *name* (again, if it ran before); it is ready when ``node.http``
        is set (see :meth:`ready`)."""
        config = self.tmp_path / f"{name}.toml"
        write_config(
            config,
            sim_port=self.sim_port,
            redis_url=self.redis.url,
            instance=name,
            fixtures=self.fixtures,
            settings=self.settings,
        )
        cmd = [sys.executable, "-m", "gateway", "run", "--config", str(config)]
        process = await trio.lowlevel.open_process(
            [*cmd, "--log-format", "json"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self._env,
        )
        node = self.nodes[name] = Node(name, process)
        self.lives.append(node)
        self.nursery.start_soon(node.read_logs)
        return node

    @staticmethod
    async def ready(node: Node) -> float:
        """Wait until *node* said "gateway ready"; the seconds that took."""

        def said() -> bool:
            assert node.running, node.raw[-30:]
            return bool(node.http)

        return await wait_for(said, f"{node.name} ready")

    async def start(self, name: str) -> Node:
        """Start instance *name* (again) and wait until it is ready."""
        node = await self.spawn(name)
        await self.ready(node)
        return node

    async def watch(self, node: Node, resume: dict[str, tuple[int, str]] | None = None) -> Watcher:
        watcher = Watcher(node, self.fixtures, resume)
        await self.nursery.start(watcher.run)
        return watcher

    async def settle(self, owner_of: dict[str, str] | None = None) -> float:
        """Wait until every lease is held as *owner_of* (default :attr:`owner_of`) says, every
        running instance says so, and the simulator streams each fixture once; the seconds
        that took."""
        want = owner_of or self.owner_of
        return await wait_for(lambda: self._settled(want), f"fixtures owned as {want}")

    async def _settled(self, owner_of: dict[str, str]) -> bool:
        if await lease_holders(self.redis, self.fixtures) != owner_of:
            return False
        for name, node in self.nodes.items():
            if not node.running:
                continue
            for fx, (role, owner) in (await node.roles()).items():
                if (role, owner) != ("owner" if owner_of[fx] == name else "relay", owner_of[fx]):
                    return False
        return self.sessions.all_single()

    def print_logs(self) -> None:
        for node in self.lives:
            print(f"--- {node.name}, last log lines", *node.raw[-60:], sep="\n", file=sys.stderr)


@asynccontextmanager
async def cluster(
    tmp_path: Path,
    redis: RedisServer,
    *,
    instances: Sequence[str],
    fixtures: Sequence[str],
    settings: Settings,
    rate_hz: float = RATE_HZ,
) -> AsyncIterator[Cluster]:
    """A simulator with *fixtures* (*rate_hz* frames a second each) and *instances* started
    together and ready. Every process is SIGKILLed and reaped on the way out, whatever
    happened; on a failure their last log lines are printed."""
    (tmp_path / "token").write_text(TEST_TOKEN)
    sim = Simulator(tokens={TEST_TOKEN}, rate_hz=rate_hz, heartbeat_interval=1.0)
    for fx in fixtures:
        sim.add_fixture(fx)
    sessions = Sessions(sim, fixtures)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve, "127.0.0.1", 0)
        nursery.start_soon(sessions.run)
        c = Cluster(
            sim,
            sessions,
            redis,
            nursery,
            tmp_path=tmp_path,
            sim_port=port,
            fixtures=fixtures,
            settings=settings,
        )
        c.owner_of = {fx: rank(f"tracking/{fx}", instances)[0] for fx in fixtures}
        try:
            started = trio.current_time()
            for name in instances:
                await c.spawn(name)
            for node in list(c.nodes.values()):
                await c.ready(node)
            report(f"{len(instances)} processes ready after {trio.current_time() - started:.2f} s")
            yield c
        except BaseException:
            c.print_logs()
            raise
        finally:
            for node in c.lives:
                if node.process.returncode is None:
                    node.process.kill()  # SIGKILL ends a stopped process too
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await node.process.wait()
            nursery.cancel_scope.cancel()
