"""The fields of real log lines: a gateway and the simulator in this process, logging through
``configure_logging`` (JSON) into memory.

A line about a fixture carries ``feed`` and ``fixture``, a line about a subscriber its id
(``subscriber``), a line of a cluster instance its name (``instance``) - bound to the task that
logs (``log_context``) or given at the call - and a fixture started on demand by a subscriber's
request does not name that subscriber on its own lines. Real sockets on 127.0.0.1 port 0, a
real redis-server for the cluster (tests/redis_kit.py), real time, generous guards.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from gateway.service import configure_logging
from tests.kit import simulator_and_gateway, wait_until
from tests.redis_kit import RedisServer
from tests.test_cluster_gateway import cluster_of
from tests.test_dataplane import RawClient
from tests.test_dataplane_slow import _subscribe_raw

A = "fx-logs-a"

pytestmark = pytest.mark.usefixtures("root_restored")


def records(out: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


def about(recs: list[dict[str, Any]], pattern: str) -> list[dict[str, Any]]:
    return [r for r in recs if re.search(pattern, r["msg"])]


async def test_fixture_and_subscriber_lines_carry_their_fields(tmp_path: Path) -> None:
    out = io.StringIO()
    configure_logging(fmt="json", level="debug", stream=out)
    with trio.fail_after(60):
        async with simulator_and_gateway(
            tmp_path, [("tracking", A)], subscribers={"queue_bytes": 1024}
        ) as (_, gw):
            assert gw.bound is not None
            await wait_until(lambda: any(about(records(out), rf"tracking/{A}: .* -> live")))
            # A subscriber that never reads: the fan-out disconnects it as too slow.
            stuck = await RawClient.connect(gw.bound.stream, rcvbuf=4096)
            await _subscribe_raw(stuck, A)
            await wait_until(lambda: gw.registry.slow_disconnects == 1)
            await wait_until(lambda: any(about(records(out), r"subscriber \d+ disconnected")))
            stuck.sock.close()
    recs = records(out)

    # Every line naming the fixture (state changes, following) carries its fields.
    named = about(recs, rf"tracking/{A}")
    assert len(named) >= 3, named  # following, connecting -> ..., -> live
    for rec in named:
        assert (rec.get("feed"), rec.get("fixture")) == ("tracking", A), rec
    # Lines of the fixture's own task that do not name it (a library's, say) carry them too.
    state = about(recs, rf"tracking/{A}: \w+ -> live")[0]
    assert state["level"] == "INFO" and "subscriber" not in state

    (connected,) = about(recs, r"^subscriber \d+ connected from")
    sid = connected["msg"].split()[1]
    assert connected["subscriber"] == sid and connected["peer"]
    (slow,) = about(recs, r"too slow")
    # Logged by the fan-out in the fixture's task: the subscriber given at the call, the
    # fixture bound to the task.
    assert (slow["subscriber"], slow["peer"]) == (sid, connected["peer"])
    assert (slow["feed"], slow["fixture"]) == ("tracking", A)
    (gone,) = about(recs, rf"^subscriber {sid} disconnected")
    assert gone["subscriber"] == sid


async def test_a_fixture_started_on_demand_does_not_name_the_subscriber(tmp_path: Path) -> None:
    """trio copies the starting task's context into a new task: the fixture task that a
    subscriber's request starts must drop that subscriber's fields (own_log_context)."""
    out = io.StringIO()
    configure_logging(fmt="json", level="debug", stream=out)
    with trio.fail_after(60):
        async with simulator_and_gateway(tmp_path, [], feeds={"tracking": {"on_demand": True}}) as (
            sim,
            gw,
        ):
            assert gw.bound is not None
            sim.add_fixture(A)
            client = await RawClient.connect(gw.bound.stream)
            await _subscribe_raw(client, A)
            await wait_until(lambda: any(about(records(out), rf"tracking/{A}: .* -> live")))
            client.sock.close()
    recs = records(out)
    (demand,) = about(recs, rf"following tracking/{A} on demand")
    assert demand["subscriber"]  # logged in the subscriber's task: it asked
    fixture_lines = about(recs, rf"^upstream tracking/{A}: \w+ -> ")
    assert fixture_lines
    for rec in fixture_lines:
        assert (rec["feed"], rec["fixture"]) == ("tracking", A)
        assert "subscriber" not in rec and "peer" not in rec, rec


async def test_cluster_lines_carry_the_instance_and_the_fixture(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    out = io.StringIO()
    configure_logging(fmt="json", level="info", stream=out)
    with trio.fail_after(45):
        async with cluster_of(tmp_path, redis_server, [("tracking", A)]) as c:
            await c.start("gw-a")
            await wait_until(lambda: any(about(records(out), rf"tracking/{A}: .* -> live")))
            await wait_until(lambda: any(about(records(out), rf"owner of tracking/{A} now")))
    recs = records(out)
    (owner,) = about(recs, rf"^cluster: owner of tracking/{A} now")
    assert (owner["instance"], owner["feed"], owner["fixture"]) == ("gw-a", "tracking", A)
    # The fixture's own task keeps the instance (own_log_context drops subject fields only).
    live = about(recs, rf"^upstream tracking/{A}: \w+ -> live")[0]
    assert (live["instance"], live["feed"], live["fixture"]) == ("gw-a", "tracking", A)
    joined = about(recs, r"^cluster: instance gw-a joined")
    assert joined and joined[0]["instance"] == "gw-a"
