"""The vendor's Replay Fixture Request on the drop-in endpoint, against a real gateway and the
simulator over real sockets (issue 23).

- Served locally from the recorder's files (history far smaller than what was recorded):
  40/s over 4 s (160 +/- 10 %, never more than 50 in any second), from the fixture's first
  frame (ix 0), contiguous, verbatim; the simulator never sees a replay request.
- Looped: after the newest frame held, the first frame again; not looped: the live frames
  follow with no gap and no duplicate (what the simulator does after its replay).
- A bad replay object gets the vendor-style ERROR naming the field, nothing streams and the
  connection stays open; ``enabled: false`` is an ordinary request.
- Not held from the start (no recorder, the history turned over): passed through on a
  dedicated vendor connection (the simulator sees the replay request and a second session of
  the fixture), capped by ``max_replays`` (a clear ERROR past it), closed when the client goes.

Real sockets on 127.0.0.1 port 0, real time, real files; ``trio.fail_after`` everywhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from gateway.config import FixtureConfig
from gateway.hub import Topic
from gateway.service import Gateway
from gateway.simulator import Simulator
from tests.kit import (
    TRACKING_PATH,
    http_get,
    http_url,
    simulator_and_gateway,
    stream_url,
    wait_until,
)

FX = "5501b26a-1c44-4c3b-9ff5-9322084d41f9"
ACCEPTED = {"message": "Authorisation accepted", "level": "INFO"}


@asynccontextmanager
async def recorded_gateway(
    tmp_path: Path, *, frames: int = 300, replay: dict[str, Any] | None = None
) -> AsyncIterator[tuple[Simulator, Gateway, Topic]]:
    """Simulator (100 Hz) + gateway recording FX from ix 0 (``backfill: -1``), its memory
    history 50 frames; yields once *frames* are recorded (the start is on disk only)."""
    async with simulator_and_gateway(
        tmp_path,
        [],
        feeds={"tracking": {"history": 50}},
        recorder={"dir": str(tmp_path / "rec")},
        replay=replay or {},
    ) as (sim, gw):
        sim.add_fixture(FX)
        assert gw.fixtures.follow(FixtureConfig(feed="tracking", id=FX, backfill=-1))
        recorder = gw.recorder
        assert recorder is not None
        await wait_until(lambda: (t := gw.hub.get("tracking", FX)) is not None and t.seq >= frames)
        topic = gw.hub.get("tracking", FX)
        log = recorder.get("tracking", FX)
        assert topic is not None and log is not None
        await wait_until(lambda: log.written_seq >= frames)
        assert topic.first_held > 1  # the fixture's start is on disk only
        yield sim, gw, topic


@asynccontextmanager
async def dropin(gw: Gateway) -> AsyncIterator[WebSocketConnection]:
    """An authenticated drop-in tracking connection (open access: any token)."""
    async with open_websocket_url(stream_url(gw, TRACKING_PATH), max_message_size=1 << 20) as ws:
        await ws.send_message(orjson.dumps({"authToken": "anything"}).decode())
        assert orjson.loads(await ws.get_message()) == ACCEPTED
        yield ws


def _request(pps: Any = 40, looped: Any = False, **extra: Any) -> str:
    replay = {"enabled": True, "packetsPerSecond": pps, "looped": looped}
    return orjson.dumps({"fixtureId": FX, "backfill": -1, "replay": replay, **extra}).decode()


async def next_frame(ws: WebSocketConnection) -> tuple[int, str]:
    """The next data frame's ix and text (the vendor's heartbeats are skipped)."""
    while True:
        msg = await ws.get_message()
        assert isinstance(msg, str)
        doc = orjson.loads(msg)
        if str(doc.get("message", "")).startswith("Heartbeat sent at "):
            continue
        assert "ix" in doc, doc
        return doc["ix"], msg


def _most_in_a_second(times: list[float]) -> int:
    return max(sum(1 for t in times if s <= t < s + 1.0) for s in times)


async def test_a_replay_is_served_from_the_recording_evenly_from_the_first_frame(
    tmp_path: Path,
) -> None:
    with trio.fail_after(90):
        async with recorded_gateway(tmp_path) as (sim, gw, _):
            async with dropin(gw) as ws:
                await ws.send_message(_request(pps=40))
                got = [await next_frame(ws)]
                t0 = trio.current_time()
                times = [0.0]
                while True:
                    frame = await next_frame(ws)
                    t = trio.current_time() - t0
                    if t >= 4.0:
                        break
                    got.append(frame)
                    times.append(t)
            assert 144 <= len(got) <= 176, len(got)  # 160 +/- 10 %
            assert _most_in_a_second(times) <= 50
            assert [ix for ix, _ in got] == list(range(len(got)))  # ix 0 on, contiguous
            fixture = sim.fixtures[FX]
            assert all(text == fixture.frame_text(ix) for ix, text in got)  # verbatim
            assert sim.replay_requests == []  # never passed through when held
            assert sim.sessions(FX) == 1
            counters = gw.replays.counters
            assert counters.total["recording"] == 1 and counters.frames >= len(got)
            await wait_until(lambda: counters.active["recording"] == 0)  # gone with the client
            status, body = await http_get(http_url(gw, "/metrics"))
            assert status == 200
            assert b'dde_replays_total{source="recording"} 1.0' in body
            assert b'dde_replays_active{source="recording"} 0.0' in body
            assert b'dde_replays_refused_total{reason="max_replays"} 0.0' in body
            assert b"dde_replay_frames_total " in body


async def test_looped_starts_again_and_not_looped_goes_live_without_a_gap(
    tmp_path: Path,
) -> None:
    with trio.fail_after(90):
        async with recorded_gateway(tmp_path) as (sim, gw, topic):
            async with dropin(gw) as ws:
                await ws.send_message(_request(pps=1000, looped=True))
                ixs = [(await next_frame(ws))[0]]
                while True:  # catches up with the live fixture (100 Hz) at 1000/s, then loops
                    ixs.append((await next_frame(ws))[0])
                    if ixs[-1] == 0:
                        break
                held = len(ixs) - 1
                assert held >= 300 and ixs[:-1] == list(range(held))
                for i in range(1, 100):  # the second pass, from the first frame again
                    assert (await next_frame(ws))[0] == i

            async with dropin(gw) as ws:
                await ws.send_message(_request(pps=1000, looped=False))
                ixs = [(await next_frame(ws))[0] for _ in range(900)]
                # 900 frames at 1000/s take about a second more than the ~(300 + ...) held:
                # the end of the replay is crossed, then live frames at 100 Hz, no gap.
                assert ixs == list(range(900))
                assert topic.subscriber_count == 1  # now an ordinary live subscriber
            assert sim.replay_requests == []


async def test_bad_replays_are_refused_naming_the_field_and_enabled_false_is_ordinary(
    tmp_path: Path,
) -> None:
    rate = "Replay packetsPerSecond must be an integer from 1 to 1000"
    with trio.fail_after(60):
        async with recorded_gateway(tmp_path, frames=100) as (sim, gw, topic):
            async with dropin(gw) as ws:
                bad: list[tuple[str, str]] = [
                    (_request(pps=0), rate),
                    (_request(pps=1001), rate),
                    (_request(pps="40"), rate),
                    (_request(pps=True), rate),
                    (_request(pps=2.5), rate),
                    (_request(looped="yes"), "Replay looped must be a boolean"),
                    (
                        orjson.dumps({"fixtureId": FX, "replay": {"enabled": 1}}).decode(),
                        "Replay enabled must be a boolean",
                    ),
                    (
                        orjson.dumps({"fixtureId": FX, "replay": [True, 40]}).decode(),
                        "Replay must be an object with only enabled, packetsPerSecond and looped",
                    ),
                    (
                        _request().replace('"looped"', '"loop"'),
                        "Replay must be an object with only enabled, packetsPerSecond and looped",
                    ),
                ]
                for request, message in bad:
                    await ws.send_message(request)
                    # The very next message is the answer: nothing streamed in between.
                    reply = orjson.loads(await ws.get_message())
                    assert reply == {"message": message, "level": "ERROR"}, request
                # Still open, and enabled false is an ordinary request: live frames.
                head = topic.seq
                ordinary = {
                    "fixtureId": FX,
                    "backfill": 0,
                    "replay": {"enabled": False, "packetsPerSecond": 5},
                }
                await ws.send_message(orjson.dumps(ordinary).decode())
                first, _ = await next_frame(ws)
                assert first >= head - 1  # ix = seq - 1 here: the live head, not ix 0
                assert (await next_frame(ws))[0] == first + 1
            assert sim.replay_requests == []
            assert gw.replays.counters.total == {}


async def test_a_replay_not_held_from_the_start_is_passed_through_and_capped(
    tmp_path: Path,
) -> None:
    with trio.fail_after(90):
        async with simulator_and_gateway(
            tmp_path,
            [],
            feeds={"tracking": {"history": 50}},
            replay={"max_replays": 1},
        ) as (sim, gw):
            sim.add_fixture(FX)
            # Joined late (once ix 200 exists), no recorder: the start is not held.
            await wait_until(lambda: sim.fixtures[FX].available() > 200)
            assert gw.fixtures.follow(FixtureConfig(feed="tracking", id=FX))
            await wait_until(lambda: (t := gw.hub.get("tracking", FX)) is not None and t.seq > 0)
            assert sim.sessions(FX) == 1
            async with dropin(gw) as ws, dropin(gw) as second:
                await ws.send_message(_request(pps=50, looped=True))
                ixs = [(await next_frame(ws))[0] for _ in range(20)]
                assert ixs == list(range(20))  # the vendor's replay, from its first frame
                (seen,) = sim.replay_requests
                assert (seen.fixture_id, seen.backfill) == (FX, -1)
                assert (seen.replay.packets_per_second, seen.replay.looped) == (50, True)
                assert sim.sessions(FX) == 2  # a dedicated connection, beside the live one
                counters = gw.replays.counters
                assert counters.active["vendor"] == 1

                await second.send_message(_request(pps=50))
                reply = orjson.loads(await second.get_message())
                assert reply == {
                    "message": "Replay not available: too many replays passed through to the "
                    "vendor (max_replays 1)",
                    "level": "ERROR",
                }
                assert len(sim.replay_requests) == 1
            # The client went: its vendor connection closes; the live one stays.
            await wait_until(lambda: sim.sessions(FX) == 1)
            assert counters.active["vendor"] == 0 and counters.refused["max_replays"] == 1

            # A fixture the vendor does not know: its answer, relayed; the vendor connection
            # closes and the client may ask again on its connection.
            async with dropin(gw) as ws:
                await ws.send_message(_request(pps=50).replace(FX, "nope-1"))
                assert orjson.loads(await ws.get_message()) == {
                    "message": "Could not find fixture topic soccer.tracking.enrichment.nope-1",
                    "level": "WARN",
                }
                await wait_until(lambda: counters.active["vendor"] == 0)
                await ws.send_message(_request(pps=50))
                assert (await next_frame(ws))[0] == 0
                assert [r.fixture_id for r in sim.replay_requests] == [FX, FX]


async def test_without_a_recorder_the_memory_history_serves_a_replay_from_its_start(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        async with simulator_and_gateway(tmp_path, []) as (sim, gw):  # history 1,500 frames
            sim.add_fixture(FX)
            assert gw.fixtures.follow(FixtureConfig(feed="tracking", id=FX, backfill=-1))
            await wait_until(lambda: (t := gw.hub.get("tracking", FX)) is not None and t.seq > 100)
            async with dropin(gw) as ws:
                await ws.send_message(_request(pps=1000))
                assert [(await next_frame(ws))[0] for _ in range(100)] == list(range(100))
            assert gw.replays.counters.total["memory"] == 1
            assert sim.replay_requests == []


async def test_a_client_that_reads_nothing_is_closed_as_slow_and_live_goes_on(
    tmp_path: Path,
) -> None:
    """The replay waits on its budget, then ends the connection (4008) after ``stall_timeout``;
    a live subscriber of the same fixture keeps receiving meanwhile."""
    with trio.fail_after(90):
        async with recorded_gateway(tmp_path, replay={"stall_timeout": 2.0}) as (_, gw, _):
            gw_replay = gw.replays.counters
            async with (
                open_websocket_url(stream_url(gw, TRACKING_PATH), message_queue_size=1) as stuck,
                dropin(gw) as live,
            ):
                await live.send_message(orjson.dumps({"fixtureId": FX, "backfill": 0}).decode())
                await stuck.send_message(orjson.dumps({"authToken": "x"}).decode())
                await stuck.send_message(_request(pps=1000, looped=True))
                # The stuck client never reads again: its socket buffers fill, the replay waits
                # on its budget, then gives up.
                seen, _ = await next_frame(live)
                await wait_until(lambda: gw.registry.slow_disconnects == 1, 60)  # 4008
                assert gw_replay.slow_consumers == 1  # by the replay's rule, before the queue's
                ix, _ = await next_frame(live)
                while ix < seen + 50:  # the live subscriber went on all along
                    nxt, _ = await next_frame(live)
                    assert nxt == ix + 1
                    ix = nxt
            assert gw_replay.active["recording"] == 0
