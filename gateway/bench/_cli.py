"""``dde-gateway bench`` arguments and entry point (called by :mod:`gateway.cli`).

Two kinds of run: the scenarios (``--scenario``, the knobs; :mod:`gateway.bench._run`), and the
floors (``--floor fanout|ingest``; :mod:`gateway.bench._floor_fanout` and
:mod:`gateway.bench._floor_ingest`), in-process micro-benchmarks of the least the gateway's
fan-out and ingest can cost, which take a few of the same knobs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Final

import attrs

from gateway.bench._run import BenchError, PeerUnavailable, run_bench
from gateway.bench._scenario import PRESETS, SCENARIO_NAMES, Scenario

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

FLOOR_NAMES: Final = ("fanout", "ingest")
#: The options each floor takes (dest names); the floor's own defaults apply to the others.
_FLOOR_OPTIONS: Final[dict[str, tuple[str, ...]]] = {
    "fanout": ("subscribers", "frames", "frame_bytes", "rate", "baseline", "write_delay"),
    "ingest": ("fixtures", "rate", "frame_bytes", "warmup", "duration", "work", "loop"),
}
#: Options a scenario run does not take.
_FLOOR_ONLY: Final = ("frames", "work", "loop")

# Knob name -> (type, help). Each overrides the chosen preset's value when given.
_KNOBS: Final[dict[str, tuple[type, str]]] = {
    "subscribers": (int, "subscribers that read frames"),
    "fixtures": (int, "fixtures (one upstream connection each)"),
    "rate": (float, "frames per second per fixture; 0 = as fast as the upstream takes them"),
    "frame_bytes": (int, "size of one upstream frame in bytes"),
    "duration": (float, "measured window in seconds"),
    "warmup": (float, "seconds of traffic before the window opens"),
    "stuck": (int, "subscribers that subscribe and then never read"),
    "idle": (int, "subscribers that connect and never subscribe"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bench options to *parser* (the ``bench`` subcommand's parser)."""
    parser.add_argument(
        "--scenario",
        choices=(*SCENARIO_NAMES, "all", "custom"),
        default="custom",
        help="a preset (targets 1-6 of docs/performance.md), 'all' of them in turn, or "
        "'custom' (default): only the knobs below",
    )
    for name, (kind, text) in _KNOBS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=text)
    parser.add_argument(
        "--fanout",
        choices=("all", "spread"),
        default=None,
        help="all: every subscriber takes every fixture; spread: one fixture each, round-robin",
    )
    parser.add_argument(
        "--drop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="drop the upstream connections mid-run and time the first fresh frame",
    )
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run once without stuck subscribers, for comparison",
    )
    parser.add_argument(
        "--peer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure the websockets relay (default: on when websockets is installed, "
        "the 'bench' extra: pip install 'dde-gateway[bench]')",
    )
    parser.add_argument(
        "--gateway",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the gateway (default: on)",
    )
    parser.add_argument(
        "--recorder-dir",
        default=None,
        metavar="DIR",
        help="run the gateway with [recorder] dir = DIR (records every fixture; its cost)",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        default=None,
        help="run the gateway with a [cluster] section on a redis-server the bench starts "
        "($DDE_REDIS_SERVER or the one on PATH): every frame is also appended to Redis",
    )
    parser.add_argument(
        "--relay",
        action="store_true",
        default=None,
        help="(implies --cluster) a second instance that owns nothing and relays every frame "
        "from Redis, with the same subscribers on it (figures as the 'relay' phase)",
    )
    parser.add_argument(
        "--instances",
        default=None,
        metavar="N[,N...]",
        help="(implies --cluster) N instances sharing the stream port ([gateway] reuse_port; "
        "the kernel spreads the subscribers), CPU summed; a list runs once per value",
    )
    parser.add_argument(
        "--write-delay",
        default=None,
        metavar="MS[,MS...]",
        help="the gateway's [subscribers] write_delay in ms; a list (0,2,5,10) runs the "
        "scenario once per value, each beside the peer",
    )
    parser.add_argument(
        "--compression",
        default=None,
        metavar="off|deflate[,...]",
        help="the gateway's [subscribers] compression; with deflate the load generator offers "
        "permessage-deflate (the peer never compresses); a list runs once per value",
    )
    parser.add_argument(
        "--loadgen-nice",
        type=int,
        default=None,
        metavar="N",
        help="run the load generator at niceness N (0-19), for the gateway and the peer alike: "
        "its wake-ups then do not preempt the server mid-fan-out (default 0)",
    )
    parser.add_argument(
        "--slow-steps",
        type=Path,
        default=None,
        metavar="PATH",
        help="the gateway appends every task step over 10 ms to PATH (JSON lines: task, wall "
        "and CPU ms, where it suspended; a trio instrument)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results")
    parser.add_argument(
        "--floor",
        choices=FLOOR_NAMES,
        default=None,
        help="instead of a scenario, a micro-benchmark of a floor: 'fanout' (hub and data plane "
        "in this process against raw readers: CPU per delivery; --baseline adds a bare os.write "
        "loop) or 'ingest' (a trio relay doing no work: CPU per frame relayed)",
    )
    parser.add_argument(
        "--frames", type=int, default=None, help="--floor fanout: frames to publish (3000)"
    )
    parser.add_argument(
        "--work",
        default=None,
        metavar="STEPS",
        help="--floor ingest: per-frame work added to the relay, comma-separated: parse, frame",
    )
    parser.add_argument(
        "--loop",
        choices=("trio", "epoll"),
        default=None,
        help="--floor ingest: the relay's loop (default trio; epoll: a bare epoll loop)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress lines, only the final table"
    )
    # gateway.cli configures logging from these for every subcommand; the bench's own
    # processes log nothing, so it offers no such options.
    parser.set_defaults(log_format="text", log_level=None)


def scenarios_from_args(args: argparse.Namespace) -> list[Scenario]:
    """The scenarios *args* asks for, knobs applied over each preset."""
    names = list(SCENARIO_NAMES) if args.scenario == "all" else [args.scenario]
    overrides: dict[str, Any] = {
        name: getattr(args, name)
        for name in (*_KNOBS, "fanout", "drop", "baseline", "recorder_dir", "loadgen_nice")
        if getattr(args, name, None) is not None
    }
    delays = [0.0] if args.write_delay is None else [float(x) for x in args.write_delay.split(",")]
    counts = [1] if args.instances is None else [int(x) for x in args.instances.split(",")]
    if args.cluster or args.relay or args.instances is not None:
        overrides["cluster"] = True
    if args.relay:
        overrides["relay"] = True
    compressions = ["off"] if args.compression is None else args.compression.split(",")
    return [
        attrs.evolve(
            PRESETS.get(name, Scenario()),
            **overrides,
            write_delay=delay,
            compression=comp,
            instances=count,
        )
        for name in names
        for comp in compressions
        for delay in delays
        for count in counts
    ]


def _given(args: argparse.Namespace) -> list[str]:
    """The dest names of the options given on the command line (all default to None)."""
    names = (
        *_KNOBS,
        *("fanout", "drop", "baseline", "peer", "json", "frames", "work", "loop"),
        *("cluster", "relay", "instances"),
        *("write_delay", "compression", "slow_steps", "recorder_dir", "loadgen_nice"),
    )
    given = [name for name in names if getattr(args, name, None) is not None]
    if args.scenario != "custom":
        given.append("scenario")
    if not args.gateway:
        given.append("gateway")
    return given


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def run_floor_from_args(args: argparse.Namespace) -> int:
    """``--floor NAME``: check the options, run the micro-benchmark, print its lines."""
    from gateway.bench import _floor_fanout, _floor_ingest  # noqa: PLC0415 - heavy, rarely used

    wrong = [name for name in _given(args) if name not in _FLOOR_OPTIONS[args.floor]]
    if wrong:
        print(
            f"bench: --floor {args.floor} does not take {', '.join(map(_option, wrong))} "
            f"(it takes {', '.join(map(_option, _FLOOR_OPTIONS[args.floor]))})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    knobs = {
        ("size" if name == "frame_bytes" else name): getattr(args, name)
        for name in _FLOOR_OPTIONS[args.floor]
        if getattr(args, name) is not None
    }
    try:
        if "write_delay" in knobs:  # one value here, not a list of runs
            value = knobs["write_delay"]
            if not value.isdigit():
                raise ValueError(f"--floor fanout takes one whole --write-delay in ms, not {value}")
            knobs["write_delay"] = int(value)
        if args.floor == "fanout":
            fanout = _floor_fanout.FanoutFloor(**knobs)
        else:
            ingest = _floor_ingest.IngestFloor(**knobs)
    except (TypeError, ValueError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # The fanout floor runs the data plane in this process: its start-up lines are noise here.
    logging.getLogger("gateway").setLevel(logging.WARNING)
    try:
        if args.floor == "fanout":
            _floor_fanout.run_floor(fanout)
        else:
            _floor_ingest.run_floor(ingest)
    except (BenchError, OSError) as exc:
        print(f"bench: --floor {args.floor}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark *args* describe; print the table. 0 when every run completed (targets
    missed are reported, not an exit status), 1 when a run failed, 2 on bad arguments (and
    when ``--peer`` is asked for without websockets installed)."""
    if args.floor is not None:
        return run_floor_from_args(args)
    floor_only = [name for name in _given(args) if name in _FLOOR_ONLY]
    if floor_only:
        print(f"bench: {', '.join(map(_option, floor_only))} only with --floor", file=sys.stderr)
        return EXIT_USAGE
    try:
        scenarios = scenarios_from_args(args)
    except (TypeError, ValueError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.gateway and args.peer is False:
        print("bench: nothing to measure with both --no-gateway and --no-peer", file=sys.stderr)
        return EXIT_USAGE
    try:
        run_bench(
            scenarios,
            gateway=args.gateway,
            peer=args.peer,
            json_path=args.json,
            progress=not args.quiet,
            slow_steps=args.slow_steps,
        )
    except PeerUnavailable as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
