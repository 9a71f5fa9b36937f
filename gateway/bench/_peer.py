"""The comparison peer: a minimal relay written on ``websockets`` (asyncio).

It does what the gateway does in its simplest form: one client connection per fixture to the
feeder (auth, fixture request, backfill 0; reconnect after ``--reconnect-delay`` on a drop),
and every received frame goes to its subscribers with ``websockets.broadcast()``, the bytes
forwarded as a text frame without decoding. Subscribers connect to ``/`` (every fixture),
``/<fixture>`` (one) or ``/idle`` (none) and only receive.

Run by ``dde-gateway bench`` as ``python .../gateway/bench/_peer.py --feeder-port P ...`` (the
file by its path, not ``-m``, so the process imports no gateway code and its memory figures are
the relay's own); prints ``{"event": "listening", "port": P}`` on stdout once serving, and stops
on EOF on stdin or SIGTERM. ``websockets`` (>= 16.1, for ``broadcast(text=True)``) is the
optional ``bench`` extra: the bench imports this module only in the child it starts, and only
when ``websockets`` is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from typing import Final

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import WebSocketException

DEFAULT_RECONNECT_DELAY: Final = 0.5


def fixture_id(i: int) -> str:
    # Same ids as gateway.bench._feeder.fixture_id; repeated so the peer imports no gateway code.
    return f"bench-{i:04d}"


class Relay:
    def __init__(self, fixtures: list[str]) -> None:
        self.everything: set[ServerConnection] = set()
        self.by_fixture: dict[str, set[ServerConnection]] = {fid: set() for fid in fixtures}
        self.frames_in = 0

    async def serve_subscriber(self, ws: ServerConnection) -> None:
        path = ws.request.path if ws.request is not None else "/"
        if path == "/":
            group: set[ServerConnection] | None = self.everything
        elif path == "/idle":
            group = None
        else:
            group = self.by_fixture.get(path.lstrip("/"))
            if group is None:
                await ws.close(4004, "unknown fixture")
                return
        if group is not None:
            group.add(ws)
        try:
            await ws.wait_closed()
        finally:
            if group is not None:
                group.discard(ws)

    async def follow(self, url: str, token: str, fid: str, reconnect_delay: float) -> None:
        group = self.by_fixture[fid]
        everything = self.everything
        while True:
            try:
                async with connect(url, compression=None, max_size=None, ping_interval=None) as up:
                    await up.send(json.dumps({"authToken": token}))
                    await up.recv()
                    await up.send(json.dumps({"fixtureId": fid, "backfill": 0}))
                    while True:
                        frame = await up.recv(decode=False)
                        self.frames_in += 1
                        broadcast(everything, frame, text=True)
                        broadcast(group, frame, text=True)
            except (OSError, WebSocketException):
                pass
            await asyncio.sleep(reconnect_delay)


async def amain(args: argparse.Namespace) -> None:
    token = os.environ[args.token_env]
    fixtures = [fixture_id(i) for i in range(args.fixtures)]
    relay = Relay(fixtures)
    url = f"ws://127.0.0.1:{args.feeder_port}/ws/soccer/tracking/low_latency"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not os.read(0, 4096) else None)
    async with serve(
        relay.serve_subscriber, "127.0.0.1", args.port, compression=None, max_size=65536
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        tasks = [
            asyncio.create_task(relay.follow(url, token, fid, args.reconnect_delay))
            for fid in fixtures
        ]
        print(json.dumps({"event": "listening", "port": port}), flush=True)
        await stop.wait()
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="_peer.py")
    parser.add_argument("--feeder-port", type=int, required=True)
    parser.add_argument("--fixtures", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-env", default="DDE_BENCH_TOKEN")
    parser.add_argument("--reconnect-delay", type=float, default=DEFAULT_RECONNECT_DELAY)
    asyncio.run(amain(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
