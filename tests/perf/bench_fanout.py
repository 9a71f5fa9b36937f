"""Micro-benchmark (not a test): server CPU per delivered frame of the data plane's fan-out.

Runs the real hub and data plane in this process and N raw-socket subscribers in a child
process (so their CPU is not counted), publishes F frames of S bytes into one topic, one frame
per event-loop turn (or at --rate Hz), and reports this process's CPU time divided by the
deliveries (F x N), plus how many deliveries were eager writes vs. queued.

    .venv/bin/python tests/perf/bench_fanout.py --subscribers 100 --frames 3000 --size 3000

The reference numbers (2-core machine) are in docs/performance.md: about 2.0-2.7 us.
"""

from __future__ import annotations

import argparse
import base64
import os
import selectors
import socket
import subprocess
import sys
import time

import trio
import trio.lowlevel

from gateway.config import (
    Config,
    FeedConfig,
    GatewaySection,
    ListenAddress,
    SubscribersSection,
    UpstreamSection,
)
from gateway.dataplane import SubscriberRegistry, run
from gateway.hub import Hub
from gateway.wire import encode_frame


def reader_main(host: str, port: int, n: int) -> None:
    """Child process: N subscribers that read and discard everything until EOF."""
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall(
            (
                f"GET /v1/stream HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(4096)
        payload = b'{"op":"subscribe","feed":"bench","fixture":"F"}'
        s.sendall(bytes((0x81, 0x80 | len(payload))) + b"\0\0\0\0" + payload)  # zero mask
        s.setblocking(False)
        socks.append(s)
    print("ready", flush=True)
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    total = 0
    open_ = len(socks)
    while open_:
        for sel_key, _ in sel.select():
            sock = sel_key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()
                open_ -= 1
            else:
                total += len(data)
    print(f"bytes {total}", flush=True)


async def server_main(args: argparse.Namespace) -> None:
    config = Config(
        upstream=UpstreamSection(token_env="UNUSED"),
        gateway=GatewaySection(stream_listen=ListenAddress("127.0.0.1", 0)),
        feeds={"bench": FeedConfig(kind="tracking", url="wss://bench.test/ws/bench")},
        subscribers=SubscribersSection(max_connections=100_000, queue_bytes=64 * 1024 * 1024),
    )
    hub = Hub(config.feeds)
    registry = SubscriberRegistry()
    topic = hub.topic("bench", "F")
    frame = '{"ix":0,"pad":"' + "x" * max(0, args.size - 16) + '"}'
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(run, config, hub, registry)
        child = await trio.lowlevel.open_process(
            [
                sys.executable,
                __file__,
                "--reader",
                addr.host,
                str(addr.port),
                str(args.subscribers),
            ],
            stdout=subprocess.PIPE,
        )
        assert child.stdout is not None
        line = await child.stdout.receive_some(100)
        assert line.startswith(b"ready"), line
        while topic.subscriber_count < args.subscribers:  # noqa: ASYNC110
            await trio.sleep(0.01)
        expected = args.frames * args.subscribers
        sent0 = registry.frames_sent
        cpu0 = time.process_time()
        times0 = os.times()
        wall0 = time.perf_counter()
        period = 1.0 / args.rate if args.rate else 0.0
        for _ in range(args.frames):
            topic.publish(frame, None)
            if period:
                await trio.sleep(period)
            else:
                await trio.lowlevel.checkpoint()
        while registry.frames_sent - sent0 < expected:  # noqa: ASYNC110
            await trio.sleep(0.001)
        cpu = time.process_time() - cpu0
        times1 = os.times()
        wall = time.perf_counter() - wall0
        hist = hub.fanout_latency
        await registry.drain()
        out = b""
        while chunk := await child.stdout.receive_some(1000):
            out += chunk
        await child.wait()
        nursery.cancel_scope.cancel()
    print(
        f"{args.subscribers} subscribers x {args.frames} frames of {len(frame)} B: "
        f"{cpu / expected * 1e6:.2f} us CPU per delivery "
        f"({expected / wall:,.0f} deliveries/s wall, cpu {cpu:.2f} s, wall {wall:.2f} s, "
        f"user {times1.user - times0.user:.2f} s, system {times1.system - times0.system:.2f} s)"
    )
    if hist.count:
        print(f"fan-out latency (sampled): mean {hist.sum / hist.count * 1e6:.1f} us")
    print("reader:", out.decode().strip().splitlines()[-1])


def baseline_main(args: argparse.Namespace) -> None:
    """The floor: bare non-blocking os.write of the same frames to the same kind of readers."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1024)
    port = ls.getsockname()[1]
    child = subprocess.Popen(
        [sys.executable, __file__, "--reader", "127.0.0.1", str(port), str(args.subscribers)],
        stdout=subprocess.PIPE,
    )
    conns = []
    for _ in range(args.subscribers):
        c, _ = ls.accept()
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += c.recv(4096)
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as trio does
        c.setblocking(False)
        conns.append(c)
    assert child.stdout is not None
    child.stdout.readline()
    data = encode_frame(b'{"ix":0,"pad":"' + b"x" * max(0, args.size - 16) + b'"}')
    fds = [c.fileno() for c in conns]
    missed = 0
    period = 1.0 / args.rate if args.rate else 0.0
    cpu0 = time.process_time()
    times0 = os.times()
    start = time.perf_counter()
    for k in range(args.frames):
        if period:  # paced like the data plane run: sleep until the frame is due
            delay = start + k * period - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        for fd in fds:
            try:
                if os.write(fd, data) != len(data):
                    missed += 1
            except BlockingIOError:
                missed += 1
    cpu = time.process_time() - cpu0
    times1 = os.times()
    for c in conns:
        c.close()
    child.wait()
    print(
        f"baseline: bare os.write {cpu / (args.frames * args.subscribers) * 1e6:.2f} us CPU "
        f"per write ({missed} incomplete; user {times1.user - times0.user:.2f} s, "
        f"system {times1.system - times0.system:.2f} s)"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--reader":
        reader_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--size", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=0.0, help="Hz; 0 = one per loop turn")
    parser.add_argument(
        "--baseline", action="store_true", help="also measure bare os.write (the floor)"
    )
    args = parser.parse_args()
    trio.run(server_main, args)
    if args.baseline:
        baseline_main(args)


if __name__ == "__main__":
    main()
