"""``dde-gateway bench`` arguments and entry point (called by :mod:`gateway.cli`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Final

import attrs

from gateway.bench._run import BenchError, run_bench
from gateway.bench._scenario import PRESETS, SCENARIO_NAMES, Scenario

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

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
        help="also measure the websockets relay (default: on when it is importable)",
    )
    parser.add_argument(
        "--gateway",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the gateway (default: on)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results")
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
        for name in (*_KNOBS, "fanout", "drop", "baseline")
        if getattr(args, name, None) is not None
    }
    return [attrs.evolve(PRESETS.get(name, Scenario()), **overrides) for name in names]


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark *args* describe; print the table. 0 when every run completed (targets
    missed are reported, not an exit status), 1 when a run failed, 2 on bad arguments."""
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
        )
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
