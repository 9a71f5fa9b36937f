"""``dde-gateway watch``: a minimal subscriber of the multiplexed endpoint, for people.

It subscribes to one or more ``feed/fixture`` topics on ``/v1/stream`` and prints one line per
message: frames summarised (seq, size and the vendor's ``ix`` or ``fixtureSeqNum``), everything
else (subscribed, status, gap, error) as the JSON the gateway sent. ``--raw`` prints every
message verbatim. It resumes by itself after a lost connection, using the ``after``/``epoch``
resume of the protocol, so a reconnect shows ``recovered: true`` when no frame was missed.

``--token-file`` sends a subscriber token (``Authorization: Bearer``) when the gateway has
``[subscribers] tokens_file``; ``--ca-file`` trusts a private CA for a ``wss://`` URL. A 401
(no or unknown token) ends the command instead of retrying.
"""

from __future__ import annotations

import argparse
import pathlib
import ssl
import sys
from typing import Any, Final, TextIO

import orjson
import trio
import trio_websocket

from gateway.config import Secret, SecretError, read_token_file

DEFAULT_URL: Final = "ws://127.0.0.1:8765/v1/stream"
RECONNECT_DELAY: Final = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "topics", nargs="+", metavar="FEED/FIXTURE", help="what to subscribe to, e.g. tracking/ID"
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"default: {DEFAULT_URL}")
    parser.add_argument(
        "--backfill", type=int, default=0, help="frames from history first (-1 = all held)"
    )
    parser.add_argument("--raw", action="store_true", help="print every message verbatim")
    parser.add_argument("--count", type=int, default=0, help="stop after this many frames")
    parser.add_argument(
        "--token-file",
        type=pathlib.Path,
        default=None,
        help="file holding a subscriber token (sent as Authorization: Bearer)",
    )
    parser.add_argument(
        "--ca-file",
        type=pathlib.Path,
        default=None,
        help="PEM CA certificate(s) to trust for a wss:// URL (default: the system's)",
    )


def _topic(text: str) -> tuple[str, str]:
    feed, sep, fixture = text.partition("/")
    if not sep or not feed or not fixture:
        raise argparse.ArgumentTypeError(f"expected FEED/FIXTURE, got {text!r}")
    return feed, fixture


def summarise(msg: dict[str, Any]) -> str:
    """One line for a frame message; other messages are printed as they came."""
    data = msg.get("data")
    mark = ""
    if isinstance(data, dict):
        if "ix" in data:
            mark = f" ix={data['ix']}"
        elif isinstance(data.get("fixtureAction"), dict):
            mark = f" fixtureSeqNum={data['fixtureAction'].get('fixtureSeqNum')}"
        elif "eventElementType" in data:
            mark = f" {data.get('eventElementType')}={data.get('state')}"
    size = len(orjson.dumps(data))
    return f"frame {msg['feed']}/{msg['fixture']} seq={msg['seq']}{mark} ({size} bytes)"


class Watcher:
    """Subscribes, prints, and on reconnect resumes after the last seq seen per topic."""

    def __init__(self, args: argparse.Namespace, out: TextIO) -> None:
        self.url: str = args.url
        self.topics = [_topic(t) for t in args.topics]
        self.backfill: int = args.backfill
        self.raw: bool = args.raw
        self.count: int = args.count
        token_file: pathlib.Path | None = getattr(args, "token_file", None)
        self.token: Secret | None = None if token_file is None else read_token_file(token_file)
        ca_file: pathlib.Path | None = getattr(args, "ca_file", None)
        self.ssl_context = (
            None if ca_file is None else ssl.create_default_context(cafile=str(ca_file))
        )
        self.out = out
        self.frames = 0
        self.resume: dict[tuple[str, str], tuple[int, str]] = {}

    def _subscribe_message(self, feed: str, fixture: str) -> str:
        req: dict[str, Any] = {"op": "subscribe", "feed": feed, "fixture": fixture}
        if (feed, fixture) in self.resume:
            seq, epoch = self.resume[(feed, fixture)]
            req.update(after=seq, epoch=epoch)
        else:
            req["backfill"] = self.backfill
        return orjson.dumps(req).decode()

    async def session(self) -> bool:
        """One connection; True when done (``--count`` reached)."""
        headers = []
        if self.token is not None:
            headers.append((b"authorization", b"Bearer " + self.token.reveal().encode()))
        async with trio_websocket.open_websocket_url(
            self.url, self.ssl_context, extra_headers=headers
        ) as ws:
            for feed, fixture in self.topics:
                await ws.send_message(self._subscribe_message(feed, fixture))
            while True:
                text = await ws.get_message()
                msg = orjson.loads(text)
                kind = msg.get("type")
                if kind in ("subscribed", "frame"):
                    self.resume[(msg["feed"], msg["fixture"])] = (msg["seq"], self._epoch(msg))
                if kind == "frame":
                    self.frames += 1
                    print(text if self.raw else summarise(msg), file=self.out, flush=True)
                    if self.count and self.frames >= self.count:
                        return True
                else:
                    print(text, file=self.out, flush=True)

    def _epoch(self, msg: dict[str, Any]) -> str:
        if "epoch" in msg:
            return str(msg["epoch"])
        return self.resume.get((msg["feed"], msg["fixture"]), (0, ""))[1]

    async def run(self) -> int:
        while True:
            try:
                if await self.session():
                    return 0
            except trio_websocket.ConnectionRejected as exc:
                if exc.status_code == 401:
                    print(
                        f"# {self.url}: a valid subscriber token is required (--token-file)",
                        file=sys.stderr,
                        flush=True,
                    )
                    return 1
                print(f"# cannot connect to {self.url}: HTTP {exc.status_code}", file=sys.stderr)
            except (OSError, trio_websocket.HandshakeError) as exc:
                print(f"# cannot connect to {self.url}: {exc}", file=sys.stderr, flush=True)
            except trio_websocket.ConnectionClosed as exc:
                print(f"# connection closed: {exc.reason}", file=sys.stderr, flush=True)
            await trio.sleep(RECONNECT_DELAY)


def run_from_args(args: argparse.Namespace) -> int:
    try:
        watcher = Watcher(args, sys.stdout)
    except (argparse.ArgumentTypeError, SecretError, OSError, ssl.SSLError) as exc:
        print(f"dde-gateway watch: {exc}", file=sys.stderr)
        return 2
    return trio.run(watcher.run)
