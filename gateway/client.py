"""``dde-gateway watch``: subscribe to topics of ``/v1/stream`` and print what arrives.

Built on the Python client (``dde_gateway_client``, its trio adapter): it reconnects with
full-jitter backoff across every ``--url`` (instances of one cluster, or one gateway), resumes
each subscription with ``after`` + ``epoch``, prints each frame once, in order, and says what it
could not recover (a ``loss`` event) instead of skipping it. Output:

- default: one line per frame summarised (seq, size and the vendor's ``ix`` or
  ``fixtureSeqNum``), every other event as its JSON line, connection states on stderr;
- ``--events``: every event as one JSON object per line (docs/clients.md lists the keys);
- ``--raw``: every message the gateway sent, verbatim, one per line (but frames the client
  dropped as duplicates: each frame once).

``--token-file`` sends a subscriber token (``Authorization: Bearer``); ``--ca-file`` trusts a
private CA for ``wss://``. Exit status: 0 at the end (SIGINT/SIGTERM, ``--count`` reached, or
every subscription ended), 2 for bad arguments, 3 when the token is refused (HTTP 401).
``--replay PPS`` replays the topics from their first frame instead (the ``replay`` op), and
ends when every replay has.
"""

from __future__ import annotations

import argparse
import pathlib
import signal
import ssl
import sys
from typing import Final, TextIO

import trio
from dde_gateway_client import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MAX_QUEUE,
    Client,
    Error,
    Event,
    Frame,
    ReplayFrame,
    StateChanged,
)

from gateway.config import SecretError, read_token_file

DEFAULT_URL: Final = "ws://127.0.0.1:8765/v1/stream"
#: Exit statuses (docs/clients.md).
EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
EXIT_FATAL: Final = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "topics", nargs="+", metavar="FEED/FIXTURE", help="what to subscribe to, e.g. tracking/ID"
    )
    parser.add_argument(
        "--url",
        action="append",
        default=None,
        help=f"a /v1/stream URL; repeat for instances of one cluster (default: {DEFAULT_URL})",
    )
    parser.add_argument(
        "--backfill", type=int, default=0, help="frames from history first (-1 = all held)"
    )
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--raw", action="store_true", help="print every message verbatim")
    out.add_argument("--events", action="store_true", help="print every event as a JSON line")
    parser.add_argument("--count", type=int, default=0, help="stop after this many frames")
    parser.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help=f"events held for printing before reading stops (default {DEFAULT_MAX_QUEUE})",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=DEFAULT_HEARTBEAT_INTERVAL,
        help="the gateway's heartbeat_interval: 3 without any message = a dead connection",
    )
    parser.add_argument(
        "--replay",
        type=int,
        default=None,
        metavar="PPS",
        help="replay the topics from their first frame at PPS frames a second (1-1000) "
        "instead of following them live; ends when every replay has",
    )
    parser.add_argument(
        "--slow-ms",
        type=float,
        default=0.0,
        help="test aid: wait this many ms after each event (a slow application)",
    )
    parser.add_argument(
        "--token-file",
        type=pathlib.Path,
        default=None,
        help="file holding a subscriber token, sent as Authorization: Bearer (default: none sent)",
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


def summarise(event: Frame | ReplayFrame) -> str:
    """One line for a frame (``replay`` instead of ``frame`` for a replayed one)."""
    data = event.data
    mark = ""
    if isinstance(data, dict):
        if "ix" in data:
            mark = f" ix={data['ix']}"
        elif isinstance(data.get("fixtureAction"), dict):
            mark = f" fixtureSeqNum={data['fixtureAction'].get('fixtureSeqNum')}"
        elif "eventElementType" in data:
            mark = f" {data.get('eventElementType')}={data.get('state')}"
    size = len(event.text.encode())
    kind = "frame" if isinstance(event, Frame) else "replay"
    return f"{kind} {event.feed}/{event.fixture} seq={event.seq}{mark} ({size} bytes)"


class Watcher:
    """What ``watch`` does with its arguments: a client, one merged stream, printing."""

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO = sys.stderr) -> None:
        self.urls: list[str] = list(args.url or [DEFAULT_URL])
        self.topics = [_topic(t) for t in args.topics]
        self.backfill: int = args.backfill
        self.raw: bool = args.raw
        self.events: bool = getattr(args, "events", False)
        self.count: int = args.count
        self.max_queue: int = getattr(args, "max_queue", DEFAULT_MAX_QUEUE)
        self.heartbeat_interval: float = getattr(
            args, "heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL
        )
        self.slow: float = getattr(args, "slow_ms", 0.0) / 1000.0
        if self.count < 0 or self.max_queue < 1 or self.slow < 0:
            raise argparse.ArgumentTypeError("--count, --slow-ms >= 0 and --max-queue >= 1")
        if self.backfill < -1:
            raise argparse.ArgumentTypeError("--backfill must be -1 or more")
        self.replay: int | None = getattr(args, "replay", None)
        if self.replay is not None and not 1 <= self.replay <= 1000:
            raise argparse.ArgumentTypeError("--replay must be 1 to 1000 frames a second")
        token_file: pathlib.Path | None = getattr(args, "token_file", None)
        token = None if token_file is None else read_token_file(token_file).reveal()
        ca_file: pathlib.Path | None = getattr(args, "ca_file", None)
        self.ssl_context = (
            None if ca_file is None else ssl.create_default_context(cafile=str(ca_file))
        )
        self.out = out
        self.err = err
        self.frames = 0
        # Checked here, so that bad arguments exit 2 before any connection.
        self.client = Client(
            self.urls,
            token=token,
            ssl_context=self.ssl_context,
            max_queue=self.max_queue,
            heartbeat_interval=self.heartbeat_interval,
            on_message=self._print_raw if self.raw else None,
        )

    def _print_raw(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _show(self, event: Event) -> None:
        if self.events:
            print(event.to_json(), file=self.out, flush=True)
        elif isinstance(event, StateChanged):
            reason = f" ({event.reason})" if event.reason else ""
            print(f"# {event.state} {event.url}{reason}", file=self.err, flush=True)
        elif isinstance(event, Error) and event.fatal:
            print(f"# {event.message}", file=self.err, flush=True)
        elif self.raw:
            return
        elif isinstance(event, Frame | ReplayFrame):
            print(summarise(event), file=self.out, flush=True)
        else:
            print(event.to_json(), file=self.out, flush=True)

    async def run(self) -> int:
        """Until the end; the exit status."""
        fatal = False
        async with self.client as client, trio.open_nursery() as nursery:
            nursery.start_soon(self._stop_on_signals, nursery.cancel_scope)
            if self.replay is None:
                sub = client.subscribe_many(self.topics, backfill=self.backfill)
            else:
                sub = client.replay_many(self.topics, rate=self.replay)
            async for event in sub:
                self._show(event)
                if isinstance(event, Error) and event.fatal:
                    fatal = True
                if isinstance(event, Frame | ReplayFrame):
                    self.frames += 1
                    if self.count and self.frames >= self.count:
                        break
                if self.slow:
                    await trio.sleep(self.slow)
            nursery.cancel_scope.cancel()
        return EXIT_FATAL if fatal else EXIT_OK

    async def _stop_on_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                scope.cancel()
                return


def run_from_args(args: argparse.Namespace) -> int:
    try:
        watcher = Watcher(args, sys.stdout)
    except (argparse.ArgumentTypeError, SecretError, OSError, ssl.SSLError, ValueError) as exc:
        print(f"dde-gateway watch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return trio.run(watcher.run)
