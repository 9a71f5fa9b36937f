"""The upstream supervisor against the simulator over real sockets on 127.0.0.1 (port 0).

Covers: resume across 20 drops (every ix exactly once, in order, the original text), the stall
watchdog against the simulator's stall fault, auth rejection then token rotation, unknown
fixtures (tracking WARN and fastpath 404), malformed frames counted and skipped, a crashing sink
isolated to its fixture, fastpath resume with startPosition, fastpath seq gaps and out-of-order
frames counted (against a bare trio-websocket server), clean shutdown, and that the token never
shows up in logs, statuses, errors or reprs.

Rules: real clock (never MockClock with sockets); every test body runs under a generous
``trio.fail_after``; no assertion on wall-clock speed. Backoff, retry waits and simulator
heartbeats are shortened so that each test takes a few seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
import trio_websocket

from gateway.config import FeedConfig, FixtureConfig, structure_config
from gateway.model import FixtureState
from gateway.simulator import Action, Outcome, Simulator
from gateway.upstream import Supervisor
from tests.conftest import TEST_TOKEN
from tests.kit import RecordingSink as Sink

GUARD = 60.0  # seconds; generous for a loaded 2-core machine


@attrs.define
class Rig:
    sim: Simulator
    sup: Supervisor
    sinks: dict[tuple[str, str], Sink]
    token_file: Path

    def status(self, feed: str, fixture: str) -> Any:
        handle = self.sup.get(feed, fixture)
        assert handle is not None
        return handle.status


async def until(predicate: Callable[[], bool], step: float = 0.02) -> None:
    """Poll; the test's fail_after bounds it."""
    while True:
        if predicate():
            return
        await trio.sleep(step)


@asynccontextmanager
async def rig(
    tmp_path: Path,
    sim: Simulator,
    fixtures: list[dict[str, Any]],
    upstream: dict[str, Any] | None = None,
    sinks: dict[tuple[str, str], Sink] | None = None,
) -> AsyncIterator[Rig]:
    token_file = tmp_path / "token"
    token_file.write_text(TEST_TOKEN + "\n")
    sinks = {} if sinks is None else sinks
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve, "127.0.0.1", 0)
        up: dict[str, Any] = {
            "token_file": str(token_file),
            "connect_rate": 1000.0,
            "backoff_initial": 0.005,
            "backoff_max": 0.02,
            "stall_timeout": 5.0,
            "handshake_timeout": 10.0,
            "unauthorized_retry": 0.2,
            "not_found_retry": 0.2,
        }
        up.update(upstream or {})
        config = structure_config(
            {
                "upstream": up,
                "feeds": {
                    "trk": {"kind": "tracking", "url": f"ws://127.0.0.1:{port}/ws/soccer/tracking"},
                    "fp": {
                        "kind": "fastpath",
                        "url": f"ws://127.0.0.1:{port}/soccer/fixtures/{{fixture}}/actions",
                    },
                },
                "fixtures": fixtures,
            }
        )

        def sink_for(feed: FeedConfig, fixture: FixtureConfig) -> Sink:
            return sinks.setdefault(fixture.key, Sink())

        sup = Supervisor(config, sink_for)
        sup_scope = trio.CancelScope()

        async def run_sup(task_status: trio.TaskStatus[None]) -> None:
            with sup_scope:
                await sup.run(task_status=task_status)

        await nursery.start(run_sup)
        yield Rig(sim, sup, sinks, token_file)
        sup_scope.cancel()
        nursery.cancel_scope.cancel()


def ixs(sink: Sink) -> list[int]:
    return [orjson.loads(f)["ix"] for f in sink.frames]


def assert_no_leak(text: str) -> None:
    assert TEST_TOKEN not in text


def dropped(sim: Simulator) -> int:
    return sum(a.outcome is Outcome.DROPPED for a in sim.attempts)


async def test_tracking_resume_across_20_drops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sim = Simulator(tokens={TEST_TOKEN}, rate_hz=200.0, heartbeat_interval=0.5)
    fixture = sim.add_fixture("m1")
    with trio.fail_after(GUARD):
        async with rig(tmp_path, sim, [{"feed": "trk", "id": "m1", "backfill": 100}]) as r:
            sink = r.sinks["trk", "m1"]
            for _ in range(20):
                # Drop mid-stream once the gateway made progress on this connection (a fixed
                # drop_after_frames could livelock a slow machine inside the backfill overlap).
                seen, drops = len(sink.frames), dropped(sim)
                await until(lambda: len(sink.frames) >= seen + 30)  # noqa: B023
                sim.faults("m1").drop_after_frames = 0
                await until(lambda: dropped(sim) > drops)  # noqa: B023
                sim.faults("m1").drop_after_frames = None
            seen = len(sink.frames)
            await until(lambda: len(sink.frames) >= seen + 100)
            status = r.status("trk", "m1")
            got = ixs(sink)
            assert got == list(range(got[0], got[0] + len(got)))
            # The original text, byte for byte (never a re-serialisation).
            assert sink.frames == [fixture.frame_text(ix) for ix in got]
            assert status.counters.gaps == 0
            assert status.counters.reconnects >= 20
            assert status.counters.duplicates_dropped > 0
            assert status.state == FixtureState.LIVE
    assert_no_leak(caplog.text)


async def test_stall_fault_makes_the_watchdog_reconnect(tmp_path: Path) -> None:
    """The simulator's stall (nothing sent, heartbeats included) trips the stall watchdog:
    the gateway closes the silent connection, reconnects and resumes without a gap."""
    sim = Simulator(tokens={TEST_TOKEN}, rate_hz=200.0, heartbeat_interval=0.1)
    sim.add_fixture("m1")
    with trio.fail_after(GUARD):
        async with rig(tmp_path, sim, [{"feed": "trk", "id": "m1"}], {"stall_timeout": 1.0}) as r:
            sink, status = r.sinks["trk", "m1"], r.status("trk", "m1")
            await until(lambda: status.state == FixtureState.LIVE and len(sink.frames) > 20)
            assert status.counters.connects == 1
            stalled_at = time.time()
            sim.faults("m1").stall = True
            await until(lambda: len(sim.attempts) >= 2)  # the watchdog gave up on the first
            sim.faults("m1").stall = False
            seen = len(sink.frames)
            await until(lambda: len(sink.frames) >= seen + 50)
            await until(lambda: sim.active_connections == 1)  # the stalled one was closed
            assert status.last_error == "stalled: no message for 1.0 s"
            assert status.counters.reconnects >= 1
            assert status.state == FixtureState.LIVE
            assert status.state_since >= stalled_at
            assert status.last_message_at is not None and status.last_message_at >= stalled_at
            got = ixs(sink)
            assert got == list(range(got[0], got[0] + len(got)))
            assert status.counters.gaps == 0


async def test_auth_rejected_then_token_rotation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sim = Simulator(tokens={"someone-else"}, rate_hz=200.0, heartbeat_interval=0.5)
    sim.add_fixture("m1")
    sim.add_fixture("f1", kind="fastpath")
    fixtures = [{"feed": "trk", "id": "m1"}, {"feed": "fp", "id": "f1"}]
    with trio.fail_after(GUARD):
        async with rig(tmp_path, sim, fixtures) as r:
            await until(
                lambda: all(
                    r.status(f, x).state == FixtureState.UNAUTHORIZED
                    for f, x in (("trk", "m1"), ("fp", "f1"))
                )
            )
            for key in (("trk", "m1"), ("fp", "f1")):
                st = r.status(*key)
                assert st.last_error is not None
                assert "Supplied token could not be authenticated" in st.last_error
                assert_no_leak(repr(st))
                assert_no_leak(repr(r.sup.get(*key)))
                assert_no_leak(repr(r.sinks[key].states))
                assert_no_leak(str(st.snapshot()))
            # Rotation: the vendor accepts a new token, the file gets it; no restart needed.
            sim.set_tokens({"rotated-token"})
            r.token_file.write_text("rotated-token\n")
            await until(
                lambda: all(
                    r.status(f, x).state == FixtureState.LIVE
                    for f, x in (("trk", "m1"), ("fp", "f1"))
                )
            )
            await until(lambda: len(r.sinks["trk", "m1"].frames) > 10)
    assert_no_leak(caplog.text)
    assert "unauthorized" in caplog.text


@pytest.mark.slow
async def test_every_fixture_is_fresh_soon_after_the_vendor_accepts_the_token_again(
    tmp_path: Path,
) -> None:
    """Finding 10: after a refused token each fixture's retry doubled up to 60 s, so a token
    refused for 16 s left fixtures without data for another ~15 s once the vendor took it
    again. Now one fixture probes every ``unauthorized_probe_interval`` and its accepted probe
    sends all the others at once (paced by the connect limiter at the vendor's 5/s)."""
    probe = 1.0
    sim = Simulator(tokens={TEST_TOKEN}, rate_hz=50.0, heartbeat_interval=0.5, action_interval=0.05)
    keys = [("trk", f"m{i}") for i in range(6)] + [("fp", f"f{i}") for i in range(2)]
    for feed, fixture in keys:
        sim.add_fixture(fixture, kind="tracking" if feed == "trk" else "fastpath")
    sim.connection_faults.reject_auth = True  # the vendor refuses the token, for a while
    upstream = {
        "connect_rate": 5.0,
        "unauthorized_retry": 60.0,
        "unauthorized_probe_interval": probe,
    }
    fixtures = [{"feed": f, "id": x} for f, x in keys]
    with trio.fail_after(GUARD):
        async with rig(tmp_path, sim, fixtures, upstream) as r:
            await until(lambda: all(r.status(*k).state == FixtureState.UNAUTHORIZED for k in keys))
            await trio.sleep(16.0)  # the outage: many refusals (old code: waits of 16 s now)
            refused = sum(a.outcome is Outcome.UNAUTHORIZED for a in sim.attempts)
            assert refused >= 10
            assert sum(r.status(*k).counters.refused for k in keys) == refused
            sim.connection_faults.reject_auth = False
            accepted = trio.current_time()
            fresh: dict[tuple[str, str], float] = {}
            while len(fresh) < len(keys):
                for k in keys:
                    if k not in fresh and r.sinks[k].frames:
                        fresh[k] = trio.current_time() - accepted
                await trio.sleep(0.02)
            # Healthy: <= 1 s to the next probe, its first frame, 8 connects at 5/s (1.6 s).
            # Broken: the next doubled retry, ~15 s after the vendor accepted.
            worst = max(fresh.values())
            assert worst <= probe + 5.0, fresh
            assert all(r.status(*k).state == FixtureState.LIVE for k in keys)


async def test_unknown_fixtures_are_not_found(tmp_path: Path) -> None:
    sim = Simulator(tokens={TEST_TOKEN}, heartbeat_interval=0.5)
    fixtures = [{"feed": "trk", "id": "nope"}, {"feed": "fp", "id": "nope"}]
    with trio.fail_after(GUARD):
        async with rig(tmp_path, sim, fixtures) as r:
            await until(lambda: len(sim.attempts) >= 4)  # retried after not_found_retry
            trk, fp = r.status("trk", "nope"), r.status("fp", "nope")
            await until(
                lambda: (
                    FixtureState.NOT_FOUND in (trk.state, fp.state)
                    and trk.state == fp.state == FixtureState.NOT_FOUND
                )
            )
            assert trk.last_error.startswith("fixture not found: Could not find fixture topic")
            assert fp.last_error == "handshake refused: HTTP 404"
            # The fixture appears upstream: both go live on their next retry.
            sim.add_fixture("nope-later")  # unrelated fixture: still not found
            r.sup.add(FixtureConfig(feed="fp", id="nope-later"))
            await until(lambda: r.status("fp", "nope-later").state == FixtureState.NOT_FOUND)


async def test_malformed_frames_counted_and_skipped(tmp_path: Path) -> None:
    sim = Simulator(tokens={TEST_TOKEN}, rate_hz=200.0, heartbeat_interval=0.5)
    sim.add_fixture("m1")
    with trio.fail_after(GUARD):
        async with rig(tmp_path, sim, [{"feed": "trk", "id": "m1"}]) as r:
            await until(lambda: r.status("trk", "m1").state == FixtureState.LIVE)
            sim.faults("m1").malformed_frames = 7
            await until(lambda: sim.faults("m1").malformed_frames == 0)
            n = len(r.sinks["trk", "m1"].frames)
            await until(lambda: len(r.sinks["trk", "m1"].frames) > n + 20)
            st = r.status("trk", "m1")
            assert st.counters.malformed == 7
            assert st.counters.connects == 1  # skipped, not reconnected
            got = ixs(r.sinks["trk", "m1"])
            assert got == list(range(got[0], got[0] + len(got)))


async def test_crashing_sink_does_not_disturb_other_fixture(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sim = Simulator(tokens={TEST_TOKEN}, rate_hz=200.0, heartbeat_interval=0.5)
    sim.add_fixture("bad")
    sim.add_fixture("good")
    sinks = {("trk", "bad"): Sink(fail_publish=3), ("trk", "good"): Sink()}
    fixtures = [{"feed": "trk", "id": "bad"}, {"feed": "trk", "id": "good"}]
    with trio.fail_after(GUARD):
        async with rig(tmp_path, sim, fixtures, sinks=sinks) as r:
            await until(lambda: r.status("trk", "bad").counters.crashes == 3)
            await until(lambda: len(sinks["trk", "bad"].frames) > 50)
            good = r.status("trk", "good")
            assert good.counters.crashes == 0
            assert good.counters.connects == 1
            assert good.state == FixtureState.LIVE
            got = ixs(sinks["trk", "good"])
            assert got == list(range(got[0], got[0] + len(got)))
            bad = ixs(sinks["trk", "bad"])
            assert bad == list(range(bad[0], bad[0] + len(bad)))
    assert caplog.text.count("task crashed") == 3


async def test_fastpath_resume_with_start_position(tmp_path: Path) -> None:
    sim = Simulator(tokens={TEST_TOKEN}, heartbeat_interval=0.5, action_interval=0.004)
    fixture = sim.add_fixture("f1", kind="fastpath")
    sim.faults("f1").drop_after_frames = 40
    with trio.fail_after(GUARD):
        async with rig(tmp_path, sim, [{"feed": "fp", "id": "f1"}]) as r:
            await until(lambda: dropped(sim) >= 15)
            sim.faults("f1").drop_after_frames = None
            n = len(r.sinks["fp", "f1"].frames)
            await until(lambda: len(r.sinks["fp", "f1"].frames) > n + 20)
            st = r.status("fp", "f1")
            paths = [a.path for a in sim.attempts]
    delivered = [orjson.loads(f) for f in r.sinks["fp", "f1"].frames]
    action_ids = [d["fixtureAction"]["actionId"] for d in delivered if "fixtureAction" in d]
    expected = [
        orjson.loads(e.text(1))["fixtureAction"]["actionId"]
        for e in fixture.log
        if isinstance(e, Action)
    ]
    assert action_ids == expected[: len(action_ids)]  # from the start, no gap, no duplicate
    assert st.counters.gaps == 0
    assert st.counters.out_of_order == 0
    assert st.counters.reconnects >= 15
    assert paths[0].endswith("?startPosition=0")
    assert any(not p.endswith("?startPosition=0") for p in paths[1:])


async def test_shutdown_closes_upstreams(tmp_path: Path) -> None:
    sim = Simulator(tokens={TEST_TOKEN}, rate_hz=100.0, heartbeat_interval=0.5)
    for i in range(3):
        sim.add_fixture(f"m{i}")
    fixtures = [{"feed": "trk", "id": f"m{i}"} for i in range(3)]
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as outer:
            token_file = tmp_path / "token"
            token_file.write_text(TEST_TOKEN)
            port = await outer.start(sim.serve, "127.0.0.1", 0)
            config = structure_config(
                {
                    "upstream": {"token_file": str(token_file), "connect_rate": 100.0},
                    "feeds": {"trk": {"kind": "tracking", "url": f"ws://127.0.0.1:{port}/t"}},
                    "fixtures": fixtures,
                }
            )
            sinks: dict[tuple[str, str], Sink] = {}
            sup = Supervisor(config, lambda f, fx: sinks.setdefault(fx.key, Sink()))
            async with trio.open_nursery() as inner:
                await inner.start(sup.run)
                await until(
                    lambda: (
                        sim.active_connections == 3
                        and len(sinks) == 3
                        and all(len(s.frames) > 5 for s in sinks.values())
                    )
                )
                inner.cancel_scope.cancel()
            # run() has returned: every upstream connection is closed (the server sees it soon).
            await until(lambda: sim.active_connections == 0)
            assert all(
                s.states[-1] == (FixtureState.STOPPED, "supervisor stopped") for s in sinks.values()
            )
            assert all(h.status.state == FixtureState.STOPPED for h in sup.handles())
            outer.cancel_scope.cancel()


async def test_fastpath_seq_gaps_and_out_of_order_are_counted_and_forwarded(
    tmp_path: Path,
) -> None:
    """A vendor that skips and reorders fixtureSeqNum (after a scorer outage, say): every frame
    is forwarded in arrival order, the gap and the late frame are counted, and the reconnect
    resumes after the highest position reached. The simulator never misorders, so a bare
    trio-websocket server plays the vendor here."""
    seqs = [1, 2, 4, 3, 5]
    texts = [orjson.dumps({"fixtureAction": {"fixtureSeqNum": s}}).decode() for s in seqs]
    paths: list[str] = []
    sink = Sink()
    delivered = trio.Event()

    async def vendor(request: trio_websocket.WebSocketRequest) -> None:
        paths.append(request.path)
        ws = await request.accept()
        await ws.get_message()  # the auth message
        if len(paths) > 1:
            await trio.sleep_forever()
        for text in texts:
            await ws.send_message(text)
        await delivered.wait()
        await ws.aclose(1011)

    token_file = tmp_path / "token"
    token_file.write_text(TEST_TOKEN)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                trio_websocket.serve_websocket, vendor, "127.0.0.1", 0, None
            )
            config = structure_config(
                {
                    "upstream": {"token_file": str(token_file), "backoff_initial": 0.01},
                    "feeds": {
                        "fp": {
                            "kind": "fastpath",
                            "url": f"ws://127.0.0.1:{server.port}/x/fixtures/{{fixture}}/actions",
                        }
                    },
                    "fixtures": [{"feed": "fp", "id": "f1"}],
                }
            )
            sup = Supervisor(config, lambda feed, fixture: sink)
            await nursery.start(sup.run)
            await until(lambda: len(sink.frames) == len(texts))
            delivered.set()
            await until(lambda: len(paths) == 2)
            handle = sup.get("fp", "f1")
            assert handle is not None
            counters = handle.status.counters
            nursery.cancel_scope.cancel()
    assert sink.frames == texts
    assert (counters.gaps, counters.out_of_order, counters.frames) == (1, 1, 5)
    assert paths[0].endswith("?startPosition=0")
    assert paths[1].endswith("?startPosition=5")
