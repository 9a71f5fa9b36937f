"""The ``dde-gateway`` command (also ``python -m gateway``).

Subcommands: ``run`` (the service), ``simulate`` (the vendor simulator), ``check-config``
(every check ``run`` makes before it starts, every error with its place, exit 2), ``config``
(the effective configuration, or every key with its default, as TOML), ``demo`` (simulator +
gateway on an embedded config), ``watch`` (a subscriber that prints what arrives), ``bench``
(the fan-out benchmark) and ``soak`` (random vendor faults against a gateway, every frame
checked). Heavy imports happen inside each subcommand so ``check-config`` stays quick.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from gateway import __version__

EXIT_OK: Final = 0
EXIT_RUNTIME_ERROR: Final = 1
EXIT_CONFIG_ERROR: Final = 2


#: The levels ``--log-level`` accepts (every subcommand that logs).
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help line, unless the text already says it or there is no
    value to show (None, False, an empty list: the help text says what happens instead)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if "default" in help_text.lower() or action.default in (None, False, []):
            return help_text
        return super()._get_help_string(action)


def _add_logging_options(
    parser: argparse.ArgumentParser, *, level: str | None, level_help: str
) -> None:
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="one line per event: human text or JSON",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=level, help=level_help)


def build_parser() -> argparse.ArgumentParser:
    from gateway import simulator

    parser = argparse.ArgumentParser(
        prog="dde-gateway",
        description="Fan-out gateway for IMG Arena DDE live WebSocket feeds.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dde-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway service", formatter_class=HelpFormatter)
    run.add_argument("--config", type=Path, required=True, help="path to the TOML config")
    _add_logging_options(
        run, level=None, level_help="overrides [gateway] log_level (default: the config's)"
    )

    check = sub.add_parser(
        "check-config",
        help="make every check `run` makes before it starts: config, environment, files (exit 2 "
        "on errors)",
        formatter_class=HelpFormatter,
    )
    check.add_argument("path", type=Path, help="path to the TOML config")

    config = sub.add_parser(
        "config",
        help="print the effective configuration (file, DDE_GATEWAY_* variables, defaults) as TOML",
        formatter_class=HelpFormatter,
    )
    config.add_argument(
        "path",
        type=Path,
        nargs="?",
        default=None,
        help="path to the TOML config (default: none, the environment and defaults only)",
    )
    config.add_argument(
        "--defaults",
        action="store_true",
        help="print every key with its default and meaning instead, as a commented TOML file",
    )

    default_level = "info"
    sim = sub.add_parser(
        "simulate", help="run the DDE vendor simulator", formatter_class=HelpFormatter
    )
    simulator.add_arguments(sim)
    _add_logging_options(sim, level=default_level, level_help="the lowest level logged")

    demo = sub.add_parser(
        "demo",
        help="simulator + gateway on an embedded config; Ctrl-C stops",
        formatter_class=HelpFormatter,
    )
    demo.add_argument(
        "--stream-port",
        type=int,
        default=8765,
        help="subscriber WebSocket port; 0 picks a free one",
    )
    demo.add_argument(
        "--http-port",
        type=int,
        default=8780,
        help="HTTP API and dashboard port; 0 picks a free one",
    )
    demo.add_argument(
        "--simulator-port", type=int, default=8799, help="the simulator's port; 0 picks a free one"
    )
    _add_logging_options(demo, level=default_level, level_help="the lowest level logged")

    from gateway import client

    watch = sub.add_parser(
        "watch",
        help="subscribe to topics and print what arrives (on the Python client)",
        formatter_class=HelpFormatter,
    )
    client.add_arguments(watch)

    from gateway.bench import add_arguments as add_bench_arguments

    bench = sub.add_parser(
        "bench", help="fan-out benchmark against a websockets peer", formatter_class=HelpFormatter
    )
    add_bench_arguments(bench)

    soak = sub.add_parser(
        "soak",
        help="random vendor faults against a gateway, every frame checked (release check)",
        formatter_class=HelpFormatter,
    )
    soak.add_argument("--duration", type=float, default=600.0, help="seconds of faults")
    soak.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    soak.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the token file goes (default: a temporary directory, removed at the end)",
    )
    soak.add_argument(
        "--max-silence",
        type=float,
        default=None,
        help="fail when a fixture goes longer without a frame (seconds, default 10)",
    )
    _add_logging_options(soak, level="warning", level_help="the lowest level logged")
    return parser


def _check_config(path: Path) -> int:
    from gateway.service import preflight, problem_line

    result = preflight(path)
    for error in result.errors:
        print(problem_line(path, "error", error), file=sys.stderr)
    for warning in result.warnings:
        print(problem_line(path, "warning", warning), file=sys.stderr)
    config = result.config
    if config is None or result.errors:
        return EXIT_CONFIG_ERROR
    access = "open" if result.tokens is None else f"{len(result.tokens)} token(s)"
    print(
        f"{path}: ok - {len(config.feeds)} feed(s), {len(config.fixtures)} fixture(s), "
        f"stream {config.gateway.stream_listen}, http {config.gateway.http_listen}, "
        f"subscriber access {access}, TLS {'on' if result.tls is not None else 'off'}"
        + ("" if config.cluster is None else f", cluster via {config.cluster.redis_where}")
    )
    return EXIT_OK


def _print_config(path: Path | None, defaults: bool) -> int:
    from gateway.config import ConfigError, defaults_toml, effective_toml, load_config
    from gateway.service import problem_line

    if defaults:
        if path is not None:
            print("dde-gateway config: --defaults takes no CONFIG", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        sys.stdout.write(defaults_toml())
        return EXIT_OK
    try:
        config = load_config(path)
    except ConfigError as exc:
        for error in exc.errors:
            print(problem_line(path, "error", error), file=sys.stderr)
        return EXIT_CONFIG_ERROR
    sys.stdout.write(effective_toml(config, "no file" if path is None else str(path)))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "soak" and args.max_silence is not None and not args.max_silence > 0:
        parser.error(f"soak --max-silence: expected seconds > 0, got {args.max_silence!r}")
    if args.command == "check-config":
        return _check_config(args.path)
    if args.command == "config":
        return _print_config(args.path, args.defaults)
    if args.command == "watch":
        from gateway import client

        try:
            return client.run_from_args(args)
        except KeyboardInterrupt:
            return 130

    import trio

    from gateway.service import configure_logging

    configure_logging(fmt=args.log_format, level=args.log_level or "info")
    try:
        if args.command == "run":
            from gateway.service import instruments_from_env, run_from_config_path

            return trio.run(
                run_from_config_path,
                args.config,
                args.log_format,
                args.log_level,
                instruments=instruments_from_env(),
            )
        if args.command == "simulate":
            from gateway import simulator

            trio.run(simulator.run_from_args, args)
            return EXIT_OK
        if args.command == "demo":
            from gateway.service import run_demo

            return trio.run(run_demo, args.stream_port, args.http_port, args.simulator_port)
        if args.command == "bench":
            from gateway.bench import run_from_args as run_bench

            return run_bench(args)
        if args.command == "soak":
            from gateway import soak

            max_silence = soak.MAX_SILENCE if args.max_silence is None else args.max_silence
            return soak.main(args.duration, args.seed, args.workdir, max_silence)
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse guarantees one
