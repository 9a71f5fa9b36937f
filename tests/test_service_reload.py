"""Reload semantics of :meth:`Gateway.apply`, in process against the simulator.

The process-level SIGHUP path is in test_service_process.py; this covers the reconciliation
rules that are awkward to drive through a signal: API-added fixtures survive a reload, a feed
that is new in the file needs a restart, and unchanged fixtures keep their connection.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import trio

from gateway.config import FixtureConfig, structure_config
from gateway.upstream import FixtureState
from tests.kit import simulator_and_gateway, wait_until


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
