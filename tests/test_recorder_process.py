"""The recorder in a real gateway process: kill -9 mid-write, and a disk that refuses writes.

- kill -9 while frames are being written, a torn line added as a crash mid-write leaves it,
  restart: the torn line is cut, and a subscriber resuming with ``after`` + ``epoch`` is
  recovered with every frame after it, from disk then live, nothing lost or repeated (the
  tracking ``ix`` runs on across the crash: the upstream resumed from the recorded ix).
- A file-size limit (``RLIMIT_FSIZE`` set in the child, as ``LimitFSIZE=`` or ``ulimit -f``
  would): the write fails with EFBIG, that fixture's recording stops with a state, a log line
  and the metrics, and the live fan-out goes on untouched.

``python -m gateway run`` as a subprocess (tests/test_service_process.py's harness) against a
simulator in this process; ports 0, real files in a temp dir, one ``trio.fail_after`` each.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families

from gateway.simulator import Simulator
from tests.conftest import TEST_TOKEN
from tests.kit import TRACKING_PATH, http_get, next_of_type, wait_until
from tests.test_service_process import Proc

FX = "5501b26a-1c44-4c3b-9ff5-9322084d41f9"


def _write_config(path: Path, sim_port: int, rec: Path) -> None:
    path.write_text(
        "\n".join(
            [
                "[gateway]",
                'stream_listen = "127.0.0.1:0"',
                'http_listen = "127.0.0.1:0"',
                "[upstream]",
                f'token_file = "{path.parent / "token"}"',
                "connect_rate = 100.0",
                "backoff_initial = 0.05",
                "backoff_max = 0.5",
                "[feeds.tracking]",
                'kind = "tracking"',
                f'url = "ws://127.0.0.1:{sim_port}{TRACKING_PATH}"',
                "[recorder]",
                f'dir = "{rec}"',
                "fsync_interval = 0.2",
                "[[fixtures]]",
                'feed = "tracking"',
                f'id = "{FX}"',
            ]
        )
        + "\n"
    )


@asynccontextmanager
async def _simulator(tmp_path: Path) -> AsyncIterator[int]:
    (tmp_path / "token").write_text(TEST_TOKEN)
    sim = Simulator(tokens={TEST_TOKEN}, rate_hz=50.0, heartbeat_interval=1.0)
    sim.add_fixture(FX)
    async with trio.open_nursery() as nursery:
        yield await nursery.start(sim.serve, "127.0.0.1", 0)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def _gateway(config: Path, *, max_file_bytes: int | None = None) -> AsyncIterator[Proc]:
    """A gateway process; *max_file_bytes*: its RLIMIT_FSIZE (no file may grow past it)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("NOTIFY_SOCKET", None)
    cmd = [sys.executable, "-m", "gateway", "run", "--config", str(config), "--log-format", "json"]

    def limit() -> None:
        if max_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    async with trio.open_nursery() as nursery:
        process = await trio.lowlevel.open_process(
            cmd, env=env, stderr=subprocess.PIPE, preexec_fn=limit
        )
        proc = Proc(process, None)  # type: ignore[arg-type]  # no notify socket here
        nursery.start_soon(proc.read_logs)
        try:
            await proc.wait_for(lambda: bool(proc.http))
            yield proc
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()
            nursery.cancel_scope.cancel()


async def _fixture(proc: Proc) -> dict[str, Any]:
    status, body = await http_get(f"http://{proc.http}/v1/fixtures/tracking/{FX}")
    assert status == 200, body
    out: dict[str, Any] = orjson.loads(body)
    return out


async def _poll(proc: Proc, predicate: Any) -> dict[str, Any]:
    """The fixture's view once *predicate* holds for it (polled over HTTP, 30 s at most)."""
    with trio.fail_after(30):
        while True:
            view = await _fixture(proc)
            if predicate(view):
                return view
            await trio.sleep(0.05)


def _subscribe(**extra: Any) -> str:
    return orjson.dumps({"op": "subscribe", "feed": "tracking", "fixture": FX, **extra}).decode()


async def test_kill_9_mid_write_then_restart_cuts_the_torn_line_and_resumes(
    tmp_path: Path,
) -> None:
    rec = tmp_path / "rec"
    config = tmp_path / "gateway.toml"
    with trio.fail_after(120):
        async with _simulator(tmp_path) as port:
            _write_config(config, port, rec)
            ix_of: dict[int, int] = {}
            async with _gateway(config) as proc:
                async with trio_websocket.open_websocket_url(f"ws://{proc.stream}/v1/stream") as ws:
                    await ws.send_message(_subscribe())
                    epoch = (await next_of_type(ws, "subscribed"))["epoch"]
                    while len(ix_of) < 30:
                        frame = await next_of_type(ws, "frame")
                        ix_of[frame["seq"]] = frame["data"]["ix"]
                after = max(ix_of)
                # Written to the file (the page cache survives kill -9), frames still flowing.
                await _poll(proc, lambda v: v["recording"]["last_seq"] >= after + 10)
                proc.process.send_signal(signal.SIGKILL)
                await proc.process.wait()
            segment = max((rec / "tracking" / FX).glob("*.jsonl"))
            intact = segment.stat().st_size
            with segment.open("ab") as f:  # what a write cut in the middle leaves
                f.write(b'{"seq":999999,"pos":1,"t":1.0,"data":{"ix":1,"tra')

            async with _gateway(config) as proc:
                assert segment.stat().st_size == intact  # the torn line is cut, nothing else
                assert any("cutting" in r.get("msg", "") for r in proc.logs)
                async with trio_websocket.open_websocket_url(f"ws://{proc.stream}/v1/stream") as ws:
                    await ws.send_message(_subscribe(after=after, epoch=epoch))
                    subscribed = await next_of_type(ws, "subscribed")
                    assert subscribed["recovered"] is True
                    # Not a clean stop: what follows is numbered under a new epoch.
                    assert subscribed["epoch"] != epoch
                    seqs: list[int] = []
                    while len(seqs) < 60:  # from disk, then live across the restart
                        frame = await next_of_type(ws, "frame")
                        seqs.append(frame["seq"])
                        assert frame["data"]["ix"] == ix_of[after] + frame["seq"] - after
                    assert seqs == list(range(after + 1, after + 61))


async def test_a_file_size_limit_stops_recording_and_fan_out_goes_on(tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    config = tmp_path / "gateway.toml"
    with trio.fail_after(120):
        async with _simulator(tmp_path) as port:
            _write_config(config, port, rec)
            async with _gateway(config, max_file_bytes=200 * 1024) as proc:
                async with trio_websocket.open_websocket_url(f"ws://{proc.stream}/v1/stream") as ws:
                    await ws.send_message(_subscribe())
                    await next_of_type(ws, "subscribed")
                    seqs: list[int] = []

                    async def read(n: int) -> None:
                        while len(seqs) < n:
                            seqs.append((await next_of_type(ws, "frame"))["seq"])

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(read, 10**9)
                        view = await _poll(proc, lambda v: v["recording"]["state"] == "stopped")
                        stopped_at = len(seqs)
                        await wait_until(lambda: len(seqs) >= stopped_at + 50, timeout=30)
                        nursery.cancel_scope.cancel()
                    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap
                assert "EFBIG" in view["recording"]["reason"]
                assert view["state"] == "live"
                later = await _poll(proc, lambda v: v["recording"]["frames_dropped"] > 0)
                assert later["seq"] > later["recording"]["last_seq"]
                await wait_until(
                    lambda: any("recording of tracking" in r.get("msg", "") for r in proc.logs)
                )
                _, body = await http_get(f"http://{proc.http}/metrics")
                metrics = {
                    (s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(body.decode())
                    for s in family.samples
                }
                assert metrics[("dde_recorder_fixtures", (("state", "stopped"),))] == 1
                assert metrics[("dde_recorder_frames_dropped_total", (("feed", "tracking"),))] > 0
            # Nothing torn: what was written before the limit reads back whole.
            segment = max((rec / "tracking" / FX).glob("*.jsonl"))
            assert segment.stat().st_size <= 200 * 1024
            assert segment.read_bytes().endswith(b"}\n")


async def test_a_recorder_dir_that_is_a_symlink_is_a_config_error(tmp_path: Path) -> None:
    """``[recorder] dir`` naming a symlink: exit 2 with one line naming ``recorder.dir``, and
    nothing written where the link points."""
    (tmp_path / "token").write_text(TEST_TOKEN)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "rec").symlink_to(elsewhere)
    config = tmp_path / "gateway.toml"
    _write_config(config, 9, tmp_path / "rec")  # never connected: it stops before
    cmd = [sys.executable, "-m", "gateway", "run", "--config", str(config), "--log-format", "json"]
    with trio.fail_after(60):
        done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 2
    errors = [
        line["msg"]
        for line in map(orjson.loads, done.stderr.splitlines())
        if line["level"] == "ERROR"
    ]
    assert len(errors) == 1 and errors[0].endswith("@ $.recorder.dir")
    assert "is a symlink" in errors[0] and "Traceback" not in done.stderr.decode()
    assert list(elsewhere.iterdir()) == []
