"""The DDE vendor simulator: every protocol rule, every fault, determinism and frame shape.

Rules: real sockets on 127.0.0.1 port 0 with real time (no MockClock); every socket test runs
inside ``trio.fail_after`` with generous room; high ``rate_hz`` and short heartbeat/status
intervals keep it fast. Assertions are on order, content and lower bounds of time, never on how
fast something happened. Clients: trio-websocket, plus one test with the ``websockets`` sync
client in a thread.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import logging
import math
import os
import re
import signal
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)
from websockets.sync.client import connect

from gateway.config import load_config
from gateway.simulator import (
    ACCEPT_MEDIA_TYPE,
    Faults,
    Outcome,
    Simulator,
    TrackingMatch,
    add_arguments,
    build_simulator,
    parse_fault,
    run_from_args,
)
from tests.conftest import TEST_TOKEN
from tests.kit import wait_until

TIMEOUT = 20
TRACK = "/ws/soccer/tracking/low_latency"
ACCEPT = [(b"Accept", ACCEPT_MEDIA_TYPE.encode())]
HEARTBEAT = re.compile(r"^Heartbeat sent at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def make_sim(**kw: Any) -> Simulator:
    args: dict[str, Any] = {
        "tokens": {TEST_TOKEN},
        "rate_hz": 200.0,
        "heartbeat_interval": 0.2,
        "action_interval": 0.05,
    }
    args.update(kw)
    return Simulator(**args)


@asynccontextmanager
async def serving(sim: Simulator) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(sim.serve)
        yield port
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def tracking(
    port: int, token: str = TEST_TOKEN, **kw: Any
) -> AsyncIterator[WebSocketConnection]:
    """An authorised tracking connection (the acceptance message already read)."""
    async with open_websocket_url(f"ws://127.0.0.1:{port}{TRACK}", **kw) as ws:
        await send(ws, {"authToken": token})
        assert await recv(ws) == {"message": "Authorisation accepted", "level": "INFO"}
        yield ws


@asynccontextmanager
async def fastpath(
    port: int, fixture: str, query: str = "", token: str = TEST_TOKEN
) -> AsyncIterator[WebSocketConnection]:
    """A fastpath connection that has sent its auth message."""
    async with open_websocket_url(fastpath_url(port, fixture, query), extra_headers=ACCEPT) as ws:
        await send(ws, {"authToken": token})
        yield ws


def outcome(sim: Simulator, i: int = 0) -> Outcome:
    return sim.attempts[i].outcome


def fastpath_url(port: int, fixture: str, query: str = "") -> str:
    return f"ws://127.0.0.1:{port}/soccer/fixtures/{fixture}/actions{query}"


async def send(ws: WebSocketConnection, doc: Any) -> None:
    await ws.send_message(orjson.dumps(doc).decode())


async def recv(ws: WebSocketConnection) -> Any:
    return orjson.loads(await ws.get_message())


def is_info(doc: Any) -> bool:
    return isinstance(doc, dict) and "level" in doc


async def next_data(ws: WebSocketConnection) -> dict[str, Any]:
    """The next message that is not a heartbeat/info message."""
    while True:
        doc = await recv(ws)
        if not is_info(doc):
            assert isinstance(doc, dict)
            return doc


async def data(ws: WebSocketConnection, n: int) -> list[dict[str, Any]]:
    return [await next_data(ws) for _ in range(n)]


async def close_code(ws: WebSocketConnection) -> int:
    """Read until the server closes; the close code the client saw (1006: no close frame)."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await ws.get_message()
    assert info.value.reason is not None
    return info.value.reason.code


def assert_contiguous(frames: list[dict[str, Any]]) -> None:
    ixs = [f["ix"] for f in frames]
    assert ixs == list(range(ixs[0], ixs[0] + len(ixs)))


# -- tracking: auth and heartbeats --------------------------------------------------------


async def test_auth_accepted_then_heartbeats_in_vendor_format() -> None:
    sim = make_sim(heartbeat_interval=0.1)
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port, tracking(port) as ws:
            before = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
            beats = [await recv(ws) for _ in range(3)]
            for beat in beats:
                assert beat["level"] == "INFO"
                assert HEARTBEAT.match(beat["message"]), beat
                stamp = datetime.datetime.fromisoformat(
                    beat["message"][len("Heartbeat sent at ") :]
                )
                assert stamp >= before  # real UTC time, not a synthetic clock
            assert outcome(sim) == Outcome.AUTHORIZED
            assert sim.active_connections == 1


@pytest.mark.parametrize(
    "first",
    [
        "not json",
        '{"token": "x"}',
        '{"authToken": 5}',
        '["authToken"]',
    ],
)
async def test_malformed_auth_message_gets_error_then_close_1008(first: str) -> None:
    sim = make_sim()
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port, open_websocket_url(f"ws://127.0.0.1:{port}{TRACK}") as ws:
            await ws.send_message(first)
            assert await recv(ws) == {
                "message": "Authentication message had incorrect format",
                "level": "ERROR",
            }
            assert await close_code(ws) == 1008
    assert outcome(sim) == Outcome.BAD_AUTH_FORMAT


@pytest.mark.parametrize(("tokens", "token"), [({TEST_TOKEN}, "wrong"), (None, "")])
async def test_wrong_token_gets_error_message_then_close_1008(
    tokens: set[str] | None, token: str
) -> None:
    sim = make_sim(tokens=tokens)
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port, open_websocket_url(f"ws://127.0.0.1:{port}{TRACK}") as ws:
            await send(ws, {"authToken": token})
            assert await recv(ws) == {"errorMessage": "Supplied token could not be authenticated"}
            assert await close_code(ws) == 1008
    assert outcome(sim) == Outcome.UNAUTHORIZED


async def test_any_non_empty_token_when_tokens_is_none() -> None:
    sim = make_sim(tokens=None)
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port, tracking(port, token="anything"):
            pass


async def test_token_rotation_applies_to_new_connections_only() -> None:
    sim = make_sim(tokens={"old"})
    sim.add_fixture("fx")
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port, tracking(port, token="old") as kept:
            sim.set_tokens({"new"})
            async with open_websocket_url(f"ws://127.0.0.1:{port}{TRACK}") as ws:
                await send(ws, {"authToken": "old"})
                assert "errorMessage" in await recv(ws)
            async with tracking(port, token="new"):
                pass
            # The connection authorised with the old token keeps working.
            await send(kept, {"fixtureId": "fx", "backfill": 0})
            assert (await next_data(kept))["id"] == "fx"


# -- tracking: fixture requests, backfill, replay -----------------------------------------


@pytest.mark.parametrize("backfill", [None, -1, 0, 7])
async def test_backfill_start_and_then_live(backfill: int | None) -> None:
    sim = make_sim()
    fixture = sim.add_fixture("fx")
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port, tracking(port) as ws:
            await wait_until(lambda: fixture.current_ix() >= 10)  # more frames than backfill 7
            before = fixture.current_ix()
            await send(ws, {"fixtureId": "fx", "backfill": backfill})
            first = await next_data(ws)
            after = fixture.current_ix()
            frames = [first, *await data(ws, 30)]
    assert_contiguous(frames)
    assert all(f["id"] == "fx" for f in frames)
    assert before >= 10
    if backfill in (None, -1):
        assert first["ix"] == 0
    elif backfill == 0:
        assert before < first["ix"] <= after
    else:
        assert before + 1 - backfill <= first["ix"] <= after + 1 - backfill


@pytest.mark.parametrize("backfill", [-2, "5", 1.5, True, [1]])
async def test_invalid_backfill_gets_error_and_connection_stays(backfill: Any) -> None:
    sim = make_sim()
    sim.add_fixture("fx")
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port, tracking(port) as ws:
            await send(ws, {"fixtureId": "fx", "backfill": backfill})
            error = await recv(ws)
            assert error["level"] == "ERROR" and "ackfill" in error["message"]
            await send(ws, {"fixtureId": "fx", "backfill": 0})
            assert (await next_data(ws))["id"] == "fx"


async def test_request_without_fixture_id_gets_error() -> None:
    sim = make_sim()
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port, tracking(port) as ws:
            await ws.send_message("garbage")
            assert (await recv(ws))["level"] == "ERROR"
            await send(ws, {"fixtureId": 7})
            assert (await recv(ws))["level"] == "ERROR"


async def test_unknown_fixture_warns_and_connection_stays_open() -> None:
    sim = make_sim()
    sim.add_fixture("fx")
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port, tracking(port) as ws:
            await send(ws, {"fixtureId": "nope", "backfill": 0})
            assert await recv(ws) == {
                "message": "Could not find fixture topic soccer.tracking.enrichment.nope",
                "level": "WARN",
            }
            assert outcome(sim) == Outcome.UNKNOWN_FIXTURE
            assert HEARTBEAT.match((await recv(ws))["message"])  # still open
            # Nothing was accepted yet, so a later request for a known fixture is served.
            await send(ws, {"fixtureId": "fx", "backfill": 0})
            assert (await next_data(ws))["id"] == "fx"
            assert outcome(sim) == Outcome.STREAMING


async def test_requests_after_an_accepted_one_are_ignored() -> None:
    sim = make_sim()
    sim.add_fixture("fx")
    sim.add_fixture("other")
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port, tracking(port) as ws:
            await send(ws, {"fixtureId": "fx", "backfill": 0})
            await next_data(ws)
            await send(ws, {"fixtureId": "other", "backfill": -1})
            await send(ws, {"fixtureId": "nope", "backfill": -1})
            await ws.send_message("garbage")
            msgs = [await recv(ws) for _ in range(60)]
    assert all(not is_info(m) or HEARTBEAT.match(m["message"]) for m in msgs)
    frames = [m for m in msgs if not is_info(m)]
    assert {f["id"] for f in frames} == {"fx"}
    assert_contiguous(frames)


async def test_replay_paces_backfill_then_goes_live() -> None:
    sim = make_sim()
    fixture = sim.add_fixture("fx")
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port, tracking(port) as ws:
            await wait_until(lambda: fixture.current_ix() >= 10)  # the 10 to replay exist
            replay = {"enabled": True, "packetsPerSecond": 1000, "looped": False}
            start = trio.current_time()
            await send(ws, {"fixtureId": "fx", "backfill": 10, "replay": replay})
            frames = await data(ws, 10)
            # 10 frames at 1000/s take at least 9 ms (a lower bound: cannot fail under load).
            assert trio.current_time() - start >= 0.009
            frames += await data(ws, 40)
            assert fixture.current_ix() >= frames[-1]["ix"]
    assert_contiguous(frames)


async def test_looped_replay_of_a_recording_restarts_at_the_end(tmp_path: Path) -> None:
    recording = tmp_path / "rec.jsonl"
    lines = [orjson.dumps({"id": "rec", "ix": 100 + i}).decode() for i in range(5)]
    recording.write_text("\n".join(lines) + "\n\n")
    sim = make_sim(rate_hz=1000.0)
    fixture = sim.add_fixture("rec", recording=recording)
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port, tracking(port) as ws:
            await wait_until(lambda: fixture.available() == len(lines))  # the whole recording
            replay = {"enabled": True, "packetsPerSecond": 500, "looped": True}
            await send(ws, {"fixtureId": "rec", "backfill": -1, "replay": replay})
            raw = [orjson.dumps(await next_data(ws)).decode() for _ in range(12)]
    assert raw == (lines * 3)[:12]  # recordings are sent verbatim


async def test_recording_is_played_in_file_order_and_ends(tmp_path: Path) -> None:
    recording = tmp_path / "rec.jsonl"
    recording.write_text("".join(f'{{"ix": {i}, "x": "{i}"}}\n' for i in range(20)))
    sim = make_sim(rate_hz=400.0, heartbeat_interval=0.05)
    fixture = sim.add_fixture("rec", recording=recording)
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port, tracking(port) as ws:
            await send(ws, {"fixtureId": "rec", "backfill": -1})
            frames = await data(ws, 20)
            # After the end only heartbeats come.
            assert all([is_info(await recv(ws)) for _ in range(3)])
    assert [f["ix"] for f in frames] == list(range(20))
    assert fixture.current_ix() == 19


@pytest.mark.parametrize(
    "replay",
    [
        {"enabled": True, "packetsPerSecond": 0, "looped": False},
        {"enabled": True, "packetsPerSecond": 1001, "looped": False},
        {"enabled": "yes", "packetsPerSecond": 10, "looped": False},
        {"enabled": True, "packetsPerSecond": 10, "looped": 1},
        "on",
    ],
)
async def test_invalid_replay_gets_error(replay: Any) -> None:
    sim = make_sim()
    sim.add_fixture("fx")
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port, tracking(port) as ws:
            await send(ws, {"fixtureId": "fx", "backfill": 0, "replay": replay})
            error = await recv(ws)
            assert error["level"] == "ERROR" and "eplay" in error["message"]


def test_bad_recordings_are_clear_errors(tmp_path: Path) -> None:
    sim = make_sim()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ix": 0}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
        sim.add_fixture("a", recording=bad)
    with pytest.raises(ValueError, match="cannot read recording"):
        sim.add_fixture("b", recording=tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="recording"):
        sim.add_fixture("c", kind="fastpath", recording=bad)


def test_api_errors() -> None:
    sim = make_sim()
    sim.add_fixture("fx")
    with pytest.raises(ValueError, match="already exists"):
        sim.add_fixture("fx")
    with pytest.raises(ValueError, match="kind"):
        sim.add_fixture("k", kind="other")  # type: ignore[arg-type]  # checking bad input
    with pytest.raises(ValueError, match="rate_hz"):
        sim.add_fixture("r", rate_hz=0)
    with pytest.raises(KeyError):
        sim.faults("nope")
    with pytest.raises(KeyError):
        sim.remove_fixture("nope")
    with pytest.raises(TypeError):
        sim.set_tokens("abc")
    with pytest.raises(ValueError, match="heartbeat_interval"):
        Simulator(heartbeat_interval=0)


# -- fastpath ---------------------------------------------------------------------------


async def test_fastpath_handshake_rejections() -> None:
    sim = make_sim()
    sim.add_fixture("fp", kind="fastpath")
    sim.add_fixture("trk")
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port:
            with pytest.raises(ConnectionRejected) as no_accept:
                async with open_websocket_url(fastpath_url(port, "fp")):
                    pass
            assert no_accept.value.status_code == 406
            for missing in ("nope", "trk"):
                with pytest.raises(ConnectionRejected) as not_found:
                    async with open_websocket_url(
                        fastpath_url(port, missing), extra_headers=ACCEPT
                    ):
                        pass
                assert not_found.value.status_code == 404
                assert not_found.value.body is not None
                assert orjson.loads(not_found.value.body) == {
                    "error": "fixture not found",
                    "status": 404,
                }
            with pytest.raises(ConnectionRejected) as bad_start:
                async with open_websocket_url(
                    fastpath_url(port, "fp", "?startPosition=x"), extra_headers=ACCEPT
                ):
                    pass
            assert bad_start.value.status_code == 400
    assert [a.outcome for a in sim.attempts] == [
        Outcome.NOT_ACCEPTABLE,
        Outcome.NOT_FOUND,
        Outcome.NOT_FOUND,
        Outcome.BAD_REQUEST,
    ]


async def test_fastpath_auth_rules() -> None:
    sim = make_sim(heartbeat_interval=0.05, action_interval=60.0)
    sim.add_fixture("fp", kind="fastpath")
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port:
            url = fastpath_url(port, "fp")
            async with open_websocket_url(url, extra_headers=ACCEPT) as ws:
                await ws.send_message("{")
                assert (await recv(ws))["level"] == "ERROR"
                assert await close_code(ws) == 1008
            async with open_websocket_url(url, extra_headers=ACCEPT) as ws:
                await send(ws, {"authToken": "wrong"})
                assert "errorMessage" in await recv(ws)
                assert await close_code(ws) == 1008
            async with open_websocket_url(url, extra_headers=ACCEPT) as ws:
                await send(ws, {"authToken": TEST_TOKEN})
                # No acceptance message: the first thing is a heartbeat (no actions yet).
                assert HEARTBEAT.match((await recv(ws))["message"])


async def test_fastpath_seq_from_one_per_connection_and_start_position() -> None:
    sim = make_sim(heartbeat_interval=5.0)
    fixture = sim.add_fixture("fp", kind="fastpath")
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port:
            await wait_until(lambda: fixture.events_so_far() >= 6)
            async with fastpath(port, "fp") as ws:
                full = await data(ws, 10)
            query = "?startPosition=4"
            async with open_websocket_url(
                fastpath_url(port, "fp", query), extra_headers=ACCEPT
            ) as ws:
                await send(ws, {"authToken": TEST_TOKEN})
                skipped = await data(ws, 6)
    assert [a["fixtureAction"]["fixtureSeqNum"] for a in full] == list(range(1, 11))
    assert [a["fixtureAction"]["fixtureSeqNum"] for a in skipped] == list(range(1, 7))
    ids = [a["fixtureAction"]["actionId"] for a in full]
    assert len(set(ids)) == 10
    assert [a["fixtureAction"]["actionId"] for a in skipped] == ids[4:10]
    action = full[0]
    assert list(action) == ["fixtureAction", "fixtureSummary"]
    assert list(action["fixtureAction"]) == [
        "actionId",
        "fixtureActionType",
        "fixtureId",
        "fixtureSeqNum",
        "period",
        "sendType",
        "timestamp",
    ]
    assert action["fixtureAction"]["fixtureId"] == "fp"
    assert action["fixtureAction"]["timestamp"].endswith("Z")
    assert action["fixtureSummary"]["currentStatus"] == "Live"


async def test_fastpath_outage_sends_disconnected_connected_and_late_actions() -> None:
    sim = make_sim(
        heartbeat_interval=5.0,
        action_interval=0.02,
        status_check_interval=0.05,
        silence_timeout=0.15,
    )
    fixture = sim.add_fixture("fp", kind="fastpath")
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port, fastpath(port, "fp") as ws:
            await data(ws, 3)
            began = trio.current_time()  # read before the outage starts: a safe lower bound
            fixture.outage(0.6)
            msgs: list[dict[str, Any]] = []
            times: list[float] = []
            while len([m for m in msgs if "eventElementType" in m]) < 2:
                msgs.append(await next_data(ws))
                times.append(trio.current_time())
            msgs += await data(ws, 3)
    states = [(i, m) for i, m in enumerate(msgs) if "eventElementType" in m]
    (d_at, down), (c_at, up) = states
    assert down["state"] == "Disconnected" and up["state"] == "Connected"
    for packet in (down, up):
        assert list(packet) == ["timestamp", "eventElementType", "state"]
        assert "fixtureSeqNum" not in packet
    # Disconnected only after the silence timeout has passed (a lower bound).
    assert times[d_at] - began >= 0.15
    assert times[c_at] - began >= 0.6
    # Nothing between the two states; the missed actions come right after Connected, in order.
    assert c_at == d_at + 1
    seqs = [m["fixtureAction"]["fixtureSeqNum"] for m in msgs if "fixtureAction" in m]
    assert seqs == list(range(4, 4 + len(seqs)))
    late = [m for m in msgs[c_at + 1 :] if "fixtureAction" in m]
    assert len(late) >= 3


async def test_fastpath_connection_during_outage_gets_current_state() -> None:
    sim = make_sim(
        heartbeat_interval=5.0,
        action_interval=0.02,
        status_check_interval=0.05,
        silence_timeout=0.1,
    )
    fixture = sim.add_fixture("fp", kind="fastpath")
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port:
            await wait_until(lambda: fixture.events_so_far() >= 2)
            fixture.outage(5.0)
            await wait_until(lambda: fixture.scorer_state == "Disconnected")
            delivered = fixture.events_so_far()
            async with fastpath(port, "fp") as ws:
                msgs = await data(ws, delivered + 1)
    assert all("fixtureAction" in m for m in msgs[:-1])
    assert msgs[-1]["state"] == "Disconnected"


# -- faults -------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "seen"), [(None, 1006), (4000, 4000), (1011, 1011)])
async def test_drop_after_frames_on_every_connection(code: int | None, seen: int) -> None:
    sim = make_sim()
    sim.add_fixture("fx")
    faults = sim.faults("fx")
    faults.drop_after_frames = 5
    faults.drop_close_code = code
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port:
            for _ in range(2):
                async with tracking(port) as ws:
                    await send(ws, {"fixtureId": "fx", "backfill": -1})
                    frames = await data(ws, 5)
                    assert [f["ix"] for f in frames] == [0, 1, 2, 3, 4]
                    assert await close_code(ws) == seen
    assert [a.outcome for a in sim.attempts] == [Outcome.DROPPED, Outcome.DROPPED]


async def test_drop_after_frames_on_fastpath() -> None:
    sim = make_sim(heartbeat_interval=5.0)
    sim.add_fixture("fp", kind="fastpath")
    sim.faults("fp").drop_after_frames = 2
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port, fastpath(port, "fp") as ws:
            assert len(await data(ws, 2)) == 2
            assert await close_code(ws) == 1006


async def test_drop_probability_one_drops_before_any_frame() -> None:
    sim = make_sim()
    sim.add_fixture("fx")
    sim.faults("fx").drop_probability = 1.0
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port, tracking(port) as ws:
            await send(ws, {"fixtureId": "fx", "backfill": -1})
            with pytest.raises(ConnectionClosed):
                await next_data(ws)


async def test_random_drops_are_reproducible_from_the_seed() -> None:
    """drop_probability < 1 drops at a random data frame, the same one for the same seed."""

    async def frames_before_drop(seed: int) -> int:
        sim = make_sim(seed=seed)
        sim.add_fixture("fx")
        sim.faults("fx").drop_probability = 0.05
        async with serving(sim) as port, tracking(port) as ws:
            await send(ws, {"fixtureId": "fx", "backfill": -1})
            n = 0
            with pytest.raises(ConnectionClosed):
                while True:
                    await next_data(ws)
                    n += 1
        assert outcome(sim) == Outcome.DROPPED
        return n

    with trio.fail_after(TIMEOUT):
        counts = [await frames_before_drop(seed) for seed in (1, 1, 2, 3, 4)]
    assert counts[0] == counts[1]
    assert len(set(counts[1:])) > 1  # the seed decides where
    assert max(counts) > 0


async def test_stall_sends_nothing_then_resumes_without_gap() -> None:
    sim = make_sim(heartbeat_interval=0.05)
    sim.add_fixture("fx")
    faults = sim.faults("fx")
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port, tracking(port) as ws:
            await send(ws, {"fixtureId": "fx", "backfill": 0})
            frames = await data(ws, 3)
            faults.stall = True
            # Drain what was in flight, then expect silence, heartbeats included.
            with trio.move_on_after(0.2):
                while True:
                    msg = await recv(ws)
                    if not is_info(msg):
                        frames.append(msg)
            with trio.move_on_after(0.4) as quiet:
                await ws.get_message()
            assert quiet.cancelled_caught
            faults.stall = False
            frames += await data(ws, 5)
    assert_contiguous(frames)


async def test_reject_auth_fault_tracking_and_fastpath() -> None:
    sim = make_sim(heartbeat_interval=5.0)
    sim.add_fixture("fx")
    sim.add_fixture("ok")
    sim.add_fixture("fp", kind="fastpath")
    sim.faults("fx").reject_auth = True
    sim.faults("fp").reject_auth = True
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port:
            # Tracking names its fixture after auth: the rejection comes at the request.
            async with tracking(port) as ws:
                await send(ws, {"fixtureId": "fx", "backfill": 0})
                assert "errorMessage" in await recv(ws)
                assert await close_code(ws) == 1008
            async with tracking(port) as ws:  # other fixtures are unaffected
                await send(ws, {"fixtureId": "ok", "backfill": 0})
                assert (await next_data(ws))["id"] == "ok"
            async with fastpath(port, "fp") as ws:
                assert "errorMessage" in await recv(ws)
                assert await close_code(ws) == 1008
            sim.connection_faults.reject_auth = True
            async with open_websocket_url(f"ws://127.0.0.1:{port}{TRACK}") as ws:
                await send(ws, {"authToken": TEST_TOKEN})
                assert "errorMessage" in await recv(ws)


async def test_malformed_frames_are_interleaved_before_data() -> None:
    sim = make_sim()
    sim.add_fixture("fx")
    sim.faults("fx").malformed_frames = 3
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port, tracking(port) as ws:
            await send(ws, {"fixtureId": "fx", "backfill": -1})
            raw = [str(await ws.get_message()) for _ in range(12)]
    bad = [i for i, m in enumerate(raw) if not m.startswith("{")]
    assert len(bad) == 3
    for text in (raw[i] for i in bad):
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(text)
    assert all(raw[i + 1].startswith('{"id"') for i in bad)  # each one before a data frame
    frames = [orjson.loads(m) for m in raw if m.startswith('{"id"')]
    assert frames[0]["ix"] == 0
    assert_contiguous(frames)
    assert sim.faults("fx").malformed_frames == 0


async def test_handshake_delay() -> None:
    sim = make_sim(heartbeat_interval=5.0)
    sim.add_fixture("fp", kind="fastpath")
    sim.faults("fp").handshake_delay = 0.3
    sim.connection_faults.handshake_delay = 0.2
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port:
            start = trio.current_time()
            async with open_websocket_url(fastpath_url(port, "fp"), extra_headers=ACCEPT):
                assert trio.current_time() - start >= 0.3
            start = trio.current_time()
            async with open_websocket_url(f"ws://127.0.0.1:{port}{TRACK}"):
                assert trio.current_time() - start >= 0.2


async def test_close_after_auth_code() -> None:
    sim = make_sim(heartbeat_interval=5.0)
    sim.add_fixture("fx")
    sim.add_fixture("fp", kind="fastpath")
    sim.faults("fx").close_after_auth_code = 4001
    sim.faults("fp").close_after_auth_code = 1012
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port:
            async with tracking(port) as ws:
                await send(ws, {"fixtureId": "fx", "backfill": 0})
                assert await close_code(ws) == 4001
            async with fastpath(port, "fp") as ws:
                assert await close_code(ws) == 1012
            sim.connection_faults.close_after_auth_code = 4002
            async with open_websocket_url(f"ws://127.0.0.1:{port}{TRACK}") as ws:
                await send(ws, {"authToken": TEST_TOKEN})
                assert (await recv(ws))["message"] == "Authorisation accepted"
                assert await close_code(ws) == 4002
    assert [a.outcome for a in sim.attempts] == [Outcome.CLOSED_AFTER_AUTH] * 3


async def test_remove_fixture_closes_its_connections() -> None:
    sim = make_sim()
    sim.add_fixture("fx")
    sim.add_fixture("fp", kind="fastpath")
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port, tracking(port) as ws:
            await send(ws, {"fixtureId": "fx", "backfill": 0})
            await next_data(ws)
            async with fastpath(port, "fp") as fp:
                assert sim.active_connections == 2
                sim.remove_fixture("fx")
                sim.remove_fixture("fp")
                assert await close_code(ws) == 1001
                assert await close_code(fp) == 1001
            assert "fx" not in sim.fixtures
            await wait_until(lambda: sim.active_connections == 0)


# -- data: determinism and shape ----------------------------------------------------------


async def test_same_seed_same_bytes_over_the_wire() -> None:
    async def first_frames(seed: int) -> list[bytes]:
        sim = make_sim(seed=seed)
        sim.add_fixture("fx")
        async with serving(sim) as port, tracking(port) as ws:
            await send(ws, {"fixtureId": "fx", "backfill": -1})
            out: list[bytes] = []
            while len(out) < 20:
                raw = await ws.get_message()
                assert isinstance(raw, str)
                if '"level"' not in raw:
                    out.append(raw.encode())
            return out

    with trio.fail_after(TIMEOUT):
        a = await first_frames(1)
        b = await first_frames(1)
        c = await first_frames(2)
    assert a == b
    assert a != c
    expected = TrackingMatch("fx", 1, 200.0)
    assert a[7] == orjson.dumps(expected.frame(7))


def test_fastpath_actions_are_deterministic() -> None:
    one = make_sim(seed=3).add_fixture("fp", kind="fastpath")
    two = make_sim(seed=3).add_fixture("fp", kind="fastpath")
    other = make_sim(seed=4).add_fixture("fp", kind="fastpath")
    texts = [one.script.action(k).text(k + 1) for k in range(30)]
    assert texts == [two.script.action(k).text(k + 1) for k in range(30)]
    assert texts != [other.script.action(k).text(k + 1) for k in range(30)]


def test_fastpath_score_summary_counts_the_goals() -> None:
    script = make_sim(seed=1).add_fixture("fp", kind="fastpath").script
    home = away = 0
    goals = 0
    for k in range(300):
        doc = orjson.loads(script.action(k).text(k + 1))
        if doc["fixtureAction"]["fixtureActionType"] == "Goal":
            goals += 1
            score = doc["fixtureSummary"]
            assert (score["homeTeamScore"], score["awayTeamScore"]) in (
                (home + 1, away),
                (home, away + 1),
            )
        summary = doc["fixtureSummary"]
        home, away = summary["homeTeamScore"], summary["awayTeamScore"]
    assert goals > 0 and home + away == goals


@pytest.mark.parametrize("ix", [0, 1, 999, 67_499, 67_500, 250_000])
def test_frame_shape(ix: int) -> None:
    match = TrackingMatch("5501b26a-1c44-4c3b-9ff5-9322084d41f9", 0, 25.0)
    frame = match.frame(ix)
    size = len(orjson.dumps(frame))
    assert 2500 <= size <= 3500, size
    assert list(frame) == ["id", "ix", "mt", "ph", "st", "ut", "ba", "hm", "aw", "rf"]
    assert frame["ix"] == ix
    assert frame["st"] == {0: "start", 67_500: "start", 67_499: "end"}.get(ix, "running")
    assert frame["ph"] == (1 if ix < 67_500 else 2)
    assert list(frame["ba"]) == ["jn", "pn", "tr", "tm"]
    assert len(frame["ba"]["pn"]) == 3 and frame["ba"]["tm"] in ("home", "away")
    assert len(frame["hm"]) == 11 and len(frame["aw"]) == 11
    assert sorted(r["ro"] for r in frame["rf"]) == [3, 4, 5]
    tracks = set()
    for team in ("hm", "aw"):
        players = frame[team]
        assert [p["ro"] for p in players].count(1) == 1
        assert len({p["jn"] for p in players}) == 11
        for p in players:
            assert list(p) == ["tr", "ro", "jn", "pl", "d", "v", "pn"]
            uuid.UUID(p["pl"])
    for person in frame["hm"] + frame["aw"] + frame["rf"]:
        tracks.add(person["tr"])
        x, y = person["pn"]
        assert abs(x) <= 52.5 and abs(y) <= 34.0
        assert person["d"] >= 0 and 0 < person["v"] < 10
    assert len(tracks) == 25


def test_motion_is_plausible() -> None:
    match = TrackingMatch("fx", 5, 25.0)
    frames = [match.frame(ix) for ix in range(0, 2000, 5)]
    for team in ("hm", "aw"):
        for i in range(11):
            d = [f[team][i]["d"] for f in frames]
            assert d == sorted(d)  # distance only grows
            for f0, f1 in itertools.pairwise(frames):
                (x0, y0), (x1, y1) = f0[team][i]["pn"], f1[team][i]["pn"]
                # 5 frames = 0.2 s: nobody moves more than a sprinter would.
                assert math.hypot(x1 - x0, y1 - y0) <= 0.2 * 10
    assert frames[-1]["ut"] - frames[0]["ut"] == round(1995 / 25 * 1000)
    assert frames[1]["mt"] - frames[0]["mt"] == 200


def test_phase_end_frame() -> None:
    match = TrackingMatch("fx", 0, 10.0, phase_seconds=2.0)
    assert [match.frame(ix)["st"] for ix in range(0, 21)] == (
        ["start"] + ["running"] * 18 + ["end"]
    ) + ["start"]
    assert match.frame(20)["ph"] == 2 and match.frame(20)["mt"] == 2000


def test_encoded_frames_are_cached() -> None:
    fixture = make_sim().add_fixture("fx")
    assert fixture.frame_text(3) is fixture.frame_text(3)


# -- other clients, CLI -------------------------------------------------------------------


async def test_websockets_sync_client_in_a_thread() -> None:
    sim = make_sim()
    sim.add_fixture("fx")

    def client(port: int) -> list[dict[str, Any]]:
        url = f"ws://127.0.0.1:{port}{TRACK}"
        with connect(url, proxy=None, open_timeout=TIMEOUT) as ws:
            ws.send(orjson.dumps({"authToken": TEST_TOKEN}).decode())
            assert orjson.loads(ws.recv(timeout=TIMEOUT))["level"] == "INFO"
            ws.send(orjson.dumps({"fixtureId": "fx", "backfill": 3}).decode())
            out: list[dict[str, Any]] = []
            while len(out) < 10:
                doc = orjson.loads(ws.recv(timeout=TIMEOUT))
                if "ix" in doc:
                    out.append(doc)
            return out

    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port:
            frames = await trio.to_thread.run_sync(client, port)
    assert_contiguous(frames)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_options_build_the_simulator(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("# comment\nalpha\n\nbeta\n")
    args = _parse(
        [
            "--listen",
            "127.0.0.1:0",
            "--fixtures",
            "a,b",
            "--fastpath-fixtures",
            "p",
            "--token-file",
            str(token_file),
            "--rate",
            "50",
            "--heartbeat",
            "2",
            "--seed",
            "9",
            "--fault",
            "a:drop_after_frames=10",
            "--fault",
            "p:stall=true",
            "--fault",
            "b:drop_close_code=none",
            "--fault",
            "*:handshake_delay=0.5",
        ]
    )
    sim = build_simulator(args)
    assert set(sim.fixtures) == {"a", "b", "p"}
    assert sim.fixtures["p"].kind == "fastpath"
    assert sim.token_ok("alpha") and sim.token_ok("beta") and not sim.token_ok("gamma")
    assert sim.rate_hz == 50 and sim.heartbeat_interval == 2 and sim.seed == 9
    assert sim.faults("a") == Faults(drop_after_frames=10)
    assert sim.faults("p").stall is True
    assert sim.connection_faults.handshake_delay == 0.5


def test_cli_defaults_are_the_vendors_and_serve_the_demo_config() -> None:
    """``dde-gateway simulate`` with no option serves every fixture of config/demo.toml, at the
    vendor's pace (25 Hz tracking, heartbeats every 10 s, an action every few seconds)."""
    sim = build_simulator(_parse([]))
    assert sim.rate_hz == 25.0
    assert sim.heartbeat_interval == 10.0
    assert 1.0 <= sim.action_interval <= 10.0
    demo = load_config(Path(__file__).resolve().parent.parent / "config" / "demo.toml")
    assert demo.fixtures
    for fixture in demo.fixtures:
        served = sim.fixtures.get(fixture.id)
        assert served is not None, fixture.id
        assert served.kind == demo.feeds[fixture.feed].kind, fixture.id


@pytest.mark.parametrize(
    "bad",
    ["a:nosuch=1", "a:stall=maybe", "a:drop_after_frames=1.5", "nocolon", "a:stall"],
)
def test_cli_bad_fault_is_a_clear_error(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_fault(bad)


def test_cli_fault_for_unknown_fixture() -> None:
    args = _parse(["--fixtures", "a", "--fault", "zz:stall=1"])
    with pytest.raises(ValueError, match="zz"):
        build_simulator(args)


async def test_run_from_args_serves_and_logs_urls(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.simulator")
    args = _parse(["--listen", "127.0.0.1:0", "--fastpath-fixtures", "p", "--token", TEST_TOKEN])
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(run_from_args, args)
            async with tracking(port) as ws:
                await send(ws, {"fixtureId": "5501b26a-1c44-4c3b-9ff5-9322084d41f9"})
                await next_data(ws)
            nursery.cancel_scope.cancel()
    text = caplog.text
    assert f"ws://127.0.0.1:{port}{TRACK}" in text
    assert f"ws://127.0.0.1:{port}/soccer/fixtures/p/actions" in text
    assert TEST_TOKEN not in text


async def test_fixtures_added_while_serving_and_re_added_after_removal() -> None:
    sim = make_sim(heartbeat_interval=5.0)
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port:
            with pytest.raises(RuntimeError, match="already serving"):
                await sim.serve()
            for _ in range(2):
                sim.add_fixture("fp", kind="fastpath")
                sim.add_fixture("fx")
                async with fastpath(port, "fp") as ws:
                    first = await next_data(ws)
                    assert first["fixtureAction"]["fixtureSeqNum"] == 1
                async with tracking(port) as ws:
                    await send(ws, {"fixtureId": "fx", "backfill": -1})
                    assert (await next_data(ws))["ix"] == 0
                sim.remove_fixture("fp")
                sim.remove_fixture("fx")


async def test_run_from_args_stops_cleanly_on_sigint() -> None:
    args = _parse(["--listen", "127.0.0.1:0", "--fixtures", "a"])
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_from_args, args)
            os.kill(os.getpid(), signal.SIGINT)
    # Reaching here means run_from_args returned by itself, without KeyboardInterrupt.


async def test_run_from_args_errors_are_one_line_exits() -> None:
    with pytest.raises(SystemExit, match="no such fixture"):
        await run_from_args(_parse(["--fixtures", "a", "--fault", "zz:stall=1"]))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port}"):
            await run_from_args(_parse(["--listen", f"127.0.0.1:{port}"]))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("drop_close_code", 1006),
        ("drop_close_code", 999),
        ("close_after_auth_code", 5000),
        ("drop_probability", 1.5),
        ("drop_probability", math.nan),
        ("malformed_frames", -1),
        ("drop_after_frames", 2.0),
        ("handshake_delay", -0.1),
    ],
)
def test_faults_reject_bad_values_when_set(name: str, value: object) -> None:
    faults = Faults()
    with pytest.raises(ValueError, match=name):
        setattr(faults, name, value)


async def test_one_info_line_per_connection_without_the_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.simulator")
    sim = make_sim()
    sim.add_fixture("fx")
    sim.faults("fx").drop_after_frames = 3
    sim.faults("fx").drop_close_code = 4000
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port:
            async with tracking(port) as ws:
                await send(ws, {"fixtureId": "fx", "backfill": -1})
                assert await close_code(ws) == 4000
            await wait_until(lambda: sim.active_connections == 0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("conn ")]
    assert len(lines) == 1
    assert "tracking fx: dropped" in lines[0] and "3 data frames (close 4000)" in lines[0]
    assert TEST_TOKEN not in caplog.text


async def test_client_close_is_logged_with_its_code_not_as_no_close_frame(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.simulator")
    sim = make_sim()
    sim.add_fixture("fx")
    with trio.fail_after(TIMEOUT):
        async with serving(sim) as port:
            async with tracking(port) as ws:
                await send(ws, {"fixtureId": "fx", "backfill": -1})
                await next_data(ws)
                await ws.aclose(1000)
            await wait_until(lambda: sim.active_connections == 0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("conn ")]
    assert len(lines) == 1
    assert lines[0].endswith("(client closed 1000)"), lines[0]
