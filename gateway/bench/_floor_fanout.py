"""``dde-gateway bench --floor fanout``: server CPU per delivered frame of the data plane's fan-out.

Runs the real hub and data plane in this process and N raw-socket subscribers in a child
process (so their CPU is not counted), publishes F frames of S bytes into one topic, one frame
per event-loop turn (or at ``--rate`` Hz), and reports this process's CPU time divided by the
deliveries (F x N). ``--baseline`` then measures the floor under it: a bare non-blocking
``os.write`` of the same frames to the same kind of readers.

    dde-gateway bench --floor fanout --subscribers 100 --frames 3000 --frame-bytes 3000

The readers' child is this module: ``python -m gateway.bench._floor_fanout --reader HOST PORT N``.
Measured figures: docs/performance.md ("Target 1") and docs/dataplane.md.
"""

from __future__ import annotations

import base64
import os
import selectors
import socket
import subprocess
import sys
import time
from typing import Final

import attrs
import trio
import trio.lowlevel

from gateway.bench._run import START_TIMEOUT, BenchError
from gateway.config import (
    Config,
    FeedConfig,
    GatewaySection,
    ListenAddress,
    SubscribersSection,
    UpstreamSection,
)
from gateway.dataplane import SubscriberRegistry, run
from gateway.hub import Hub, Topic
from gateway.wire import encode_frame

MODULE: Final = "gateway.bench._floor_fanout"
#: Give up when no delivery happened for this long (a reader died; the run would never end).
STALL_TIMEOUT: Final = 30.0


@attrs.frozen
class FanoutFloor:
    """The knobs: subscribers, frames published, frame size in bytes, publish rate (0 = one
    frame per event-loop turn), and whether to measure the bare-write baseline too."""

    subscribers: int = attrs.field(default=100, validator=attrs.validators.ge(1))
    frames: int = attrs.field(default=3000, validator=attrs.validators.ge(1))
    size: int = attrs.field(default=3000, validator=attrs.validators.ge(16))
    rate: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    baseline: bool = False
    #: The data plane's ``[subscribers] write_delay`` in ms; the baseline then writes each
    #: batch (a frame and those due within the delay after it) joined, one ``os.write`` per
    #: reader.
    write_delay: int = attrs.field(default=0, validator=attrs.validators.ge(0))


def _reader_argv(host: str, port: int, n: int) -> list[str]:
    return [sys.executable, "-m", MODULE, "--reader", host, str(port), str(n)]


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


async def _wait_subscribed(args: FanoutFloor, stdout: trio.abc.ReceiveStream, topic: Topic) -> None:
    """Until the readers' child says "ready" and all of them are subscribed, or BenchError."""
    with trio.move_on_after(START_TIMEOUT + args.subscribers / 100):
        line = await stdout.receive_some(100)
        if not line.startswith(b"ready"):
            raise BenchError(f"the readers did not start: {line!r}")
        while topic.subscriber_count < args.subscribers:  # noqa: ASYNC110
            await trio.sleep(0.01)
        return
    raise BenchError(f"only {topic.subscriber_count} of {args.subscribers} readers subscribed")


async def server_main(args: FanoutFloor) -> None:
    config = Config(
        upstream=UpstreamSection(token_env="UNUSED"),
        gateway=GatewaySection(stream_listen=ListenAddress("127.0.0.1", 0)),
        feeds={"bench": FeedConfig(kind="tracking", url="wss://bench.test/ws/bench")},
        subscribers=SubscribersSection(
            max_connections=100_000, queue_bytes=64 * 1024 * 1024, write_delay=args.write_delay
        ),
    )
    hub = Hub(config.feeds)
    registry = SubscriberRegistry()
    topic = hub.topic("bench", "F")
    frame = '{"ix":0,"pad":"' + "x" * max(0, args.size - 16) + '"}'
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(run, config, hub, registry)
        child = await trio.lowlevel.open_process(
            _reader_argv(addr.host, addr.port, args.subscribers), stdout=subprocess.PIPE
        )
        assert child.stdout is not None
        try:
            await _wait_subscribed(args, child.stdout, topic)
        except BenchError:
            child.kill()
            nursery.cancel_scope.cancel()
            raise
        expected = args.frames * args.subscribers
        sent0 = registry.frames_sent
        cpu0 = time.process_time()
        times0 = os.times()
        wall0 = time.perf_counter()
        period = 1.0 / args.rate if args.rate else 0.0
        start = trio.current_time()
        for k in range(args.frames):
            topic.publish(frame, None)
            if period:  # on a fixed schedule: a late wake-up does not slow the rate down
                await trio.sleep_until(start + (k + 1) * period)
            else:
                await trio.lowlevel.checkpoint()
        progress = (time.monotonic(), registry.frames_sent)
        while (sent := registry.frames_sent) - sent0 < expected:
            await trio.sleep(0.001)
            if sent != progress[1]:
                progress = (time.monotonic(), sent)
            elif time.monotonic() - progress[0] > STALL_TIMEOUT:
                child.kill()
                nursery.cancel_scope.cancel()
                raise BenchError(f"deliveries stalled at {sent - sent0} of {expected}")
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


def baseline_main(args: FanoutFloor) -> None:
    """The floor: bare non-blocking os.write of the same frames to the same kind of readers."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1024)
    port = ls.getsockname()[1]
    # Bounds each accept; the accepted sockets are blocking until set otherwise below.
    ls.settimeout(START_TIMEOUT + args.subscribers / 100)
    argv = _reader_argv("127.0.0.1", port, args.subscribers)
    child = subprocess.Popen(argv, stdout=subprocess.PIPE)
    conns = []
    try:
        for _ in range(args.subscribers):
            c, _ = ls.accept()
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += c.recv(4096)
            c.sendall(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as trio does
            c.setblocking(False)
            conns.append(c)
    except OSError as exc:
        child.kill()
        child.wait()
        raise BenchError(f"baseline: {len(conns)} of {args.subscribers} readers: {exc}") from None
    finally:
        ls.close()
    assert child.stdout is not None
    child.stdout.readline()
    data = encode_frame(b'{"ix":0,"pad":"' + b"x" * max(0, args.size - 16) + b'"}')
    fds = [c.fileno() for c in conns]
    missed = 0
    period = 1.0 / args.rate if args.rate else 0.0
    cpu0 = time.process_time()
    times0 = os.times()
    start = time.perf_counter()
    # With a write delay, a batch is a frame and those due within the delay after it (the data
    # plane's rule, docs/dataplane.md), joined, one write per reader. The data plane comes close
    # to it: arrival jitter leaves a frame due right at the deadline for the next batch now
    # and then.
    per_write = 1 + int(args.write_delay / 1000 * args.rate + 1e-9) if args.write_delay else 1
    batch = data * per_write
    writes = -(-args.frames // per_write)
    for k in range(writes):
        if period:  # paced like the data plane run: sleep until the batch is due
            delay = start + k * per_write * period - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        for fd in fds:
            try:
                if os.write(fd, batch) != len(batch):
                    missed += 1
            except BlockingIOError:
                missed += 1
    cpu = time.process_time() - cpu0
    times1 = os.times()
    for c in conns:
        c.close()
    child.wait()
    print(
        f"baseline: bare os.write of {per_write} frame(s) "
        f"{cpu / (writes * args.subscribers) * 1e6:.2f} us CPU per write, "
        f"{cpu / (writes * per_write * args.subscribers) * 1e6:.2f} us per delivery "
        f"({missed} incomplete; user {times1.user - times0.user:.2f} s, "
        f"system {times1.system - times0.system:.2f} s)"
    )


def run_floor(args: FanoutFloor) -> None:
    """Measure the data plane's fan-out (and the bare-write baseline if asked); print the lines.
    Raises :class:`BenchError` when the readers fail to connect or deliveries stall."""
    try:
        trio.run(server_main, args)
    except BaseExceptionGroup as group:  # the nursery wraps what its body raises
        match, rest = group.split(BenchError)
        if match is None or rest is not None:
            raise
        error: BenchError | BaseExceptionGroup[BenchError] = match
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        raise error from None
    if args.baseline:
        baseline_main(args)


def main(argv: list[str] | None = None) -> None:
    """The readers' child: ``--reader HOST PORT N``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 4 or args[0] != "--reader":
        raise SystemExit(f"usage: python -m {MODULE} --reader HOST PORT N")
    reader_main(args[1], int(args[2]), int(args[3]))


if __name__ == "__main__":
    main()
