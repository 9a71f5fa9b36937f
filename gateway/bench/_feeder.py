"""A fast tracking-protocol feeder: the upstream the gateway (and the peer) connect to.

Run as its own process: ``python -m gateway.bench._feeder --fixtures F --rate HZ ...``. It
speaks the vendor's tracking protocol (auth message, "Authorisation accepted", fixture request
with backfill, frames with increasing ``ix``, heartbeats when idle) on one selectors loop,
because a feeder built on a WebSocket library would cost more CPU than the gateway it feeds.

Every frame starts with ``"_bt":<time.monotonic_ns()>`` stamped when the frame is made; the
load generator subtracts it at receive (CLOCK_MONOTONIC is system-wide on Linux). Each fixture
is a channel that makes frames on its own schedule whether or not anyone is connected, keeps
a short history for backfill, and shares each encoded frame with every connection that follows
it. ``rate`` 0 means as fast as the connections take them.

stdout carries one JSON object per line: ``{"event": "listening", "port": P}`` first, then
answers to stdin commands: ``stats`` (counters) and ``drop`` (close every connection at once,
as a vendor outage would, and report the time). EOF on stdin stops the feeder.
"""

from __future__ import annotations

import argparse
import collections
import heapq
import json
import os
import random
import selectors
import socket
import sys
import time
from typing import Final

from gateway.bench._wsframe import (
    ProtocolError,
    encode_frame,
    parse_frames,
    server_handshake,
    unmask,
)
from gateway.wire import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT

HISTORY: Final = 3000
HEARTBEAT_INTERVAL: Final = 10.0
#: In unlimited mode a channel makes frames while every follower has less than this queued.
UNLIMITED_LOW_WATER: Final = 256 * 1024
UNLIMITED_BATCH: Final = 32
MAX_REQUEST: Final = 16 * 1024
#: Further than this behind schedule, a paced channel skips ahead instead of bursting.
MAX_LAG_NS: Final = 1_000_000_000

AUTH_ACCEPTED: Final = b'{"message": "Authorisation accepted", "level": "INFO"}'
AUTH_BAD_FORMAT: Final = (
    b'{"message": "Authentication message had incorrect format", "level": "ERROR"}'
)
AUTH_REJECTED: Final = b'{"errorMessage": "Supplied token could not be authenticated"}'


def fixture_id(i: int) -> str:
    """The id of the harness's i-th fixture (the feeder, the configs and the load generator
    all derive ids from this one function)."""
    return f"bench-{i:04d}"


def _body(frame_bytes: int, seed: int) -> bytes:
    """The constant tail of a frame (ball and players), sized so frames come to about
    *frame_bytes*. Positions are random once: the gateway forwards bytes, it never reads them."""
    rnd = random.Random(seed)
    players: list[str] = []
    text = ""
    target = frame_bytes - 130  # the per-frame head is about this long
    while len(text) < target:
        n = len(players)
        d, v = rnd.random() * 9, rnd.random() * 8
        x, y = rnd.uniform(-52, 52), rnd.uniform(-34, 34)
        players.append(
            f'{{"tr":"{n + 1}","ro":2,"jn":{n % 30 + 1},"d":{d:.3f},"v":{v:.3f},'
            f'"pn":[{x:.2f},{y:.2f}]}}'
        )
        text = '"ba":{"jn":-1,"pn":[0.0,0.0,0.0]},"hm":[' + ",".join(players) + '],"aw":[],"rf":[]}'
    return text.encode()


class _Conn:
    __slots__ = ("channel", "inbuf", "last_send", "out", "sock", "state")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.out = bytearray()
        self.state = "http"  # http -> auth -> request -> live
        self.channel: _Channel | None = None
        self.last_send = time.monotonic()


class _Channel:
    __slots__ = ("body", "conns", "fid", "head", "history", "ix", "made", "period_ns")

    def __init__(self, fid: str, rate: float, body: bytes) -> None:
        self.fid = fid
        self.ix = 0
        self.made = 0
        self.body = body
        self.head = b',"id":"' + fid.encode() + b'","ix":'
        self.history: collections.deque[bytes] = collections.deque(maxlen=HISTORY)
        self.conns: set[_Conn] = set()
        self.period_ns = int(1e9 / rate) if rate > 0 else 0

    def make(self) -> bytes:
        """The next frame, stamped now, encoded once, kept for backfill."""
        now = time.monotonic_ns()
        ix = self.ix
        self.ix += 1
        self.made += 1
        payload = b"".join(
            (
                b'{"_bt":',
                str(now).encode(),
                self.head,
                str(ix).encode(),
                b',"mt":',
                str(ix * 40).encode(),
                b',"ph":1,"st":"running","ut":',
                str(time.time_ns() // 1_000_000).encode(),
                b",",
                self.body,
            )
        )
        frame = encode_frame(OP_TEXT, payload)
        self.history.append(frame)
        return frame


class Feeder:
    """The feeder's state and event loop (one thread, non-blocking sockets)."""

    def __init__(
        self, *, fixtures: int, rate: float, frame_bytes: int, token: str, port: int = 0
    ) -> None:
        self.token = token
        self.rate = rate
        body = _body(frame_bytes, seed=1)
        self.channels = {
            fixture_id(i): _Channel(fixture_id(i), rate, body) for i in range(fixtures)
        }
        self.sel = selectors.DefaultSelector()
        self.listener = socket.create_server(("127.0.0.1", port), backlog=1024)
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        self.conns: set[_Conn] = set()
        self.sent = 0
        self.bytes_sent = 0
        self.accepted = 0
        self.drops = 0
        self.running = True

    # -- output ---------------------------------------------------------------------------------

    def send(self, conn: _Conn, data: bytes, *, frame: bool = False) -> None:
        """Write *data* now if nothing is queued, queue the rest. ``frame``: count it as data."""
        if frame:
            self.sent += 1
            self.bytes_sent += len(data)
        conn.last_send = time.monotonic()
        if conn.out:
            conn.out += data
            return
        try:
            n = conn.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self.close(conn)
            return
        if n < len(data):
            conn.out += data[n:]
            self.sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def flush(self, conn: _Conn) -> None:
        try:
            n = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError:
            self.close(conn)
            return
        del conn.out[:n]
        if not conn.out:
            self.sel.modify(conn.sock, selectors.EVENT_READ, conn)

    def close(self, conn: _Conn) -> None:
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        if conn.channel is not None:
            conn.channel.conns.discard(conn)
        self.sel.unregister(conn.sock)
        conn.sock.close()

    # -- input ----------------------------------------------------------------------------------

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock)
            self.conns.add(conn)
            self.accepted += 1
            self.sel.register(sock, selectors.EVENT_READ, conn)

    def read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        conn.inbuf += data
        if len(conn.inbuf) > MAX_REQUEST and conn.state != "live":
            self.close(conn)
            return
        try:
            if conn.state == "http":
                end = conn.inbuf.find(b"\r\n\r\n")
                if end < 0:
                    return
                _, response = server_handshake(bytes(conn.inbuf[:end]))
                del conn.inbuf[: end + 4]
                conn.state = "auth"
                self.send(conn, response)
            frames, pos = parse_frames(conn.inbuf)
            messages = [(op, unmask(conn.inbuf, s, e)) for op, s, e in frames]
            del conn.inbuf[:pos]
        except ProtocolError:
            self.close(conn)
            return
        for op, payload in messages:
            if op == OP_PING:
                self.send(conn, encode_frame(OP_PONG, payload))
            elif op == OP_CLOSE:
                self.send(conn, encode_frame(OP_CLOSE, payload[:2]))
                self.close(conn)
                return
            elif op == OP_TEXT:
                self.message(conn, payload)

    def message(self, conn: _Conn, payload: bytes) -> None:
        try:
            msg = json.loads(payload)
        except ValueError:
            msg = None
        if conn.state == "auth":
            if not isinstance(msg, dict) or not isinstance(msg.get("authToken"), str):
                self.send(conn, encode_frame(OP_TEXT, AUTH_BAD_FORMAT))
                self.close(conn)
            elif msg["authToken"] != self.token:
                self.send(conn, encode_frame(OP_TEXT, AUTH_REJECTED))
                self.close(conn)
            else:
                conn.state = "request"
                self.send(conn, encode_frame(OP_TEXT, AUTH_ACCEPTED))
        elif conn.state == "request" and isinstance(msg, dict) and "fixtureId" in msg:
            channel = self.channels.get(str(msg["fixtureId"]))
            if channel is None:
                topic = f"soccer.tracking.enrichment.{msg['fixtureId']}"
                text = json.dumps(
                    {"message": f"Could not find fixture topic {topic}", "level": "WARN"}
                )
                self.send(conn, encode_frame(OP_TEXT, text.encode()))
                return
            backfill = msg.get("backfill")
            history = list(channel.history)
            if backfill is None or backfill == -1:
                replay = history
            elif isinstance(backfill, int) and backfill > 0:
                replay = history[-backfill:]
            else:
                replay = []
            for data in replay:
                self.send(conn, data, frame=True)
            conn.state = "live"
            conn.channel = channel
            channel.conns.add(conn)
        # Anything else after the fixture request is ignored, as the vendor does.

    # -- commands -------------------------------------------------------------------------------

    def command(self, line: str) -> None:
        cmd = line.strip()
        if cmd == "drop":
            t_ns = time.monotonic_ns()
            live = [c for c in self.conns if c.state == "live"]
            for conn in live:
                self.close(conn)
            self.drops += 1
            self.emit({"event": "dropped", "t_ns": t_ns, "closed": len(live)})
        elif cmd == "stats":
            self.emit(self.stats())

    def stats(self) -> dict[str, object]:
        return {
            "event": "stats",
            "t_ns": time.monotonic_ns(),
            "made": sum(c.made for c in self.channels.values()),
            "sent": self.sent,
            "bytes_sent": self.bytes_sent,
            "accepted": self.accepted,
            "live": sum(len(c.conns) for c in self.channels.values()),
            "cpu_s": sum(os.times()[:2]),
        }

    @staticmethod
    def emit(obj: dict[str, object]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    # -- the loop -------------------------------------------------------------------------------

    def run(self, control: int | None = None) -> None:
        """Serve until EOF on *control* (a file descriptor, usually stdin)."""
        ctrl_buf = b""
        if control is not None:
            os.set_blocking(control, False)
            self.sel.register(control, selectors.EVENT_READ, "control")
        now = time.monotonic_ns()
        schedule: list[tuple[int, int, str]] = []
        paced = [c for c in self.channels.values() if c.period_ns]
        unlimited = [c for c in self.channels.values() if not c.period_ns]
        for k, ch in enumerate(paced):
            # Spread the fixtures over one period so they do not all tick at once.
            heapq.heappush(schedule, (now + ch.period_ns * k // len(paced), k, ch.fid))
        last_heartbeat_check = time.monotonic()
        while self.running:
            busy = any(
                ch.conns and all(len(c.out) < UNLIMITED_LOW_WATER for c in ch.conns)
                for ch in unlimited
            )
            if busy:
                timeout = 0.0
            elif schedule:
                timeout = max(0.0, (schedule[0][0] - time.monotonic_ns()) / 1e9)
            else:
                timeout = 1.0
            for key, mask in self.sel.select(min(timeout, 1.0)):
                tag = key.data
                if tag == "listen":
                    self.accept()
                elif tag == "control":
                    assert control is not None  # registered only when given
                    try:
                        chunk = os.read(control, 4096)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        self.running = False
                        break
                    ctrl_buf += chunk
                    *lines, rest = ctrl_buf.split(b"\n")
                    ctrl_buf = rest
                    for line in lines:
                        self.command(line.decode())
                else:
                    conn: _Conn = tag
                    if mask & selectors.EVENT_WRITE and conn.out:
                        self.flush(conn)
                    if mask & selectors.EVENT_READ and conn in self.conns:
                        self.read(conn)
            now = time.monotonic_ns()
            while schedule and schedule[0][0] <= now:
                due, k, fid = heapq.heappop(schedule)
                ch = self.channels[fid]
                frame = ch.make()
                for conn in list(ch.conns):
                    self.send(conn, frame, frame=True)
                due += ch.period_ns
                if now - due > MAX_LAG_NS:
                    due = now + ch.period_ns
                heapq.heappush(schedule, (due, k, fid))
            for ch in unlimited:
                for _ in range(UNLIMITED_BATCH):
                    if not ch.conns or any(len(c.out) >= UNLIMITED_LOW_WATER for c in ch.conns):
                        break
                    frame = ch.make()
                    for conn in list(ch.conns):
                        self.send(conn, frame, frame=True)
            if time.monotonic() - last_heartbeat_check > 1.0:
                last_heartbeat_check = time.monotonic()
                self.heartbeats()

    def heartbeats(self) -> None:
        now = time.monotonic()
        for conn in list(self.conns):
            if conn.state != "http" and now - conn.last_send >= HEARTBEAT_INTERVAL:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
                text = json.dumps({"message": f"Heartbeat sent at {stamp}", "level": "INFO"})
                self.send(conn, encode_frame(OP_TEXT, text.encode()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.bench._feeder")
    parser.add_argument("--fixtures", type=int, default=1)
    parser.add_argument("--rate", type=float, default=25.0)
    parser.add_argument("--frame-bytes", type=int, default=3000)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-env", default="DDE_BENCH_TOKEN")
    args = parser.parse_args(argv)
    token = os.environ.get(args.token_env, "")
    if not token:
        print(f"feeder: ${args.token_env} is not set", file=sys.stderr)
        return 2
    feeder = Feeder(
        fixtures=args.fixtures,
        rate=args.rate,
        frame_bytes=args.frame_bytes,
        token=token,
        port=args.port,
    )
    feeder.emit({"event": "listening", "port": feeder.port})
    try:
        feeder.run(control=sys.stdin.fileno())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
