"""``dde-gateway bench --floor ingest``: the least CPU trio can spend relaying F x R frames/s.

The ``ingest`` target asks for 200 fixtures x 25 Hz (5,000 frames/s in, one subscriber each) in
under 50 % of one core. This measures the floor under that figure: a trio process that does
nothing but the unavoidable I/O of the gateway's ingest path - one task per upstream socket
waiting for it to become readable, one read into a reusable buffer, one non-blocking write of
the bytes to that fixture's subscriber socket. No WebSocket decoding, no JSON, no hub. A feeder
child process sends F connections R frames of S bytes per second each, spread evenly over the
period as the vendor's independent fixtures are; a drain child reads and discards. Only the
relay process's own CPU time (user + system, over the measured window) is reported.

    dde-gateway bench --floor ingest --fixtures 200 --rate 25 --frame-bytes 3000

With ``--work`` the relay also does what the gateway does per frame besides the I/O, in
order, so each step's cost shows as the difference from the bare floor: ``parse`` (simdjson
parse of the payload and the ``ix`` lookup) then ``frame`` (building the shared WebSocket
frame of the envelope). ``--loop epoll`` runs the same relay on a bare epoll loop, no trio.

The feeder and drain children are this module:
``python -m gateway.bench._floor_ingest --role feeder|drain --port P ...``.
"""

from __future__ import annotations

import argparse
import os
import select
import selectors
import socket
import subprocess
import sys
import time
from typing import Final, Literal

import attrs
import simdjson
import trio
import trio.lowlevel

from gateway.bench._run import BenchError
from gateway.wire import encode_frame

MODULE: Final = "gateway.bench._floor_ingest"
WORK_STEPS: Final = ("parse", "frame")
#: Seconds to wait for a child's listener to come up (a loaded machine starts Python slowly).
CONNECT_WAIT: Final = 20.0


def _check_work(_inst: object, _attr: object, value: str) -> None:
    unknown = set(value.split(",")) - set(WORK_STEPS) if value else set()
    if unknown:
        raise ValueError(f"--work takes {', '.join(WORK_STEPS)}, not {', '.join(sorted(unknown))}")


@attrs.frozen
class IngestFloor:
    """The knobs: fixtures (connections), frames per second per fixture, frame size in bytes,
    seconds before and of the measured window, the per-frame work (comma-separated
    :data:`WORK_STEPS`, trio loop only) and the loop."""

    fixtures: int = attrs.field(default=200, validator=attrs.validators.ge(1))
    rate: float = attrs.field(default=25.0, validator=attrs.validators.gt(0))
    size: int = attrs.field(default=3000, validator=attrs.validators.ge(16))
    warmup: float = attrs.field(default=3.0, validator=attrs.validators.ge(0))
    duration: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    work: str = attrs.field(default="", validator=_check_work)
    loop: Literal["trio", "epoll"] = "trio"

    def __attrs_post_init__(self) -> None:
        if self.work and self.loop != "trio":
            raise ValueError("--work applies to the trio loop only")


def _payload(size: int, ix: int) -> bytes:
    body = b'{"ix":%d,"pad":"' % ix
    return body + b"x" * max(0, size - len(body) - 2) + b'"}'


def _listen(port: int) -> socket.socket:
    """Listen on 127.0.0.1:*port* (0: any free one) and tell the parent which, on stdout."""
    lsock = socket.create_server(("127.0.0.1", port))
    print(lsock.getsockname()[1], flush=True)
    return lsock


def _child_port(child: subprocess.Popen[bytes]) -> int:
    """The port a child listens on: the first line it prints (see :func:`_listen`)."""
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line.strip().isdigit():
        raise BenchError(f"a floor child did not start (exit {child.poll()})")
    return int(line)


def feeder_main(port: int, fixtures: int, rate: float, size: int) -> None:
    """Child: accept *fixtures* connections, then send each *rate* frames/s, evenly spread."""
    lsock = _listen(port)
    conns = [lsock.accept()[0] for _ in range(fixtures)]
    frame = _payload(size, 1)
    interval = 1.0 / (rate * fixtures)
    start = time.monotonic()
    k = 0
    while True:
        due = start + k * interval
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            conns[k % fixtures].sendall(frame)
        except OSError:
            return
        k += 1


def drain_main(port: int, fixtures: int) -> None:
    """Child: accept *fixtures* connections and discard everything until EOF on all."""
    lsock = _listen(port)
    sel = selectors.DefaultSelector()
    for _ in range(fixtures):
        conn = lsock.accept()[0]
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ)
    open_ = fixtures
    while open_:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            if not data:
                sel.unregister(sock)
                open_ -= 1


def _connect_blocking(port: int) -> socket.socket:
    """Connect to a child's listener, retrying while it starts (as :func:`_connect` does)."""
    deadline = time.monotonic() + CONNECT_WAIT
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port))
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"nothing listens on port {port}") from None
            time.sleep(0.05)


def epoll_relay_main(args: IngestFloor, feed_port: int, drain_port: int) -> None:
    """The same relay on a bare epoll loop (no trio): one registration per socket, kept."""
    downs = [_connect_blocking(drain_port) for _ in range(args.fixtures)]
    ups = [_connect_blocking(feed_port) for _ in range(args.fixtures)]
    pairs = {}
    ep = select.epoll()
    for up, down in zip(ups, downs, strict=True):
        up.setblocking(False)
        down.setblocking(False)
        pairs[up.fileno()] = down.fileno()
        ep.register(up.fileno(), select.EPOLLIN)
    buf = memoryview(bytearray(65536))
    count = 0
    t_start = time.monotonic()
    t0 = c0 = None
    n0 = 0
    while True:
        for fd, _ in ep.poll():
            n = os.readv(fd, (buf,))
            os.write(pairs[fd], buf[:n])
            count += 1
        now = time.monotonic()
        if t0 is None and now - t_start >= args.warmup:
            t0, c0, n0 = now, os.times(), count
        elif t0 is not None and now - t0 >= args.duration:
            _report(args, "bare epoll", now - t0, c0, os.times(), frames=count - n0)
            return


def _report(
    args: IngestFloor,
    loop: str,
    wall: float,
    c0: os.times_result | None,
    c1: os.times_result,
    *,
    frames: int,
) -> None:
    assert c0 is not None
    user, system = c1.user - c0.user, c1.system - c0.system
    print(
        f"{args.fixtures} fixtures x {args.rate:g} Hz x {args.size} B, {loop}, work: "
        f"{args.work or 'none'}: {frames / wall:,.0f} frames/s relayed, "
        f"CPU {100 * (user + system) / wall:.1f} % "
        f"(user {100 * user / wall:.1f} %, system {100 * system / wall:.1f} %), "
        f"{1e6 * (user + system) / max(frames, 1):.1f} us per frame"
    )


async def _connect(port: int) -> trio.socket.SocketType:
    for _ in range(int(CONNECT_WAIT / 0.05)):
        sock = trio.socket.socket()
        try:
            await sock.connect(("127.0.0.1", port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError:
            sock.close()
            await trio.sleep(0.05)
    raise BenchError(f"nothing listens on port {port}")


async def relay(up: trio.socket.SocketType, down: int, work: set[str], counts: list[int]) -> None:
    buf = memoryview(bytearray(65536))
    parser = simdjson.Parser()
    up_fd = up.fileno()
    while True:
        await trio.lowlevel.wait_readable(up)
        try:
            n = os.readv(up_fd, (buf,))
        except BlockingIOError:
            continue
        if not n:
            return
        data = bytes(buf[:n])
        if "parse" in work:
            doc = parser.parse(data)
            doc.get("ix")  # type: ignore[union-attr]
            del doc
        if "frame" in work:
            data = encode_frame(b'{"type":"frame","seq":1,"data":' + data + b"}")
        os.write(down, data)
        counts[0] += 1


async def trio_relay_main(args: IngestFloor, feed_port: int, drain_port: int) -> None:
    work = set(args.work.split(",")) if args.work else set()
    counts = [0]
    downs = [await _connect(drain_port) for _ in range(args.fixtures)]
    ups = [await _connect(feed_port) for _ in range(args.fixtures)]
    async with trio.open_nursery() as nursery:
        for up, down in zip(ups, downs, strict=True):
            nursery.start_soon(relay, up, down.fileno(), work, counts)
        await trio.sleep(args.warmup)
        t0, c0, n0 = time.monotonic(), os.times(), counts[0]
        await trio.sleep(args.duration)
        t1, c1, n1 = time.monotonic(), os.times(), counts[0]
        nursery.cancel_scope.cancel()
    _report(args, "trio", t1 - t0, c0, c1, frames=n1 - n0)


def run_floor(args: IngestFloor) -> None:
    """Start the feeder and drain children, relay for warm-up + duration, print the line."""
    me = [sys.executable, "-m", MODULE, "--fixtures", str(args.fixtures)]
    feed = [*me, "--role", "feeder", "--rate", str(args.rate), "--size", str(args.size)]
    # Each child binds port 0 and prints the port: no window in which another process could
    # take a port chosen for it in advance.
    children = [
        subprocess.Popen([*feed, "--port", "0"], stdout=subprocess.PIPE),
        subprocess.Popen([*me, "--role", "drain", "--port", "0"], stdout=subprocess.PIPE),
    ]
    try:
        feed_port, drain_port = (_child_port(child) for child in children)
        if args.loop == "epoll":
            epoll_relay_main(args, feed_port, drain_port)
        else:
            trio.run(trio_relay_main, args, feed_port, drain_port)
    finally:
        for child in children:
            child.kill()
            child.wait()


def main(argv: list[str] | None = None) -> None:
    """The children: ``--role feeder|drain --port P --fixtures F [--rate R --size S]``."""
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    p.add_argument("--role", choices=("feeder", "drain"), required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--fixtures", type=int, required=True)
    p.add_argument("--rate", type=float, default=25.0)
    p.add_argument("--size", type=int, default=3000)
    args = p.parse_args(argv)
    if args.role == "feeder":
        feeder_main(args.port, args.fixtures, args.rate, args.size)
    else:
        drain_main(args.port, args.fixtures)


if __name__ == "__main__":
    main()
