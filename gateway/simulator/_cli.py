"""``dde-gateway simulate``: the simulator as a command.

Options map one to one onto :class:`Simulator` and :class:`Faults`; bad values are reported by
argparse (exit 2) or, for values only checkable later (fault names, files), as ValueError with a
message naming the option.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import signal
import types
from typing import Final, get_args, get_type_hints

import attrs
import trio

from gateway.config import ListenAddress
from gateway.simulator._faults import FAULT_NAMES, Faults
from gateway.simulator._server import (
    ACCEPT_MEDIA_TYPE,
    DEFAULT_ACTION_INTERVAL,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_RATE_HZ,
    Simulator,
)

logger = logging.getLogger("gateway.simulator")

DEFAULT_LISTEN: Final = "127.0.0.1:8799"
DEFAULT_TRACKING_FIXTURES: Final = (
    "5501b26a-1c44-4c3b-9ff5-9322084d41f9",
    "08456e52-9cf7-48cc-913c-f45ec0a1b2c3",
    "3f1c7d2e-8a4b-4c6d-9e0f-1a2b3c4d5e6f",
)
# The fastpath fixture of config/demo.toml, so that `simulate` plus `run --config
# config/demo.toml` follows every fixture of that config.
DEFAULT_FASTPATH_FIXTURES: Final = ("2ed1cba1-7c3e-4b5e-9a51-0d1f1c2b3a4d",)
TRACKING_PATH: Final = "/ws/soccer/tracking/low_latency"
FASTPATH_PATH: Final = "/soccer/fixtures/{fixture}/actions"


def _id_list(text: str) -> list[str]:
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise argparse.ArgumentTypeError("expected ID[,ID...]")
    return ids


def _listen(text: str) -> ListenAddress:
    try:
        return ListenAddress.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _recording(text: str) -> tuple[str, pathlib.Path]:
    fixture, sep, path = text.partition("=")
    if not sep or not fixture or not path:
        raise argparse.ArgumentTypeError(f"expected ID=PATH.jsonl, got {text!r}")
    return fixture, pathlib.Path(path)


def parse_fault(text: str) -> tuple[str, str, object]:
    """``ID:name=value`` -> (fixture id, field name, typed value). ``*`` as ID: every connection."""
    fixture, sep, rest = text.rpartition(":")
    name, eq, raw = rest.partition("=")
    if not sep or not fixture or not eq:
        raise argparse.ArgumentTypeError(f"expected ID:name=value, got {text!r}")
    if name not in FAULT_NAMES:
        raise argparse.ArgumentTypeError(f"unknown fault {name!r}; known: {', '.join(FAULT_NAMES)}")
    hint = get_type_hints(Faults)[name]
    options = set(get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
    raw = raw.strip()
    if type(None) in options and raw.lower() in ("none", "null", ""):
        return fixture, name, None
    try:
        if bool in options:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return fixture, name, raw.lower() in ("true", "1", "yes")
        if int in options:
            return fixture, name, int(raw)
        return fixture, name, float(raw)
    except ValueError:
        kind = " or ".join(sorted(t.__name__ for t in options))
        raise argparse.ArgumentTypeError(f"fault {name}: expected {kind}, got {raw!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` options to ``parser``."""
    parser.add_argument(
        "--listen",
        type=_listen,
        default=ListenAddress.parse(DEFAULT_LISTEN),
        metavar="HOST:PORT",
        help=f"where to listen (default {DEFAULT_LISTEN}; port 0 picks a free one)",
    )
    parser.add_argument(
        "--fixtures",
        type=_id_list,
        default=None,
        metavar="ID[,ID...]",
        help="tracking fixtures (default: three fixed ids)",
    )
    parser.add_argument(
        "--fastpath-fixtures",
        type=_id_list,
        default=None,
        metavar="ID[,ID...]",
        help="fastpath fixtures (default: one fixed id)",
    )
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument(
        "--token",
        action="append",
        default=None,
        help="an accepted token, repeatable (default: any non-empty token)",
    )
    tokens.add_argument(
        "--token-file",
        type=pathlib.Path,
        default=None,
        help="file of accepted tokens, one per line (default: any non-empty token)",
    )
    parser.add_argument(
        "--rate", type=_positive, default=DEFAULT_RATE_HZ, metavar="HZ", help="tracking frames/s"
    )
    parser.add_argument(
        "--heartbeat",
        type=_positive,
        default=DEFAULT_HEARTBEAT_INTERVAL,
        metavar="S",
        help="seconds between heartbeats",
    )
    parser.add_argument(
        "--action-interval",
        type=_positive,
        default=DEFAULT_ACTION_INTERVAL,
        metavar="S",
        help="seconds between fastpath actions",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the data")
    parser.add_argument(
        "--recording",
        type=_recording,
        action="append",
        default=[],
        metavar="ID=PATH.jsonl",
        help="serve this JSONL file as tracking fixture ID (repeatable)",
    )
    parser.add_argument(
        "--fault",
        type=parse_fault,
        action="append",
        default=[],
        metavar="ID:name=value",
        help=f"set a fault ({', '.join(FAULT_NAMES)}); ID '*' = every connection (repeatable)",
    )


def _read_tokens(path: pathlib.Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"--token-file {path}: {exc.strerror}") from None
    tokens = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    if not tokens:
        raise ValueError(f"--token-file {path}: no token in it")
    return tokens


def build_simulator(args: argparse.Namespace) -> Simulator:
    """A :class:`Simulator` configured from parsed ``simulate`` options (ValueError if bad)."""
    tokens: list[str] | None = args.token
    if args.token_file is not None:
        tokens = _read_tokens(args.token_file)
    sim = Simulator(
        tokens=tokens,
        heartbeat_interval=args.heartbeat,
        rate_hz=args.rate,
        action_interval=args.action_interval,
        seed=args.seed,
    )
    recordings = dict(args.recording)
    tracking = list(DEFAULT_TRACKING_FIXTURES if args.fixtures is None else args.fixtures)
    tracking += [fid for fid in recordings if fid not in tracking]
    for fid in tracking:
        sim.add_fixture(fid, kind="tracking", recording=recordings.get(fid))
    fastpath = (
        DEFAULT_FASTPATH_FIXTURES if args.fastpath_fixtures is None else args.fastpath_fixtures
    )
    for fid in fastpath:
        sim.add_fixture(fid, kind="fastpath")
    for fid, name, value in args.fault:
        if fid == "*":
            faults = sim.connection_faults
        elif fid in sim.fixtures:
            faults = sim.faults(fid)
        else:
            raise ValueError(f"--fault {fid}:{name}: no such fixture")
        setattr(faults, name, value)
        attrs.validate(faults)
    return sim


async def run_from_args(
    args: argparse.Namespace, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the simulator described by ``args``; ``started(bound_port)``.

    Runs until cancelled or until SIGINT/SIGTERM, which end it cleanly (return, no traceback).
    A bad option value or a port that cannot be bound raises SystemExit with a one-line message.
    """
    try:
        sim = build_simulator(args)
    except ValueError as exc:
        raise SystemExit(f"dde-gateway simulate: error: {exc}") from None
    listen: ListenAddress = args.listen

    async def stop_on_signal(
        cancel: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                logger.info("simulator stopping (%s)", signal.Signals(signum).name)
                cancel.cancel()
                return

    try:
        async with trio.open_nursery() as nursery:
            port: int = await nursery.start(sim.serve, listen.host, listen.port)
            await nursery.start(stop_on_signal, nursery.cancel_scope)
            _log_urls(sim, listen, port)
            task_status.started(port)
    except* OSError as group:
        # serve() raises OSError only when it cannot bind; connection errors stay inside it.
        error = group.exceptions[0]
        reason = error.strerror if isinstance(error, OSError) else str(error)
        raise SystemExit(
            f"dde-gateway simulate: error: cannot listen on {listen}: {reason}"
        ) from None


def _log_urls(sim: Simulator, listen: ListenAddress, port: int) -> None:
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    base = f"ws://{host}:{port}"
    for fixture in sim.fixtures.values():
        if fixture.kind == "tracking":
            logger.info(
                "tracking fixture %s: %s%s, then send "
                '{"authToken": ...} and {"fixtureId": "%s", "backfill": 0}',
                fixture.id,
                base,
                TRACKING_PATH,
                fixture.id,
            )
        else:
            logger.info(
                'fastpath fixture %s: %s%s (header Accept: %s), then send {"authToken": ...}',
                fixture.id,
                base,
                FASTPATH_PATH.format(fixture=fixture.id),
                ACCEPT_MEDIA_TYPE,
            )
