"""The JavaScript client (clients/js, docs/clients-js.md) under Node, driven from here.

Covers: its own unit tests (``node --test clients/js/test/``: the sans-I/O core event by event,
the bounded queue's two policies, the watchdog) pass; the hand-written declarations compile
with ``tsc --strict`` against a file that uses every one of them; the package versions with the
gateway and ``npm pack`` builds it offline with exactly its files; the dashboard ships the
client byte for byte; and ``examples/watch.mjs --events`` against a real gateway following the
simulator: upstream drops (every seq once, no event but frames), a gateway restart without a
recorder (a ``loss`` event with the range, then the new epoch's frames) and with one across two
URLs (``recovered``, no loss, every seq once), a token refused (fatal error, exit 3), a slow
application (the socket paused, the gateway's 4008, a resume: every seq once or an explicit
loss), bad arguments (exit 2). The scenarios both clients share run for Node in
tests/test_client_conformance.py (the ``node`` runner of tests/clients_kit.py).

Node is Debian's ``nodejs`` (``.ci/test`` installs it as root when missing), ``tsc`` Debian's
``node-typescript``; without them these tests fail in CI (``CI=true``) and skip elsewhere.
Rules: 127.0.0.1 port 0 (a restarted gateway takes the port its predecessor was given),
``trio.fail_after`` on every test, waits on what the client printed, never a guessed sleep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import gateway
from gateway.config import Config
from gateway.service import Gateway
from gateway.simulator import Simulator
from tests.conftest import TEST_TOKEN
from tests.kit import gateway_config, running_gateway, stream_url, wait_until

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "clients" / "js"
WATCH = JS / "examples" / "watch.mjs"
DASHBOARD = ROOT / "gateway" / "controlplane" / "dashboard"
#: The client's source files the dashboard ships (byte for byte).
SHIPPED = ("core.js", "client.js")
FX = "5501b26a-1c44-4c3b-9ff5-9322084d41f9"


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        why = f"{name} is missing: apt-get install -y {package} (.ci/test does it as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def node() -> str:
    return _tool("node", "nodejs")


def test_the_clients_own_tests_pass_under_node(node: str) -> None:
    result = subprocess.run(
        [node, "--test", *sorted(str(p) for p in (JS / "test").glob("*.test.mjs"))],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout and "# pass " in result.stdout


def test_the_declarations_compile_strictly() -> None:
    tsc = _tool("tsc", "node-typescript")
    result = subprocess.run(
        [
            tsc,
            "--noEmit",
            "--strict",
            "--module",
            "nodenext",
            "--moduleResolution",
            "nodenext",
            "--target",
            "es2022",
            "--lib",
            "es2022,dom",
            "test/types.ts",
        ],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_package_versions_with_the_gateway_and_packs_offline(node: str, tmp_path: Path) -> None:
    package = json.loads((JS / "package.json").read_text())
    assert package["version"] == gateway.__version__
    assert package["type"] == "module" and "dependencies" not in package
    assert package["ddeProtocols"] == ["dde.v1"]
    npm = _tool("npm", "npm")
    env = {**os.environ, "npm_config_offline": "true", "npm_config_cache": str(tmp_path / "c")}
    result = subprocess.run(
        [npm, "pack", "--json", "--pack-destination", str(tmp_path)],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    (packed,) = json.loads(result.stdout)
    with tarfile.open(tmp_path / packed["filename"]) as tar:
        names = {n.removeprefix("package/") for n in tar.getnames()}
    assert names == {
        "package.json",
        "index.js",
        "index.d.ts",
        "node.js",
        "node.d.ts",
        "src/core.js",
        "src/client.js",
        "src/node.js",
        "examples/watch.mjs",
        "README.md",
    }


def test_the_dashboard_ships_the_client_byte_for_byte() -> None:
    for name in SHIPPED:
        assert (DASHBOARD / name).read_bytes() == (JS / "src" / name).read_bytes(), (
            f"gateway/controlplane/dashboard/{name} differs from clients/js/src/{name}: "
            f"cp clients/js/src/{name} gateway/controlplane/dashboard/"
        )
    # The browser half never imports Node's (node:http) WebSocket.
    for name in SHIPPED:
        assert "node:" not in (JS / "src" / name).read_text()


# -- watch.mjs against a real gateway ---------------------------------------------------------


class Watch:
    """A ``watch.mjs --events`` process: every line it printed, parsed, as it comes."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        self.changed = trio.Event()

    async def read(self) -> None:
        assert self.process.stdout is not None
        buf = b""
        async for chunk in self.process.stdout:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            self.events.extend(json.loads(line) for line in lines if line)
            self.changed.set()
            self.changed = trio.Event()

    async def read_stderr(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.stderr += chunk

    async def until(self, predicate: Callable[[list[dict[str, Any]]], bool]) -> None:
        while not predicate(self.events):
            await self.changed.wait()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    def seqs(self) -> list[int]:
        return [e["seq"] for e in self.of("frame")]

    def frames_after(self, predicate: Callable[[dict[str, Any]], bool]) -> int:
        """How many frames came after the first event matching *predicate* (0: none yet)."""
        for i, e in enumerate(self.events):
            if predicate(e):
                return sum(1 for f in self.events[i:] if f["event"] == "frame")
        return 0


@asynccontextmanager
async def watching(node: str, *args: str) -> AsyncIterator[Watch]:
    process = await trio.lowlevel.open_process(
        [node, str(WATCH), "--events", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    watch = Watch(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.read)
            nursery.start_soon(watch.read_stderr)
            yield watch
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


class Stoppable:
    """A whole gateway in a task of the test's nursery that the test stops (drained, then
    cancelled; its ports free once :meth:`stop` returns) while the rest goes on."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.gone = trio.Event()
        self.gateway: Gateway | None = None

    async def start(self, nursery: trio.Nursery, config: Config) -> Gateway:
        self.gateway = Gateway(config)
        await nursery.start(self._run, self.gateway)
        return self.gateway

    async def _run(self, gw: Gateway, *, task_status: trio.TaskStatus[Any]) -> None:
        try:
            with self.scope:
                await gw.run(task_status=task_status)
        finally:
            self.gone.set()

    async def stop(self) -> None:
        assert self.gateway is not None
        await self.gateway.drain()
        self.scope.cancel()
        await self.gone.wait()


def _simulator(rate_hz: float = 50.0) -> Simulator:
    sim = Simulator(tokens={TEST_TOKEN}, rate_hz=rate_hz, heartbeat_interval=1.0)
    sim.add_fixture(FX, kind="tracking")
    return sim


def _config(tmp_path: Path, sim_port: int, stream_port: int = 0, **sections: Any) -> Config:
    (tmp_path / "token").write_text(TEST_TOKEN)
    return gateway_config(
        sim_port,
        tmp_path / "token",
        [("tracking", FX)],
        gateway={"stream_listen": f"127.0.0.1:{stream_port}", "http_listen": "127.0.0.1:0"},
        **sections,
    )


def _port(gw: Gateway) -> int:
    assert gw.bound is not None
    return gw.bound.stream.port


def _each_once_or_told(events: list[dict[str, Any]]) -> None:
    """Per epoch, every frame's seq is the previous one + 1, unless a loss event between them
    names the frames in between: nothing repeated, nothing skipped silently."""
    last: int | None = None
    for e in events:
        if e["event"] == "frame":
            if last is not None:
                assert e["seq"] == last + 1, (last, e["seq"])
            last = e["seq"]
        elif e["event"] == "loss":
            assert last is None or e["from_seq"] == last + 1, (last, e)
            last = e["to_seq"]


async def test_upstream_drops_then_a_restart_without_a_recorder(node: str, tmp_path: Path) -> None:
    sim = _simulator()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            sim_port = await nursery.start(sim.serve, "127.0.0.1", 0)
            first = Stoppable()
            gw = await first.start(nursery, _config(tmp_path, sim_port))
            url = stream_url(gw)
            async with watching(node, "--url", url, f"tracking/{FX}") as watch:
                await watch.until(lambda ev: len(watch.of("frame")) >= 5)
                # The vendor drops the gateway's connection twice: the gateway resumes it.
                sim.faults(FX).drop_after_frames = 10
                await wait_until(lambda: _reconnects(gw) >= 2, 30)
                sim.faults(FX).drop_after_frames = None
                count = len(watch.of("frame"))
                await watch.until(lambda ev: len(watch.of("frame")) >= count + 20)
                assert watch.of("loss") == [] and len(watch.of("subscribed")) == 1
                epoch = watch.of("subscribed")[0]["epoch"]
                # The same port, a new gateway, no recorder: a new epoch.
                await first.stop()
                before = watch.seqs()[-1]
                async with running_gateway(_config(tmp_path, sim_port, _port(gw))):
                    await watch.until(
                        lambda ev: watch.frames_after(lambda e: e["event"] == "loss") >= 5
                    )
            nursery.cancel_scope.cancel()
    assert watch.process.returncode == 0
    (loss,) = watch.of("loss")
    first_sub, again = watch.of("subscribed")
    assert (first_sub["resumed"], again["resumed"], again["recovered"]) == (False, True, False)
    assert again["epoch"] != epoch
    assert loss == {
        "event": "loss",
        "feed": "tracking",
        "fixture": FX,
        "from_seq": before + 1,
        "to_seq": again["seq"],
        "epoch_before": epoch,
        "epoch_after": again["epoch"],
        "reason": "epoch_changed",
    }
    _each_once_or_told(watch.events)
    states = [e["state"] for e in watch.of("state")]
    assert states[:2] == ["connecting", "connected"] and states[-1] == "closed"
    assert "disconnected" in states


def _reconnects(gw: Gateway) -> int:
    view = gw.fixture_view("tracking", FX)
    return 0 if view is None else int(view.upstream["reconnects"])


def _closed_port() -> int:
    """A port nothing listens on (bound, then released): a gateway that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_restart_with_a_recorder_is_recovered_across_two_urls(
    node: str, tmp_path: Path
) -> None:
    sim = _simulator()
    down = f"ws://127.0.0.1:{_closed_port()}/v1/stream"
    recorder = {"dir": str(tmp_path / "rec")}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            sim_port = await nursery.start(sim.serve, "127.0.0.1", 0)
            first = Stoppable()
            gw = await first.start(nursery, _config(tmp_path, sim_port, recorder=recorder))
            url = stream_url(gw)
            # The first URL is down: the client goes on to the second, and round again.
            async with watching(node, "--url", down, "--url", url, f"tracking/{FX}") as watch:
                await watch.until(lambda ev: len(watch.of("frame")) >= 20)
                await first.stop()
                await watch.until(lambda ev: watch.of("state")[-1]["state"] == "disconnected")
                stopped_at = watch.seqs()[-1]
                second = Stoppable()
                await second.start(
                    nursery, _config(tmp_path, sim_port, _port(gw), recorder=recorder)
                )
                await watch.until(lambda ev: len(watch.of("frame")) >= stopped_at + 40)
            nursery.cancel_scope.cancel()
    assert watch.process.returncode == 0
    assert watch.of("loss") == []
    first_sub, again = watch.of("subscribed")
    assert again["epoch"] == first_sub["epoch"]
    assert (again["resumed"], again["recovered"]) == (True, True)
    seqs = watch.seqs()
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # every frame once, in order
    tried = [e["url"] for e in watch.of("state") if e["state"] == "connecting"]
    assert down in tried and tried.count(url) >= 2
    assert all(e["url"] == url for e in watch.of("state") if e["state"] == "connected")


async def test_a_refused_token_is_fatal(node: str, tmp_path: Path) -> None:
    sim = _simulator()
    tokens = tmp_path / "subscribers"
    tokens.write_text("client-token-1\n")
    (tmp_path / "client-token").write_text("client-token-1\n")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            sim_port = await nursery.start(sim.serve, "127.0.0.1", 0)
            config = _config(tmp_path, sim_port, subscribers={"tokens_file": str(tokens)})
            first = Stoppable()
            gw = await first.start(nursery, config)
            args = ("--url", stream_url(gw), "--token-file", str(tmp_path / "client-token"))
            async with watching(node, *args, f"tracking/{FX}") as watch:
                await watch.until(lambda ev: len(watch.of("frame")) >= 5)
                # The token is revoked (the file changes), and the connection drops.
                tokens.write_text("another-token\n")
                await first.stop()
                await Stoppable().start(
                    nursery,
                    _config(
                        tmp_path, sim_port, _port(gw), subscribers={"tokens_file": str(tokens)}
                    ),
                )
                await watch.process.wait()
            nursery.cancel_scope.cancel()
    assert watch.process.returncode == 3
    (error,) = watch.of("error")
    assert error["fatal"] is True and "401" in error["message"]
    assert watch.events[-2:] == [
        {"event": "unsubscribed", "feed": "tracking", "fixture": FX, "reason": error["message"]},
        {"event": "state", "state": "closed", "url": stream_url(gw), "reason": error["message"]},
    ]
    assert b"client-token-1" not in watch.stderr
    assert not any("client-token-1" in json.dumps(e) for e in watch.events)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "at least one FEED/FIXTURE"),
        (["tracking"], "expected FEED/FIXTURE"),
        (["--url", "http://x/v1/stream", "t/F"], "--url must be ws:// or wss://"),
        (["--backfill", "-2", "t/F"], "--backfill must be -1 to"),
        (["--max-queue", "x", "t/F"], "--max-queue must be an integer"),
        (["--token-file", "/nonexistent/t", "t/F"], "--token-file /nonexistent/t: ENOENT"),
        (["--events", "--raw", "t/F"], "either --events or --raw"),
        (["--bogus", "t/F"], "Unknown option '--bogus'"),
    ],
)
def test_bad_arguments_exit_2(node: str, args: list[str], says: str) -> None:
    result = subprocess.run(
        [node, str(WATCH), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert says in result.stderr and "usage: watch.mjs" in result.stderr


def _stats(stderr: bytes) -> dict[str, int]:
    (line,) = [ln for ln in stderr.decode().splitlines() if ln.startswith("watch.mjs: stats ")]
    out: dict[str, int] = json.loads(line.removeprefix("watch.mjs: stats "))
    return out


async def test_a_slow_application_pushes_back_and_resumes(node: str, tmp_path: Path) -> None:
    """The application reads 1 event every 10 ms from a 200 Hz feed: its queue (50 events)
    fills, the client stops reading the socket, the gateway's queue passes its budget (4008),
    and the client resumes from the last frame it queued: every seq once or an explicit loss."""
    sim = _simulator(rate_hz=200.0)
    subscribers = {"queue_bytes": 16 * 1024}
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            sim_port = await nursery.start(sim.serve, "127.0.0.1", 0)
            config = _config(
                tmp_path, sim_port, subscribers=subscribers, feeds={"tracking": {"history": 20000}}
            )
            async with running_gateway(config) as gw:
                args = ("--url", stream_url(gw), "--max-queue", "50", "--slow-ms", "10")
                started = trio.current_time()
                async with watching(node, *args, f"tracking/{FX}") as watch:
                    await watch.until(
                        lambda ev: (
                            len(watch.of("subscribed")) >= 2
                            and watch.frames_after(lambda e: e is watch.of("subscribed")[1]) >= 10
                        )
                    )
                    print(f"resumed after {trio.current_time() - started:.1f} s")
            nursery.cancel_scope.cancel()
    stats = _stats(watch.stderr)
    print(stats)
    assert stats["pauses"] >= 1
    reasons = [e["reason"] for e in watch.of("state") if e["state"] == "disconnected"]
    assert reasons and reasons[0].startswith("closed 4008"), reasons
    # The history (20,000 frames) still held what the client had not read: recovered.
    assert [(s["resumed"], s["recovered"]) for s in watch.of("subscribed")[:2]] == [
        (False, False),
        (True, True),
    ]
    assert watch.of("loss") == [] and stats["duplicates"] == 0
    _each_once_or_told(watch.events)
