"""Reload semantics of :meth:`Gateway.apply`, in process against the simulator.

The process-level SIGHUP path is in test_service_process.py; this covers the reconciliation
rules that are awkward to drive through a signal: API-added fixtures survive a reload, a feed
that is new in the file needs a restart, and unchanged fixtures keep their connection.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import re
import signal
from pathlib import Path

import attrs
import pytest
import trio

from gateway.config import Config, FixtureConfig, load_config, structure_config
from gateway.model import FixtureState
from gateway.service import RELOAD_LOG_INTERVAL, Notifier, serve
from tests.kit import gateway_config, simulator_and_gateway, wait_until
from tests.test_service_process import write_config


async def test_apply_reconciles_configured_fixtures_only(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with simulator_and_gateway(tmp_path, [("tracking", "A"), ("tracking", "B")]) as (
            sim,
            gw,
        ):
            for fx in ("C", "D"):
                sim.add_fixture(fx)
            assert gw.follow("tracking", "D", 0)  # through the API: not the file's business
            a = gw.supervisor.get("tracking", "A")
            assert a is not None
            await wait_until(lambda: a.status.state is FixtureState.LIVE)

            data = attrs.asdict(gw.config, recurse=False)
            new = attrs.evolve(
                gw.config,
                fixtures=(
                    FixtureConfig("tracking", "A"),
                    FixtureConfig("tracking", "C"),
                    FixtureConfig("fresh", "E"),
                ),
                feeds={
                    **data["feeds"],
                    "fresh": structure_config(
                        {
                            "upstream": {"token_env": "X"},
                            "feeds": {"fresh": {"kind": "tracking", "url": "ws://h/fresh"}},
                        }
                    ).feeds["fresh"],
                },
            )
            changes = gw.apply(new)
            assert changes == {
                "added": ["tracking/C"],
                "removed": ["tracking/B"],
                "skipped": ["fresh/E"],
                "needs_restart": ["feeds"],
            }
            assert gw.is_followed("tracking", "A") and gw.is_followed("tracking", "C")
            assert gw.is_followed("tracking", "D")  # API-added: kept
            assert not gw.is_followed("tracking", "B")
            assert not gw.is_followed("fresh", "E")
            assert a.status.counters.connects == 1  # A was never touched

            # Applying the same file again changes nothing.
            assert gw.apply(new)["added"] == [] and gw.apply(new)["removed"] == []


async def test_serve_freezes_the_gc_only_when_asked(tmp_path: Path) -> None:
    # The service process (freeze_gc=True) moves what exists at start-up out of the cyclic GC's
    # full scans; in-process users (tests, the default) must not pin their garbage.
    token = tmp_path / "token"
    token.write_text("t")
    config = gateway_config(1, token, [])  # nothing followed: no upstream needed
    gc.unfreeze()
    try:
        for freeze in (False, True):
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    gw = await nursery.start(
                        functools.partial(serve, config, notifier=Notifier(None), freeze_gc=freeze)
                    )
                    assert gw.bound is not None and gw.bound.stream.port > 0
                    assert (gc.get_freeze_count() > 0) is freeze
                    nursery.cancel_scope.cancel()
    finally:
        gc.unfreeze()


async def test_a_sighup_storm_logs_a_few_lines_with_counts_and_applies_the_last_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """920 SIGHUPs in 10 s once gave 920 INFO lines. Now: every reload still happens (or is
    coalesced by the signal receiver into the next), the last file is applied, and the lines
    are throttled (a clock that does not move: one line), the next one carrying the count."""
    (tmp_path / "token").write_text("t" * 8)
    path = tmp_path / "gateway.toml"

    def write(n: int) -> None:
        # Atomically: a reload in progress must never read half a file.
        tmp = tmp_path / "next.toml"
        write_config(tmp, 1, [f"fx-{n}"])  # port 1: nothing listens, the runners back off
        tmp.replace(path)

    now = [0.0]
    applied: list[Config] = []
    write(0)
    caplog.set_level(logging.INFO, logger="gateway")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            gw = await nursery.start(
                functools.partial(
                    serve,
                    load_config(path),
                    reload=lambda: load_config(path),
                    on_reload=applied.append,
                    notifier=Notifier(None),
                    reload_log_clock=lambda: now[0],
                )
            )
            # One at a time: 30 reloads, each waited for.
            for n in range(1, 31):
                write(n)
                os.kill(os.getpid(), signal.SIGHUP)
                await wait_until(functools.partial(lambda k: len(applied) == k, n))
            # Then a storm: 200 signals without waiting; pending ones are coalesced.
            for n in range(31, 231):
                write(n)
                os.kill(os.getpid(), signal.SIGHUP)
                await trio.lowlevel.checkpoint()
            await wait_until(lambda: gw.is_followed("tracking", "fx-230"))
            assert len(applied) > 30  # the storm's reloads: at least one, at most 200

            def reloaded() -> list[str]:
                return [r.getMessage() for r in caplog.records if r.msg.startswith("reloaded")]

            assert reloaded() == ["reloaded: added ['tracking/fx-1'], removed ['tracking/fx-0']"]
            first = next(r for r in caplog.records if r.msg.startswith("reloaded"))
            assert vars(first)["fields"]["added"] == ["tracking/fx-1"]  # still structured
            # A moment later (for the throttle) one more: its line counts the suppressed ones.
            now[0] += RELOAD_LOG_INTERVAL
            write(999)
            os.kill(os.getpid(), signal.SIGHUP)
            await wait_until(lambda: gw.is_followed("tracking", "fx-999"))
            await wait_until(lambda: len(reloaded()) == 2)
            # (Its reload may be one the storm left pending: what it added can vary, the count
            # cannot be less than the 29 + 1 suppressed before it.)
            second = [r for r in caplog.records if r.msg.startswith("reloaded")][1]
            assert re.fullmatch(r"reloaded: added .*, removed .*", reloaded()[1]), reloaded()
            counted = vars(second)["fields"]["suppressed"]
            assert 30 <= counted <= len(applied) - 2
            ever = [f"fx-{n}" for n in (*range(231), 999)]
            assert [fx for fx in ever if gw.is_followed("tracking", fx)] == ["fx-999"]
            assert len(reloaded()) == 2  # any reload still pending is counted, not logged
            nursery.cancel_scope.cancel()
