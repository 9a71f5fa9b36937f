"""The load generator: many subscribers in one process, reading raw sockets with epoll.

Run as its own process: ``python -m gateway.bench._loadgen --kind gateway --port P ...``.
Subscribers must never be the bottleneck, so there is no WebSocket library here: the upgrade is
written by hand, frames are split by their headers only, and the one thing read from a payload
is the feeder's ``"_bt":<monotonic ns>`` stamp (found with ``bytes.find`` near the payload's
start, after the gateway's envelope when there is one). Latency = receive time - stamp; all
frames completed by one ``recv`` share its receive time.

Kinds of subscriber: healthy (subscribe, read everything), stuck (subscribe, never read; a small
receive buffer so the server notices soon), idle (connect, never subscribe).
Targets: ``gateway`` (``/v1/stream``, one subscribe message per fixture) and ``peer``
(``/`` for every fixture, ``/<fixture>`` for one, ``/idle`` for none).

stdout carries one JSON object per line: ``connected`` once every subscriber is connected (or
``error`` and exit 1), then one answer per stdin command: ``ready`` (how many healthy subscribers
have had a frame), ``mark`` (open the measured window), ``drop <t_ns>`` (time the first frame
stamped after t_ns at every subscriber, and from then on each one's *stall*: the longest time
between two fresh frames, a frame being fresh when its stamp is newer than every one that
subscriber had before, so a backfill of frames made during an outage ends the stall but a
replay of old ones does not), ``report`` (the window's figures; with ``--fanout spread`` also
the frames lost and repeated, by the feeder's ``ix``). EOF or ``quit`` ends.
"""

from __future__ import annotations

import argparse
import array
import collections
import json
import os
import select
import socket
import sys
import time
import zlib
from typing import Final

from gateway.bench._feeder import fixture_id
from gateway.bench._scenario import NICE_MAX
from gateway.bench._wsframe import (
    DEFLATE_OFFER,
    ProtocolError,
    check_server_handshake,
    client_handshake,
    encode_frame,
    parse_frames,
)
from gateway.wire import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT

RECV_BYTES: Final = 65536
CONNECT_BATCH: Final = 200
CONNECT_TIMEOUT: Final = 30.0
STUCK_RCVBUF: Final = 16 * 1024
#: The stamp is within this many bytes of the payload's start (after the gateway's envelope).
STAMP_WINDOW: Final = 512
STAMP: Final = b'"_bt":'
#: The feeder's vendor position, within this many bytes after the stamp (``,"id":"...","ix":``).
IX: Final = b'"ix":'
IX_WINDOW: Final = 96
IX_EVENTS_KEPT: Final = 20
SEQ: Final = b'"seq":'
#: A text message compressed with permessage-deflate (RSV1 set), as parse_frames reports it.
OP_TEXT_DEFLATED: Final = 0x40 | OP_TEXT
MAX_SAMPLES: Final = 20_000_000


class _Sub:
    __slots__ = (
        "buf",
        "close_code",
        "dups",
        "first_fresh",
        "frames",
        "last_fresh",
        "last_ix",
        "lost",
        "newest_bt",
        "sock",
        "stall",
    )

    def __init__(self, sock: socket.socket, leftover: bytes) -> None:
        self.sock = sock
        self.buf = leftover
        self.frames = 0
        self.first_fresh = 0
        #: The newest stamp seen, the arrival of the frame that carried it, and the longest
        #: gap between such arrivals since ``drop`` (ns).
        self.newest_bt = 0
        self.last_fresh = 0
        self.stall = 0
        self.close_code: int | None = None
        #: With one fixture per subscriber: the highest vendor ix seen (-1: none yet), the
        #: frames missing below it and the frames that came again (ix not above it).
        self.last_ix = -1
        self.lost = 0
        self.dups = 0


def percentile(sorted_values: list[int] | array.array[int], q: float) -> int:
    """Nearest-rank percentile of an already sorted sequence (0 when empty)."""
    n = len(sorted_values)
    if n == 0:
        return 0
    k = min(n - 1, max(0, int(q / 100.0 * n + 0.5) - 1))
    return int(sorted_values[k])


def _envelope_seq(text: bytes, start: int, end: int) -> int | None:
    """The gateway envelope's ``seq`` of the frame at *start* (None: not found before *end*)."""
    k = text.find(SEQ, start, end)
    if k < 0:
        return None
    k += len(SEQ)
    return int(text[k : text.find(b",", k, end)])


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the server closed this (unread) connection: TCP state past ESTABLISHED.
    Reading would tell too, but a stuck subscriber must not read."""
    tcp_established = 1  # first byte of struct tcp_info (linux/tcp.h)
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != tcp_established
    except OSError:
        return True


def _connect(
    host: str, port: int, paths: list[str], rcvbuf: int | None, extensions: str | None = None
) -> list[_Sub]:
    """Open one upgraded connection per path, in batches (requests first, then answers) so
    thousands of connections take seconds, not minutes. Raises OSError or ProtocolError."""
    subs: list[_Sub] = []
    for i in range(0, len(paths), CONNECT_BATCH):
        pending: list[tuple[socket.socket, bytes]] = []
        for path in paths[i : i + CONNECT_BATCH]:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect((host, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            request, accept = client_handshake(host, port, path, extensions=extensions)
            sock.sendall(request)
            pending.append((sock, accept))
        for sock, accept in pending:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ProtocolError("connection closed during the upgrade")
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            check_server_handshake(head, accept)
            sock.setblocking(False)
            subs.append(_Sub(sock, rest))
    return subs


class LoadGen:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        # epoll directly: selectors' per-event bookkeeping costs more than the parsing.
        self.epoll = select.epoll()
        self.by_fd: dict[int, _Sub] = {}
        self.healthy: list[_Sub] = []
        self.stuck: list[_Sub] = []
        self.idle: list[_Sub] = []
        self.recording = False
        self.samples: array.array[int] = array.array("q")
        self.deliveries = 0
        self.bytes = 0
        #: Frames that came compressed (permessage-deflate, RSV1 set).
        self.compressed = 0
        self.control = 0
        self.t_mark = 0
        self.drop_ns = 0
        self.closed: collections.Counter[int] = collections.Counter()
        self.cpu_mark = 0.0
        #: Count lost and repeated frames by the feeder's ``ix`` (one fixture a subscriber).
        self.track_ix = args.fanout == "spread"
        #: The first :data:`IX_EVENTS_KEPT` of them: [subscriber, "lost" | "repeated", the
        #: last ix it had, the ix that came, the gateway's seq of it, monotonic ns].
        self.ix_events: list[list[object]] = []

    def _paths(self, n: int, offset: int) -> tuple[list[str], list[list[str]]]:
        """Paths and the fixtures each connection subscribes to (gateway kind only)."""
        fixtures = [fixture_id(i) for i in range(self.args.fixtures)]
        paths: list[str] = []
        subs: list[list[str]] = []
        for k in range(n):
            spread = fixtures[((offset + k) * self.args.stride) % len(fixtures)]
            mine = fixtures if self.args.fanout == "all" else [spread]
            if self.args.kind == "gateway":
                paths.append("/v1/stream")
            else:
                paths.append("/" if self.args.fanout == "all" else f"/{mine[0]}")
            subs.append(mine)
        return paths, subs

    def connect(self) -> None:
        a = self.args
        host, port = a.host, a.port
        paths, fixtures = self._paths(a.subscribers, 0)
        offer = DEFLATE_OFFER if a.deflate else None
        self.healthy = _connect(host, port, paths, None, offer)
        stuck_paths, stuck_fixtures = self._paths(a.stuck, a.subscribers)
        self.stuck = _connect(host, port, stuck_paths, STUCK_RCVBUF)
        idle_path = "/v1/stream" if a.kind == "gateway" else "/idle"
        self.idle = _connect(host, port, [idle_path] * a.idle, None)
        if a.kind == "gateway":
            for sub, mine in zip(self.healthy + self.stuck, fixtures + stuck_fixtures, strict=True):
                for fid in mine:
                    msg = json.dumps(
                        {"op": "subscribe", "feed": a.feed, "fixture": fid, "backfill": 0}
                    )
                    sub.sock.setblocking(True)
                    sub.sock.sendall(encode_frame(OP_TEXT, msg.encode(), mask=True))
                    sub.sock.setblocking(False)
        for sub in self.healthy + self.idle:
            self.by_fd[sub.sock.fileno()] = sub
            self.epoll.register(sub.sock.fileno(), select.EPOLLIN)

    def read(self, sub: _Sub) -> None:
        try:
            data = sub.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close(sub, 1006)
            return
        now = time.monotonic_ns()
        buf = sub.buf + data if sub.buf else data
        frames, pos = parse_frames(buf)
        recording = self.recording
        drop_ns = self.drop_ns
        samples = self.samples
        track_ix = self.track_ix
        got = 0
        nbytes = 0
        for op, start, end in frames:
            if op in {OP_TEXT, OP_TEXT_DEFLATED}:
                # Within this message only: a short one (a status, a heartbeat) must not
                # lend it the next frame's stamp.
                text, first, last = buf, start, end
                i = buf.find(STAMP, start, min(end, start + STAMP_WINDOW))
                if op == OP_TEXT_DEFLATED:
                    # Only the stamp is needed: inflate the first few hundred bytes.
                    text = zlib.decompressobj(-15).decompress(buf[start:end], STAMP_WINDOW)
                    first, last = 0, len(text)
                    i = text.find(STAMP)
                    self.compressed += 1
                if i < 0:
                    self.control += 1
                    continue
                j = text.find(b",", i + 6, i + 40)
                bt = int(text[i + 6 : j])
                k = text.find(IX, j, min(last, j + IX_WINDOW)) if track_ix else -1
                if k >= 0:
                    k += len(IX)
                    ix = int(text[k : text.find(b",", k, k + 24)])
                    if ix <= sub.last_ix or (sub.last_ix >= 0 and ix > sub.last_ix + 1):
                        self.ix_event(sub, ix, _envelope_seq(text, first, i))
                    sub.last_ix = max(sub.last_ix, ix)
                got += 1
                nbytes += end - start
                if recording:
                    samples.append(now - bt)
                if bt > sub.newest_bt:
                    if drop_ns and sub.last_fresh and now - sub.last_fresh > sub.stall:
                        sub.stall = now - sub.last_fresh
                    sub.newest_bt = bt
                    sub.last_fresh = now
                if drop_ns and bt > drop_ns and not sub.first_fresh:
                    sub.first_fresh = now
            elif op == OP_PING:
                try:
                    sub.sock.send(encode_frame(OP_PONG, buf[start:end], mask=True))
                except OSError:
                    pass
            elif op == OP_CLOSE:
                code = int.from_bytes(buf[start : start + 2], "big") if end - start >= 2 else 1005
                self.close(sub, code)
                return
        sub.frames += got
        if recording:
            self.deliveries += got
            self.bytes += nbytes
            if len(samples) > MAX_SAMPLES:
                del samples[: MAX_SAMPLES // 2]
        sub.buf = buf[pos:]

    def ix_event(self, sub: _Sub, ix: int, seq: int | None) -> None:
        """*ix* does not follow the subscriber's last one: count it (and keep the first few)."""
        if ix <= sub.last_ix:
            sub.dups += 1
            kind = "repeated"
        else:
            sub.lost += ix - sub.last_ix - 1
            kind = "lost"
        if len(self.ix_events) < IX_EVENTS_KEPT:
            at = time.monotonic_ns()
            self.ix_events.append([self.healthy.index(sub), kind, sub.last_ix, ix, seq, at])

    def close(self, sub: _Sub, code: int) -> None:
        if sub.close_code is not None:
            return
        sub.close_code = code
        self.closed[code] += 1
        fd = sub.sock.fileno()
        self.epoll.unregister(fd)
        del self.by_fd[fd]
        sub.sock.close()

    def command(self, line: str) -> bool:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "ready":
            receiving = sum(1 for s in self.healthy if s.frames)
            emit({"event": "ready", "receiving": receiving, "of": len(self.healthy)})
        elif cmd == "mark":
            self.recording = True
            self.samples = array.array("q")
            self.deliveries = self.bytes = self.control = 0
            self.t_mark = time.monotonic_ns()
            self.cpu_mark = sum(os.times()[:2])
            emit({"event": "marked", "t_ns": self.t_mark})
        elif cmd == "drop":
            self.drop_ns = int(arg)
            for sub in self.healthy:
                sub.first_fresh = sub.stall = 0
            emit({"event": "drop", "t_ns": self.drop_ns})
        elif cmd == "progress":
            emit({"event": "progress", "deliveries": self.deliveries, "t_ns": time.monotonic_ns()})
        elif cmd == "report":
            emit(self.report())
        elif cmd == "quit":
            return False
        return True

    def report(self) -> dict[str, object]:
        now = time.monotonic_ns()
        window = (now - self.t_mark) / 1e9 if self.t_mark else 0.0
        lat = sorted(self.samples)
        ms = 1e-6
        fresh = sorted(s.first_fresh - self.drop_ns for s in self.healthy if s.first_fresh)
        # A subscriber still waiting for a fresh frame is stalled until now.
        each = [
            max(s.stall, now - s.last_fresh if s.last_fresh else now - self.drop_ns)
            for s in self.healthy
        ]
        stalls = sorted(each)
        return {
            "event": "report",
            "window_s": window,
            "deliveries": self.deliveries,
            "bytes": self.bytes,
            "compressed": self.compressed,
            "control": self.control,
            "latency_ms": {
                "count": len(lat),
                "p50": percentile(lat, 50) * ms,
                "p99": percentile(lat, 99) * ms,
                "p999": percentile(lat, 99.9) * ms,
                "max": (lat[-1] if lat else 0) * ms,
            },
            "healthy": len(self.healthy),
            "healthy_open": sum(1 for s in self.healthy if s.close_code is None),
            "idle_open": sum(1 for s in self.idle if s.close_code is None),
            "stuck": len(self.stuck),
            "stuck_closed": sum(1 for sub in self.stuck if _peer_closed(sub.sock)),
            "closed": {str(k): v for k, v in self.closed.items()},
            # By vendor ix, per subscriber of one fixture (--fanout spread; else null): frames
            # it never got between two it got, and frames it got again.
            "lost": sum(s.lost for s in self.healthy) if self.track_ix else None,
            "duplicates": sum(s.dups for s in self.healthy) if self.track_ix else None,
            "ix_events": self.ix_events,
            "fresh_ms": {
                "count": len(fresh),
                "min": fresh[0] * ms if fresh else None,
                "p50": percentile(fresh, 50) * ms if fresh else None,
                "max": fresh[-1] * ms if fresh else None,
            }
            if self.drop_ns
            else None,
            "stall_ms": {
                "count": len(stalls),
                "p50": percentile(stalls, 50) * ms if stalls else None,
                "max": stalls[-1] * ms if stalls else None,
                # Per subscriber, in the order they were opened.
                "each": [round(v * ms, 1) for v in each],
            }
            if self.drop_ns
            else None,
            "cpu_s": sum(os.times()[:2]) - self.cpu_mark,
        }

    def run(self, control: int) -> None:
        os.set_blocking(control, False)
        self.epoll.register(control, select.EPOLLIN)
        pending = b""
        by_fd = self.by_fd
        read = self.read
        while True:
            for fd, _ in self.epoll.poll(0.5):
                sub = by_fd.get(fd)
                if sub is not None:
                    read(sub)
                    continue
                try:
                    chunk = os.read(control, 4096)
                except BlockingIOError:
                    continue
                if not chunk:
                    return
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not self.command(line.decode()):
                        return


def emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.bench._loadgen")
    parser.add_argument("--kind", choices=("gateway", "peer"), default="gateway")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--subscribers", type=int, default=1)
    parser.add_argument("--fixtures", type=int, default=1)
    parser.add_argument("--fanout", choices=("all", "spread"), default="all")
    parser.add_argument(
        "--stride",
        type=int,
        default=1,
        help="with --fanout spread, subscriber i takes fixture i * STRIDE mod F",
    )
    parser.add_argument("--stuck", type=int, default=0)
    parser.add_argument("--idle", type=int, default=0)
    parser.add_argument("--feed", default="tracking")
    parser.add_argument(
        "--deflate", action="store_true", help="offer permessage-deflate (no context takeover)"
    )
    parser.add_argument(
        "--nice",
        type=int,
        choices=range(NICE_MAX + 1),
        default=0,
        metavar="0-19",
        help="lower this process's priority by so much first (the server's wake-ups of it then "
        "do not preempt the server)",
    )
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    gen = LoadGen(args)
    t0 = time.monotonic()
    try:
        gen.connect()
    except (OSError, ProtocolError) as exc:
        emit({"event": "error", "message": f"connect failed: {exc}"})
        return 1
    emit(
        {
            "event": "connected",
            "seconds": time.monotonic() - t0,
            "subscribers": args.subscribers,
            "stuck": args.stuck,
            "idle": args.idle,
        }
    )
    try:
        gen.run(sys.stdin.fileno())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
