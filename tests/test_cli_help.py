"""``--help`` of every subcommand: each option has help text and shows its default; option
values are checked by argparse (exit 2, as docs/simulator.md and the CLI docs say)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from gateway.cli import LOG_LEVELS, build_parser, main


def _parsers(
    parser: argparse.ArgumentParser, name: str = "dde-gateway"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def _options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if not isinstance(
            action, argparse._SubParsersAction | argparse._HelpAction | argparse._VersionAction
        ):
            yield action


PARSERS = dict(_parsers(build_parser()))


def test_every_subcommand_is_walked() -> None:
    assert set(PARSERS) >= {
        f"dde-gateway {c}"
        for c in ("run", "check-config", "simulate", "demo", "watch", "bench", "soak")
    }


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_help_line_has_text_and_shows_its_default(name: str) -> None:
    parser = PARSERS[name]
    formatter = parser._get_formatter()
    assert isinstance(formatter, argparse.ArgumentDefaultsHelpFormatter), name
    for action in _options(parser):
        what = f"{name} {'/'.join(action.option_strings) or action.dest}"
        assert action.help and action.help.strip(), f"{what}: no help text"
        shown = formatter._expand_help(action) if action.help else ""
        if action.option_strings and action.default not in (None, False, []):
            assert "default" in shown.lower(), f"{what}: default {action.default!r} not shown"
    help_text = parser.format_help()
    assert "%(" not in help_text, name


@pytest.mark.parametrize("command", ["simulate", "demo", "soak"])
def test_log_level_accepts_only_valid_levels(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--log-level", "loud"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'loud'" in capsys.readouterr().err
    for level in LOG_LEVELS:
        assert (
            PARSERS[f"dde-gateway {command}"].parse_args(["--log-level", level]).log_level == level
        )


def test_a_bad_simulator_option_exits_2_as_documented(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--no-such-option"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
