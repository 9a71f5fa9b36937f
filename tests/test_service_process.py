"""The gateway as a real process: readiness, reload, drain, and the demo command.

Runs ``python -m gateway`` as a subprocess (exactly what systemd runs) against a simulator in
this test process. sd_notify is checked on a real unix datagram socket (NOTIFY_SOCKET); ports
are 0 and learned from the JSON "gateway ready" log line. Real time, generous guards: a process
start on a loaded 2-core machine can take seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import trio
import trio_websocket

from gateway.simulator import Simulator
from gateway.wire import CLOSE_GOING_AWAY, DRAIN_REASON
from tests.conftest import TEST_TOKEN
from tests.kit import TRACKING_PATH, GatewayProcess, http_get, wait_until

A, B, C = "fixture-a", "fixture-b", "fixture-c"


def write_config(
    path: Path,
    sim_port: int,
    fixtures: list[str],
    *,
    drain: float = 5.0,
    stream: str = "127.0.0.1:0",
    http: str = "127.0.0.1:0",
    reuse_port: bool = False,
) -> None:
    lines = [
        "[gateway]",
        f'stream_listen = "{stream}"',
        f'http_listen = "{http}"',
        f"drain_timeout = {drain}",
        f"reuse_port = {'true' if reuse_port else 'false'}",
        "[upstream]",
        f'token_file = "{path.parent / "token"}"',
        "connect_rate = 100.0",
        "backoff_initial = 0.05",
        "backoff_max = 0.5",
        "[feeds.tracking]",
        'kind = "tracking"',
        f'url = "ws://127.0.0.1:{sim_port}{TRACKING_PATH}"',
    ]
    for fx in fixtures:
        lines += ["[[fixtures]]", 'feed = "tracking"', f'id = "{fx}"']
    path.write_text("\n".join(lines) + "\n")


class Proc(GatewayProcess):
    """A gateway subprocess with its log lines and sd_notify datagrams collected."""

    def __init__(
        self,
        process: trio.Process,
        notify: trio.socket.SocketType,
        stderr: trio.abc.ReceiveStream | None = None,
    ) -> None:
        super().__init__(process, stderr)
        self.notify = notify
        self.notes: list[str] = []

    async def read_notify(self) -> None:
        while True:
            data = await self.notify.recv(4096)
            self.notes.extend(data.decode().split("\n"))
            self._poke()

    async def wait_for(self, predicate: Any) -> None:
        while not predicate():
            await self.changed.wait()


@asynccontextmanager
async def gateway_process(
    tmp_path: Path, config: Path, *, journal: bool = False
) -> AsyncIterator[Proc]:
    """*journal*: stderr is a pipe that ``JOURNAL_STREAM`` names, as under systemd."""
    sock_path = str(tmp_path / "notify.sock")
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(sock_path)
    env = {**os.environ, "NOTIFY_SOCKET": sock_path}
    env.pop("JOURNAL_STREAM", None)  # the test runner's own, if it runs under systemd
    cmd = [sys.executable, "-m", "gateway", "run", "--config", str(config), "--log-format", "json"]
    stderr: trio.lowlevel.FdStream | None = None
    async with trio.open_nursery() as nursery:
        if journal:
            read_end, write_end = os.pipe()
            st = os.fstat(write_end)  # both ends of a pipe are one inode
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            try:
                process = await trio.lowlevel.open_process(cmd, env=env, stderr=write_end)
            finally:
                os.close(write_end)
            stderr = trio.lowlevel.FdStream(read_end)
        else:
            process = await trio.lowlevel.open_process(cmd, env=env, stderr=subprocess.PIPE)
        proc = Proc(process, notify, stderr)
        nursery.start_soon(proc.read_logs)
        nursery.start_soon(proc.read_notify)
        try:
            yield proc
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()
            # Stop the readers before closing the socket they wait on.
            nursery.cancel_scope.cancel()
    notify.close()
    if stderr is not None:
        await stderr.aclose()


@asynccontextmanager
async def simulator(tmp_path: Path, *fixtures: str) -> AsyncIterator[tuple[Simulator, int]]:
    (tmp_path / "token").write_text(TEST_TOKEN)
    sim = Simulator(tokens={TEST_TOKEN}, rate_hz=50.0, heartbeat_interval=1.0)
    for fx in fixtures:
        sim.add_fixture(fx)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve, "127.0.0.1", 0)
        yield sim, port
        nursery.cancel_scope.cancel()


async def test_ready_then_sigterm_drains_50_subscribers(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with simulator(tmp_path, A) as (_, port):
            config = tmp_path / "gateway.toml"
            write_config(config, port, [A], drain=5.0)
            async with gateway_process(tmp_path, config) as proc:
                await proc.wait_for(lambda: "READY=1" in proc.notes)
                # READY=1 came after both listeners were bound: both answer right now.
                assert proc.stream and proc.http
                status, body = await http_get(f"http://{proc.http}/readyz")
                assert status == 200, body
                closes: list[tuple[int | None, str | None]] = []
                subscribed = 0
                async with trio.open_nursery() as nursery:
                    sockets = []
                    for _ in range(50):
                        ws = await trio_websocket.connect_websocket_url(
                            nursery, f"ws://{proc.stream}/v1/stream"
                        )
                        await ws.send_message(
                            orjson.dumps(
                                {"op": "subscribe", "feed": "tracking", "fixture": A}
                            ).decode()
                        )
                        sockets.append(ws)

                    async def drain_until_closed(ws: trio_websocket.WebSocketConnection) -> None:
                        nonlocal subscribed
                        try:
                            while True:
                                msg = await ws.get_message()
                                if orjson.loads(msg)["type"] == "subscribed":
                                    subscribed += 1
                        except trio_websocket.ConnectionClosed as exc:
                            assert exc.reason is not None
                            closes.append((exc.reason.code, exc.reason.reason))

                    for ws in sockets:
                        nursery.start_soon(drain_until_closed, ws)
                    # SIGTERM only once the gateway has taken every subscription.
                    await wait_until(lambda: subscribed == 50, timeout=30)
                    started = trio.current_time()
                    proc.process.send_signal(signal.SIGTERM)
                    code = await proc.process.wait()
                    elapsed = trio.current_time() - started
                assert code == 0, proc.raw[-20:]
                # Generous: drain_timeout (5 s) plus interpreter exit on a loaded machine.
                assert elapsed < 5.0 + 10.0
                assert len(closes) == 50
                assert all(c == (CLOSE_GOING_AWAY, DRAIN_REASON) for c in closes), set(closes)
                await proc.wait_for(lambda: "STOPPING=1" in proc.notes)


async def test_sighup_reload_keeps_unchanged_fixture_and_refuses_broken_config(
    tmp_path: Path,
) -> None:
    with trio.fail_after(90):
        async with simulator(tmp_path, A, B, C) as (_, port):
            config = tmp_path / "gateway.toml"
            write_config(config, port, [A, B])
            async with gateway_process(tmp_path, config) as proc:
                await proc.wait_for(lambda: "READY=1" in proc.notes)
                async with trio_websocket.open_websocket_url(f"ws://{proc.stream}/v1/stream") as ws:
                    await ws.send_message(
                        orjson.dumps({"op": "subscribe", "feed": "tracking", "fixture": A}).decode()
                    )
                    seqs: list[int] = []

                    async def collect(n: int) -> None:
                        target = len(seqs) + n
                        while len(seqs) < target:
                            msg = orjson.loads(await ws.get_message())
                            if msg["type"] == "frame":
                                seqs.append(msg["seq"])

                    await collect(10)
                    write_config(config, port, [A, C])
                    proc.process.send_signal(signal.SIGHUP)
                    await proc.wait_for(
                        lambda: any(r["msg"].startswith("reloaded") for r in proc.logs)
                    )
                    await collect(10)
                    status, body = await http_get(f"http://{proc.http}/v1/fixtures")
                    assert status == 200
                    views = {v["fixture"]: v for v in orjson.loads(body)}
                    assert set(views) == {A, C}
                    assert views[A]["upstream"]["connects"] == 1
                    assert views[A]["upstream"]["reconnects"] == 0

                    config.write_text("[upstream]\nconnect_rate = 'fast'\n")
                    proc.process.send_signal(signal.SIGHUP)
                    await proc.wait_for(
                        lambda: any("reload refused" in r["msg"] for r in proc.logs)
                    )
                    refused = next(r["msg"] for r in proc.logs if "reload refused" in r["msg"])
                    assert "$.upstream.connect_rate" in refused
                    await collect(10)
                    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
                    status, body = await http_get(f"http://{proc.http}/v1/fixtures")
                    assert {v["fixture"] for v in orjson.loads(body)} == {A, C}
                    assert proc.process.returncode is None
                assert proc.notes.count("RELOADING=1") == 2
                proc.process.send_signal(signal.SIGTERM)
                assert await proc.process.wait() == 0
                assert TEST_TOKEN not in "\n".join(proc.raw)


async def test_demo_command_serves_frames(tmp_path: Path) -> None:
    with trio.fail_after(90):
        cmd = [
            sys.executable,
            "-m",
            "gateway",
            "demo",
            "--stream-port",
            "0",
            "--http-port",
            "0",
            "--simulator-port",
            "0",
        ]
        process = await trio.lowlevel.open_process(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        try:
            assert process.stdout is not None
            out = b""
            async for chunk in process.stdout:
                out += chunk
                if b"HTTP API:" in out and out.endswith(b"\n\n"):
                    break
            text = out.decode()
            stream = text.split("subscriber WebSocket:")[1].split()[0]
            async with trio_websocket.open_websocket_url(stream) as ws:
                fixture = "5501b26a-1c44-4c3b-9ff5-9322084d41f9"
                await ws.send_message(
                    orjson.dumps(
                        {"op": "subscribe", "feed": "tracking", "fixture": fixture}
                    ).decode()
                )
                while True:
                    msg = orjson.loads(await ws.get_message())
                    if msg["type"] == "frame":
                        assert msg["data"]["id"] == fixture
                        break
            process.send_signal(signal.SIGINT)
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def test_a_taken_port_is_one_error_line_and_exit_status_1(tmp_path: Path) -> None:
    with socket.socket() as taken, trio.fail_after(90):
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with simulator(tmp_path, A) as (_, sim_port):
            config = tmp_path / "gateway.toml"
            write_config(config, sim_port, [A], http=f"127.0.0.1:{port}")
            async with gateway_process(tmp_path, config) as proc:
                assert await proc.process.wait() == 1
                await proc.wait_for(lambda: proc.eof)
        errors = [r["msg"] for r in proc.logs if r["level"] == "ERROR"]
        assert errors == [
            f"cannot listen on 127.0.0.1:{port} (http_listen): Address already in use: another "
            "process holds it (several gateways share an address only when every one of them "
            "sets [gateway] reuse_port = true)"
        ]
        assert not any("Traceback" in line for line in proc.raw), proc.raw
        assert "READY=1" not in proc.notes


async def test_two_processes_share_the_ports_with_reuse_port(tmp_path: Path) -> None:
    """Two ``dde-gateway run`` processes on one address pair: the second binds the ports the
    first got, and when the first stops (a rolling restart) the second serves both ports."""
    with trio.fail_after(90):
        async with simulator(tmp_path, A) as (_, port):
            first_config, second_config = tmp_path / "first.toml", tmp_path / "second.toml"
            write_config(first_config, port, [A], reuse_port=True)
            (tmp_path / "first").mkdir()
            (tmp_path / "second").mkdir()
            async with gateway_process(tmp_path / "first", first_config) as first:
                await first.wait_for(lambda: "READY=1" in first.notes)
                assert first.stream and first.http
                write_config(
                    second_config,
                    port,
                    [A],
                    reuse_port=True,
                    stream=first.stream,
                    http=first.http,
                )
                async with gateway_process(tmp_path / "second", second_config) as second:
                    await second.wait_for(lambda: "READY=1" in second.notes)
                    assert (second.stream, second.http) == (first.stream, first.http)
                    for proc in (first, second):
                        listening = [r["msg"] for r in proc.logs if "listening on" in r["msg"]]
                        assert len(listening) == 2, listening
                        assert all(m.endswith("(SO_REUSEPORT)") for m in listening), listening
                    first.process.send_signal(signal.SIGTERM)
                    assert await first.process.wait() == 0
                    # Every new connection now reaches the second process.
                    for _ in range(5):
                        status, body = await http_get(f"http://{first.http}/readyz")
                        assert status == 200, body
                    async with trio_websocket.open_websocket_url(
                        f"ws://{first.stream}/v1/stream"
                    ) as ws:
                        await ws.send_message(
                            orjson.dumps(
                                {"op": "subscribe", "feed": "tracking", "fixture": A}
                            ).decode()
                        )
                        while True:
                            msg = orjson.loads(await ws.get_message())
                            if msg["type"] == "frame":
                                assert msg["data"]["id"] == A
                                break
                    second.process.send_signal(signal.SIGTERM)
                    assert await second.process.wait() == 0


async def test_under_journald_every_line_carries_its_priority(tmp_path: Path) -> None:
    """Under systemd (``JOURNAL_STREAM`` names our stderr) each line starts with its syslog
    priority, so ``journalctl -p warning`` shows the warnings; the JSON after it is whole."""
    with trio.fail_after(60):
        async with simulator(tmp_path, A) as (_, port):
            config = tmp_path / "gateway.toml"
            # B is unknown to the simulator: "not found", a warning.
            write_config(config, port, [A, B])
            async with gateway_process(tmp_path, config, journal=True) as proc:
                await proc.wait_for(lambda: "READY=1" in proc.notes)
                await proc.wait_for(
                    lambda: any(r["level"] == "WARNING" and B in r["msg"] for r in proc.logs)
                )
                proc.process.send_signal(signal.SIGTERM)
                assert await proc.process.wait() == 0
                await proc.wait_for(lambda: proc.eof)
    assert proc.logs and len(proc.logs) == len(proc.raw)  # each line whole JSON after the prefix
    syslog = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}
    assert [syslog[r["level"]] for r in proc.logs] == proc.priorities
    assert proc.raw[0].startswith("<")
    ready = next(i for i, r in enumerate(proc.logs) if r["msg"].startswith("gateway ready"))
    assert proc.priorities[ready] == 6
    warned = [r for r, p in zip(proc.logs, proc.priorities, strict=True) if p == 4]
    assert any(r.get("feed") == "tracking" and r.get("fixture") == B for r in warned), warned
