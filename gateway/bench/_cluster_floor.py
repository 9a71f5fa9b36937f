"""The cluster's own costs, without the gateway around them: the appender and the relay alone.

Run: ``python -m gateway.bench._cluster_floor [--fixtures 200] [--rate 25] [--frame-bytes 3000]
[--duration 10] [--warmup 2] [--interval MS]`` (docs/performance.md, "Cluster"); ``--interval``
sets both loops' least time between requests (``Appender``/``Relay`` ``interval``). Needs a
redis-server (``$DDE_REDIS_SERVER`` or PATH); one of its own is started on a free port.

Two processes, each one trio loop with one :class:`~gateway.cluster.RedisStore`:

- the *owner* (this process): F fixtures x R Hz of frames of the given size, made every
  millisecond and handed to an :class:`~gateway.cluster.Appender` exactly as the owner's
  publish path does (``append(key, epoch, seq, position, time, bytes)``); nothing else runs in
  it (no upstream, no fan-out). A first window runs the producer alone: its CPU is subtracted,
  so the owner's figure is the appends' own cost;
- the *relay* (a child, ``--relay-child``): a :class:`~gateway.cluster.Relay` following the F
  streams into sinks that only count, and note the lag of every entry (now - the owner's
  receive time, both ``time.time()`` on this machine).

Printed: CPU % of one core of each process and of Redis over the window, append requests per
second and frames per request, XREAD calls per second and entries per read, the relay's lag
p50/p99/max. Each figure is the cost of the cluster's machinery itself; what the bench's
``--cluster``/``--relay`` runs add on top is the gateway around it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from gateway.bench._loadgen import percentile
from gateway.bench._procstat import cpu_seconds
from gateway.bench._redis import BenchRedis
from gateway.cluster import APPEND_INTERVAL, Appender, AppendGroup, Entry, Relay, open_store
from gateway.config import ClusterSection

PREFIX = "floor"
TOKEN = "floor-owner/1"
EPOCH = "e0"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _config(url: str) -> ClusterSection:
    return ClusterSection(redis_url=url, key_prefix=PREFIX, stream_maxlen=1500, lease_ttl=300.0)


def _interval(args: argparse.Namespace) -> dict[str, float]:
    """``interval=`` for the Appender and the Relay when ``--interval`` is given."""
    return {} if args.interval is None else {"interval": args.interval / 1000}


def _keys(fixtures: int) -> list[str]:
    return [f"tracking/floor-{i:04d}" for i in range(fixtures)]


class _CountingStore:
    """The store's append, counted (requests, frames), for the appender."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.requests = 0
        self.frames = 0

    async def append(self, token: str, instance: str, groups: Sequence[AppendGroup]) -> Any:
        self.requests += 1
        self.frames += sum(len(g.frames) for g in groups)
        return await self._store.append(token, instance, groups)


async def owner(
    args: argparse.Namespace, url: str, relay: subprocess.Popen[bytes], redis_pid: int
) -> dict[str, Any]:
    keys = _keys(args.fixtures)
    data = b'{"_bt":0,' + b"x" * max(0, args.frame_bytes - 10) + b"}"
    async with open_store(_config(url)) as store, trio.open_nursery() as nursery:
        # The leases are this "instance"'s for the whole run (the append script checks them).
        await store.leases(TOKEN, 300.0, dict.fromkeys(keys, "a"))
        counting = _CountingStore(store)
        appender = Appender(
            counting,
            TOKEN,
            "floor-owner",
            max_bytes=64 << 20,
            on_fenced=lambda key, why: None,
            interval=_interval(args).get("interval", APPEND_INTERVAL),
        )
        await nursery.start(appender.run)
        seqs = dict.fromkeys(keys, 0)
        feeding = [False]

        async def produce() -> None:
            # F x R frames per second, fixtures in turn, made every millisecond (what is due).
            period = 1.0 / (args.fixtures * args.rate)
            due = trio.current_time()
            i = 0
            while True:
                now = trio.current_time()
                if now - due > 1.0:
                    due = now  # far behind: skip ahead instead of bursting
                while due <= now:
                    key = keys[i % len(keys)]
                    i += 1
                    seqs[key] += 1
                    if feeding[0]:
                        appender.append(key, EPOCH, seqs[key], seqs[key], time.time(), data)
                    due += period
                await trio.sleep_until(now + 0.001)

        nursery.start_soon(produce)
        # Window 1: the producer alone (its own cost, subtracted below).
        await trio.sleep(1.0)
        b0, bt0 = _cpu(), time.monotonic()
        await trio.sleep(args.duration)
        base = (_cpu() - b0) / (time.monotonic() - bt0)
        # Window 2: every frame appended, the relay reading.
        feeding[0] = True
        await trio.sleep(args.warmup)
        assert relay.stdin is not None and relay.stdout is not None
        c0, r0, f0, t0 = _cpu(), counting.requests, counting.frames, time.monotonic()
        redis0 = cpu_seconds(redis_pid)
        await trio.to_thread.run_sync(relay.stdin.write, b"mark\n")
        await trio.to_thread.run_sync(relay.stdin.flush)
        await trio.sleep(args.duration)
        c1, r1, f1, t1 = _cpu(), counting.requests, counting.frames, time.monotonic()
        redis1 = cpu_seconds(redis_pid)
        await trio.to_thread.run_sync(relay.stdin.write, b"report\n")
        await trio.to_thread.run_sync(relay.stdin.flush)
        line = await trio.to_thread.run_sync(relay.stdout.readline)
        nursery.cancel_scope.cancel()
    window = t1 - t0
    requests = r1 - r0
    appends = (c1 - c0) - base * window
    return {
        "window_s": window,
        "producer_cpu_percent": 100 * base,
        "owner_cpu_percent": 100 * appends / window,
        "frames_per_s": (f1 - f0) / window,
        "append_requests_per_s": requests / window,
        "frames_per_request": (f1 - f0) / requests if requests else None,
        "us_cpu_per_frame": 1e6 * appends / (f1 - f0) if f1 > f0 else None,
        "redis_cpu_percent": 100 * (redis1 - redis0) / window,
        "relay": json.loads(line),
    }


class _Sink:
    def __init__(self, lags: list[float], counts: list[int]) -> None:
        self._lags = lags
        self._counts = counts

    def relay(self, entries: Sequence[Entry]) -> None:
        now = time.time()
        self._counts[0] += len(entries)
        for e in entries:
            self._lags.append(now - e.received_at)

    def backlog(self) -> float:
        return 0.0  # no subscribers: the relay's reads alone are measured


async def relay_child(args: argparse.Namespace, url: str) -> None:
    lags: list[float] = []
    counts = [0]
    async with open_store(_config(url)) as store, trio.open_nursery() as nursery:
        reads = [0]
        read = store.read

        async def counted(*a: Any, **kw: Any) -> Any:
            reads[0] += 1
            return await read(*a, **kw)

        store.read = counted  # type: ignore[method-assign]
        relay = Relay(store, **_interval(args))
        await nursery.start(relay.run)
        sink = _Sink(lags, counts)
        for key in _keys(args.fixtures):
            relay.follow(key, after=0, sink=sink)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        buf = b""
        c0 = t0 = 0.0
        r0 = n0 = 0
        while True:
            chunk = await stdin.receive_some()
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                cmd, _, buf = buf.partition(b"\n")
                if cmd == b"mark":
                    lags.clear()
                    c0, t0, r0, n0 = _cpu(), time.monotonic(), reads[0], counts[0]
                elif cmd == b"report":
                    window = time.monotonic() - t0
                    got = sorted(int(x * 1e6) for x in lags)
                    n = counts[0] - n0
                    r = reads[0] - r0
                    out = {
                        "relay_cpu_percent": 100 * (_cpu() - c0) / window,
                        "entries_per_s": n / window,
                        "reads_per_s": r / window,
                        "entries_per_read": n / r if r else None,
                        "us_cpu_per_entry": 1e6 * (_cpu() - c0) / n if n else None,
                        "lag_ms": {
                            q: percentile(got, p) / 1000
                            for q, p in (("p50", 50), ("p99", 99), ("max", 100))
                        },
                    }
                    sys.stdout.write(json.dumps(out) + "\n")
                    sys.stdout.flush()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.bench._cluster_floor")
    parser.add_argument("--fixtures", type=int, default=200)
    parser.add_argument("--rate", type=float, default=25.0)
    parser.add_argument("--frame-bytes", type=int, default=3000)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument(
        "--interval",
        type=float,
        default=None,
        metavar="MS",
        help="least time between two append requests and between two relay reads (default: "
        "the code's, APPEND_INTERVAL and READ_INTERVAL; 0: as soon as the last one ended)",
    )
    parser.add_argument("--relay-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.relay_child is not None:
        trio.run(relay_child, args, args.relay_child)
        return 0
    with tempfile.TemporaryDirectory(prefix="dde-cfloor-") as tmp, BenchRedis(Path(tmp) / "r") as r:
        child = subprocess.Popen(
            [
                *(sys.executable, "-m", "gateway.bench._cluster_floor"),
                *("--relay-child", r.url, f"--fixtures={args.fixtures}"),
                *([] if args.interval is None else [f"--interval={args.interval}"]),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            result = trio.run(owner, args, r.url, child, r.pid)
        finally:
            child.kill()
            child.wait()
    rl = result["relay"]
    print(
        f"appends {result['owner_cpu_percent']:.1f}% CPU (producer "
        f"{result['producer_cpu_percent']:.1f}% apart), {result['frames_per_s']:.0f} frames/s, "
        f"{result['append_requests_per_s']:.0f} requests/s x {result['frames_per_request']:.1f} "
        f"frames, {result['us_cpu_per_frame']:.1f} us/frame | relay {rl['relay_cpu_percent']:.1f}%"
        f" CPU, {rl['reads_per_s']:.0f} reads/s x {rl['entries_per_read']:.1f} entries, "
        f"{rl['us_cpu_per_entry']:.1f} us/entry, lag p50 {rl['lag_ms']['p50']:.2f} p99 "
        f"{rl['lag_ms']['p99']:.2f} max {rl['lag_ms']['max']:.2f} ms | redis "
        f"{result['redis_cpu_percent']:.1f}%"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
