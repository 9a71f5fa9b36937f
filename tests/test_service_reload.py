"""Reload semantics of :meth:`Gateway.apply`, in process against the simulator.

The process-level SIGHUP path is in test_service_process.py; this covers the reconciliation
rules that are awkward to drive through a signal: API-added fixtures survive a reload, a feed
that is new in the file needs a restart, and unchanged fixtures keep their connection.
"""

from __future__ import annotations

import functools
import gc
from pathlib import Path

import attrs
import trio

from gateway.config import FixtureConfig, structure_config
from gateway.model import FixtureState
from gateway.service import Notifier, serve
from tests.kit import gateway_config, simulator_and_gateway, wait_until


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
