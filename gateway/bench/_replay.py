"""What a hundred concurrent replays of a whole match from disk cost the gateway.

Run: ``python -m gateway.bench._replay --replays 100 --rate 25 --duration 30 --runs 3``
(docs/performance.md, "Replay").

The recording: a 90-minute match at 25 Hz (135,000 tracking frames of about 3 KB, the
simulator's synthetic match, ``--minutes``/``--hz``), written by the recorder's own writer
(:class:`gateway.recorder.Recorder`: segments, zstd) into ``--recording DIR`` once and reused
by later runs (a ``bench-replay.json`` there says what it holds).

One run, the gateway fresh: ``dde-gateway run`` on that directory, following the recorded
fixture (its upstream is a closed port: the fixture is in backoff, its topic continues the
recording, whose frames are all on disk). When it is ready, its RSS is read (the baseline);
then ``--replays`` clients, each its own ``/v1/stream`` connection in this process (raw
sockets; every message's seq checked, in order from 1), ask for a replay of the fixture from
its first frame at ``--rate`` frames a second, not looped: each would read the whole match.
Once every one has its ``replay_started``, the window opens: ``--duration`` seconds over which
the gateway's CPU time (``/proc/<pid>/stat``) and its RSS (sampled every 0.25 s: the peak, at
a third of the window and at its end, to show it flat) are taken, and the frames received
counted. Printed per run, then the medians; ``--json PATH`` writes
every run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import orjson
import trio

from gateway.bench._feeder import fixture_id
from gateway.bench._procstat import cpu_seconds, memory_kib
from gateway.bench._run import TOKEN_ENV, BenchError, _gateway_process, raise_nofile_limit
from gateway.bench._scenario import Scenario
from gateway.bench._wsframe import (
    ProtocolError,
    check_server_handshake,
    client_handshake,
    encode_frame,
    parse_frames,
    payload,
)
from gateway.config import RecorderSection
from gateway.recorder import Recorder
from gateway.simulator import TrackingMatch
from gateway.wire import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT

FIXTURE: Final = fixture_id(0)
#: What the recording directory holds, written once it is complete.
MANIFEST: Final = "bench-replay.json"
#: Frames handed to the recorder between two waits for its writer (its queue is bounded).
WRITE_BATCH: Final = 2000
RSS_SAMPLE: Final = 0.25
#: How long the clients may take to get every ``replay_started``.
START_TIMEOUT: Final = 60.0
_SEQ: Final = re.compile(rb'"seq":(\d+)')


def _closed_port() -> int:
    """A loopback port nothing listens on (the fixture's upstream: always refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _write_recording(path: Path, frames: int, hz: float) -> None:
    match = TrackingMatch(FIXTURE, 0, hz)
    recorder = Recorder(RecorderSection(dir=path))
    lg = recorder.fixture("tracking", FIXTURE)
    recorder.activate(lg)
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        for first in range(0, frames, WRITE_BATCH):
            for ix in range(first, min(frames, first + WRITE_BATCH)):
                recorder.append(lg, ix + 1, ix, orjson.dumps(match.frame(ix)))
            if not lg.recording:
                raise BenchError(f"the recorder stopped: {lg.reason}")
            while lg.written_seq < min(frames, first + WRITE_BATCH):  # noqa: ASYNC110
                await trio.sleep(0.01)
        recorder.deactivate(lg)  # the last segment closed and compressed too
        nursery.cancel_scope.cancel()


def ensure_recording(path: Path, minutes: float, hz: float, *, say: Any) -> dict[str, Any]:
    """The recording of a *minutes* match at *hz* in *path*, written unless already there."""
    frames = round(minutes * 60 * hz)
    manifest = path / MANIFEST
    want = {"fixture": FIXTURE, "frames": frames, "hz": hz}
    with contextlib.suppress(OSError, ValueError):
        have = json.loads(manifest.read_text())
        if {k: have.get(k) for k in want} == want:
            return dict(have)
    if path.exists() and any(path.iterdir()):
        raise BenchError(f"{path} holds something else than this bench's recording")
    say(f"writing {frames:,} frames ({minutes:g} min at {hz:g} Hz) with the recorder...")
    started = time.monotonic()
    trio.run(_write_recording, path, frames, hz)
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    info = {**want, "bytes_on_disk": disk, "write_seconds": round(time.monotonic() - started, 1)}
    manifest.write_text(json.dumps(info))
    say(f"  done in {info['write_seconds']} s, {disk / 2**20:.0f} MiB on disk")
    return info


class _Client:
    """One replay's connection: counts its frames, checks their seqs are 1, 2, 3..."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.frames = 0
        self.last_seq = 0
        self.bytes = 0
        self.ended: dict[str, Any] | None = None

    async def run(self, port: int, rate: int) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            request, accept = client_handshake("127.0.0.1", port, "/v1/stream")
            await stream.send_all(request)
            buf = bytearray()
            while b"\r\n\r\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise BenchError("the gateway closed during the handshake")
                buf += chunk
            head, _, rest = bytes(buf).partition(b"\r\n\r\n")
            try:
                check_server_handshake(head, accept)
            except ProtocolError as exc:
                raise BenchError(str(exc)) from None
            op = {"op": "replay", "feed": "tracking", "fixture": FIXTURE, "rate": rate}
            await stream.send_all(encode_frame(1, orjson.dumps(op), mask=True))
            buf = bytearray(rest)
            while True:
                frames, used = parse_frames(buf)
                for opcode, start, end in frames:
                    data = payload(buf, start, end)
                    if opcode == OP_TEXT:
                        self._message(data)
                    elif opcode == OP_PING:
                        await stream.send_all(encode_frame(OP_PONG, data, mask=True))
                    elif opcode == OP_CLOSE:
                        raise BenchError(f"the gateway closed a replay's connection: {data!r}")
                del buf[:used]
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                self.bytes += len(chunk)
                buf += chunk

    def _message(self, data: bytes) -> None:
        if data.startswith(b'{"type":"replay_frame"'):
            m = _SEQ.search(data, 0, 200)
            seq = int(m[1]) if m else -1
            if seq != self.last_seq + 1:
                raise BenchError(f"replayed frame {seq} after {self.last_seq}")
            self.last_seq = seq
            self.frames += 1
            return
        msg = orjson.loads(data)
        kind = msg.get("type")
        if kind == "replay_started":
            self.started.set()
        elif kind == "replay_end":
            self.ended = msg
        elif kind != "heartbeat":
            raise BenchError(f"unexpected message: {data[:200]!r}")


async def _measure(pid: int, port: int, replays: int, rate: int, duration: float) -> dict[str, Any]:
    clients = [_Client() for _ in range(replays)]
    baseline = memory_kib(pid)["VmRSS"]
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(client.run, port, rate)
        with trio.fail_after(START_TIMEOUT):
            for client in clients:
                await client.started.wait()
        frames0 = sum(c.frames for c in clients)
        cpu0 = cpu_seconds(pid)
        t0 = trio.current_time()
        peak = baseline
        third: int | None = None
        while (now := trio.current_time()) < t0 + duration:
            rss = memory_kib(pid)["VmRSS"]
            peak = max(peak, rss)
            if third is None and now >= t0 + duration / 3:
                third = rss
            await trio.sleep(min(RSS_SAMPLE, t0 + duration - now))
        cpu = cpu_seconds(pid) - cpu0
        wall = trio.current_time() - t0
        frames = sum(c.frames for c in clients) - frames0
        end_rss = memory_kib(pid)["VmRSS"]
        ended = [c.ended for c in clients if c.ended is not None]
        nursery.cancel_scope.cancel()
    if ended:
        raise BenchError(f"{len(ended)} replays ended early: {ended[0]}")
    return {
        "replays": replays,
        "rate": rate,
        "window_s": round(wall, 2),
        "frames_per_s": round(frames / wall),
        "frames_per_s_asked": replays * rate,
        "cpu_percent": round(100 * cpu / wall, 1),
        "cpu_us_per_frame": round(1e6 * cpu / frames, 1) if frames else None,
        "rss_baseline_mib": round(baseline / 1024, 1),
        "rss_peak_mib": round(peak / 1024, 1),
        "rss_third_mib": round((third or end_rss) / 1024, 1),
        "rss_end_mib": round(end_rss / 1024, 1),
        "rss_growth_mib": round((peak - baseline) / 1024, 1),
        "slowest_client_frames": min(c.frames for c in clients),
    }


def run_once(recording: Path, replays: int, rate: int, duration: float) -> dict[str, Any]:
    """One run on a fresh gateway (module docstring)."""
    sc = Scenario(name="replay", subscribers=replays, fixtures=1, recorder_dir=str(recording))
    env = {**os.environ, TOKEN_ENV: "bench-replay-token"}
    with (
        tempfile.TemporaryDirectory(prefix="dde-bench-replay-") as tmp,
        _gateway_process(sc, "replay", _closed_port(), env, Path(tmp)) as gw,
    ):
        return trio.run(_measure, gw.pid, gw.stream, replays, rate, duration)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.bench._replay", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--replays", type=int, default=100)
    parser.add_argument("--rate", type=int, default=25, help="frames a second per replay")
    parser.add_argument("--duration", type=float, default=30.0, help="measured window, s")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=90.0, help="length of the match")
    parser.add_argument("--hz", type=float, default=25.0, help="frames a second of the match")
    parser.add_argument(
        "--recording",
        type=Path,
        default=Path(tempfile.gettempdir()) / "dde-bench-replay",
        help="where the recording is written once and reused",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every run here")
    args = parser.parse_args(argv)
    raise_nofile_limit()

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        info = ensure_recording(args.recording, args.minutes, args.hz, say=say)
        results = []
        for i in range(args.runs):
            result = run_once(args.recording, args.replays, args.rate, args.duration)
            results.append(result)
            say(f"run {i + 1}: {json.dumps(result)}")
    except BenchError as exc:
        say(f"bench: {exc}")
        return 1
    keys = (
        "frames_per_s",
        "cpu_percent",
        "cpu_us_per_frame",
        "rss_baseline_mib",
        "rss_peak_mib",
        "rss_growth_mib",
    )
    medians = {k: statistics.median(r[k] for r in results) for k in keys}
    print(
        f"{args.replays} replays x {args.rate}/s of a {info['frames']:,}-frame recording "
        f"({info['bytes_on_disk'] / 2**20:.0f} MiB on disk), {args.runs} runs of "
        f"{args.duration:g} s, medians: {json.dumps(medians)}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps({"recording": info, "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
