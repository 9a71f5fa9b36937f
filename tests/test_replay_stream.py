"""The ``/v1/stream`` replay op against a real gateway, the simulator and real recorder files.

- Pacing: 40 frames a second over 4 s arrive 160 +/- 10 %, never more than 50 in any second;
  from the fixture's first frame, contiguous, as ``replay_frame`` (never ``frame``), the data
  verbatim; ``stop_replay`` ends it with ``replay_end`` ``stopped`` and the last seq sent.
- From a seq, a match time (phase + ``mt``) and a vendor time (``ut``), read from disk (the
  memory history is short): the first frame at or after it, contiguous to ``replay_end``
  ``end`` (a live fixture's replay ends where the gateway's frames end when it gets there).
- Looped: ``replay_loop`` pass 2, then the first frame again.
- A live subscription and a replay of the same fixture on one connection, both correct.
- A client that does not read its replay: the replay waits, then ends with ``slow_consumer``;
  the connection stays open and its live subscription is untouched.
- Every bad request answered with an ``error`` (the protocol's texts), the connection usable;
  the per-feed ACL; a start the gateway does not hold; the per-connection cap.
- Live isolation: a 25 Hz live subscriber's worst gap between frames with and without 20
  replays running beside it.

Real sockets on 127.0.0.1 port 0, real time, one ``trio.fail_after`` each.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from gateway.hub import Topic
from gateway.recorder import read_recording
from gateway.service import Gateway
from gateway.simulator import Simulator
from gateway.wire import mask_frame
from tests.conftest import TEST_TOKEN
from tests.kit import gateway_config, running_gateway, stream_url, wait_until
from tests.test_dataplane import RawClient
from tests.test_dataplane_access import bearer, write_tokens

FX = "5501b26a-1c44-4c3b-9ff5-9322084d41f9"
FX2 = "7a1c0d52-3e4f-4d6b-8c9a-0b1c2d3e4f50"
RATE_HZ = 100.0
ACTIONS_ONLY = "sub-act-5a4b3c2d1e0f9a8b"
DATA_KEY = b',"data":'


def _data(message: bytes) -> bytes:
    """The frame inside an envelope, byte for byte (the envelope inserts it verbatim)."""
    return message[message.index(DATA_KEY) + len(DATA_KEY) : -1]


@asynccontextmanager
async def recorded_gateway(
    tmp_path: Path,
    *,
    fixtures: tuple[str, ...] = (FX,),
    history: int = 50,
    recorder: bool = True,
    rate_hz: float = RATE_HZ,
    **sections: dict[str, Any],
) -> AsyncIterator[tuple[Simulator, Gateway]]:
    """The simulator (tracking fixtures at *rate_hz*) and a gateway following them from their
    first frame (``backfill = -1``) and recording them, with a short memory history: a replay
    from the start reads the recorder's files."""
    token_file = tmp_path / "token"
    token_file.write_text(TEST_TOKEN)
    sim = Simulator(tokens={TEST_TOKEN}, rate_hz=rate_hz, heartbeat_interval=1.0)
    for fx in fixtures:
        sim.add_fixture(fx)
    sections = {"feeds": {"tracking": {"history": history}}, **sections}
    if recorder:
        sections["recorder"] = {"dir": str(tmp_path / "rec")}
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve, "127.0.0.1", 0)
        config = gateway_config(port, token_file, [("tracking", fx) for fx in fixtures], **sections)
        config = attrs.evolve(
            config, fixtures=tuple(attrs.evolve(f, backfill=-1) for f in config.fixtures)
        )
        async with running_gateway(config) as gw:
            yield sim, gw
        nursery.cancel_scope.cancel()


def topic_of(gw: Gateway, fixture: str = FX) -> Topic:
    topic = gw.hub.get("tracking", fixture)
    assert topic is not None
    return topic


async def frames_held(gw: Gateway, n: int, fixture: str = FX) -> Topic:
    """Wait until the gateway has published *n* frames of *fixture*."""
    await wait_until(lambda: (t := gw.hub.get("tracking", fixture)) is not None and t.seq >= n)
    return topic_of(gw, fixture)


async def send(ws: WebSocketConnection, **request: Any) -> None:
    await ws.send_message(orjson.dumps(request).decode())


async def replay(
    ws: WebSocketConnection,
    rate: int,
    *,
    fixture: str = FX,
    looped: bool = False,
    start: dict[str, int] | None = None,
) -> None:
    """Ask for a replay of *fixture*; *start*: the ``from`` object (None: left out)."""
    request: dict[str, Any] = {"op": "replay", "feed": "tracking", "fixture": fixture}
    request.update(rate=rate, looped=looped)
    if start is not None:
        request["from"] = start
    await send(ws, **request)


async def message(ws: WebSocketConnection) -> tuple[dict[str, Any], bytes]:
    """The next message but heartbeats: (decoded, the bytes as sent)."""
    while True:
        text = await ws.get_message()
        assert isinstance(text, str)
        msg: dict[str, Any] = orjson.loads(text)
        if msg["type"] != "heartbeat":
            return msg, text.encode()


async def expect(ws: WebSocketConnection, kind: str) -> dict[str, Any]:
    msg, _ = await message(ws)
    assert msg["type"] == kind, msg
    return msg


async def replay_to_end(ws: WebSocketConnection) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every ``replay_frame`` until ``replay_end`` (nothing else may come between)."""
    frames: list[dict[str, Any]] = []
    while True:
        msg, raw = await message(ws)
        if msg["type"] == "replay_end":
            return frames, msg
        assert msg["type"] == "replay_frame", msg
        msg["raw"] = _data(raw)
        frames.append(msg)


def recorded(gw: Gateway, fixture: str = FX) -> dict[int, bytes]:
    """Every frame the recorder has written of *fixture*, by seq."""
    assert gw.recorder is not None
    lg = gw.recorder.get("tracking", fixture)
    assert lg is not None
    return {r.seq: r.raw for r in read_recording(lg.path)}


def field(raw: bytes, name: str) -> int:
    value = orjson.loads(raw)[name]
    assert type(value) is int
    return value


async def test_paced_from_the_first_frame_contiguous_verbatim_and_stopped(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        async with recorded_gateway(tmp_path) as (_, gw):
            topic = await frames_held(gw, 200)
            async with open_websocket_url(stream_url(gw)) as ws:
                await replay(ws, 40)
                started = await expect(ws, "replay_started")
                assert started == {
                    "type": "replay_started",
                    "feed": "tracking",
                    "fixture": FX,
                    "epoch": topic.epoch,
                    "from_seq": 1,
                    "rate": 40,
                    "looped": False,
                }
                frames: list[dict[str, Any]] = []
                arrivals: list[float] = []
                msg, raw = await message(ws)
                first = trio.current_time()
                with trio.move_on_at(first + 4.0):
                    while True:
                        # Never a live `frame`: only replayed frames on this connection.
                        assert msg["type"] == "replay_frame", msg
                        assert (msg["feed"], msg["fixture"]) == ("tracking", FX)
                        msg["raw"] = _data(raw)
                        frames.append(msg)
                        arrivals.append(trio.current_time())
                        msg, raw = await message(ws)
                await send(ws, op="stop_replay", feed="tracking", fixture=FX)
                rest, end = await replay_to_end(ws)
                frames += rest
            # 40/s for 4 s: 160 +/- 10 %, and never a burst.
            assert 144 <= len(arrivals) <= 176, len(arrivals)
            per_second = max(sum(1 for t in arrivals if a <= t < a + 1.0) for a in arrivals)
            assert per_second <= 50, per_second
            seqs = [f["seq"] for f in frames]
            assert seqs == list(range(1, len(seqs) + 1))
            assert [field(f["raw"], "ix") for f in frames] == [s - 1 for s in seqs]
            assert end == {
                "type": "replay_end",
                "feed": "tracking",
                "fixture": FX,
                "reason": "stopped",
                "last_seq": seqs[-1],
            }
            await wait_until(lambda: gw.recorder is not None and len(recorded(gw)) >= seqs[-1])
            disk = recorded(gw)
            assert all(f["raw"] == disk[f["seq"]] for f in frames)


async def test_from_seq_match_time_and_ut_read_from_disk_until_the_end(tmp_path: Path) -> None:
    """The memory history holds 50 frames: these replays start on disk, go on through the
    history, and end with the newest frame held when they get there (1000/s catches up
    with the 100 Hz feed)."""
    with trio.fail_after(90):
        async with recorded_gateway(tmp_path) as (_, gw):
            topic = await frames_held(gw, 400)
            await wait_until(lambda: gw.recorder is not None and len(recorded(gw)) >= 400)
            disk = recorded(gw)
            ut0 = field(disk[1], "ut")
            assert field(disk[1], "ix") == 0 and topic.first_held > 300
            async with open_websocket_url(stream_url(gw)) as ws:
                for start, first in (
                    ({"seq": 120}, 120),
                    # At 100 Hz in phase 1: mt 1500 is ix 150 (seq 151).
                    ({"phase": 1, "mt": 1500}, 151),
                    ({"ut": ut0 + 2345}, 1 + 235),
                ):
                    await replay(ws, 1000, start=start)
                    started = await expect(ws, "replay_started")
                    assert (started["from_seq"], started["epoch"]) == (first, topic.epoch)
                    frames, end = await replay_to_end(ws)
                    seqs = [f["seq"] for f in frames]
                    assert seqs == list(range(first, first + len(seqs))), start
                    assert end["reason"] == "end" and end["last_seq"] == seqs[-1]
                    assert seqs[-1] >= 400
                    await wait_until(lambda s=seqs[-1]: len(recorded(gw)) >= s)
                    disk = recorded(gw)
                    assert all(f["raw"] == disk[f["seq"]] for f in frames)
                    head = frames[0]["raw"]
                    before = disk[first - 1]
                    if "mt" in start:
                        assert field(head, "ph") == 1 and field(head, "mt") >= 1500
                        assert field(before, "mt") < 1500
                    if "ut" in start:
                        assert field(head, "ut") >= ut0 + 2345 > field(before, "ut")


async def test_looped_starts_again_at_the_first_frame(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with recorded_gateway(tmp_path) as (_, gw):
            topic = await frames_held(gw, 200)
            first = topic.seq - 30
            async with open_websocket_url(stream_url(gw)) as ws:
                await replay(ws, 1000, looped=True, start={"seq": first})
                started = await expect(ws, "replay_started")
                assert (started["from_seq"], started["looped"]) == (first, True)
                seqs: list[int] = []
                while True:
                    msg, _ = await message(ws)
                    if msg["type"] == "replay_loop":
                        break
                    assert msg["type"] == "replay_frame", msg
                    seqs.append(msg["seq"])
                assert msg == {"type": "replay_loop", "feed": "tracking", "fixture": FX, "pass": 2}
                assert seqs == list(range(first, first + len(seqs)))
                again = await expect(ws, "replay_frame")
                assert again["seq"] == first
                await send(ws, op="stop_replay", feed="tracking", fixture=FX)
                rest, end = await replay_to_end(ws)
                assert (end["reason"], end["last_seq"]) == ("stopped", (rest or [again])[-1]["seq"])


@pytest.mark.parametrize("write_delay", [0, 5])
async def test_a_live_subscription_and_a_replay_of_the_same_fixture_on_one_connection(
    tmp_path: Path, write_delay: int
) -> None:
    """Both whole and in order, on a plain connection and on one with ``write_delay`` (whose
    live frames are written in batches, and in a batch group while it has no replay)."""
    with trio.fail_after(60):
        async with recorded_gateway(tmp_path) as (_, gw):
            await frames_held(gw, 100)
            url = stream_url(gw, f"/v1/stream?write_delay={write_delay}")
            async with open_websocket_url(url) as ws:
                await send(ws, op="subscribe", feed="tracking", fixture=FX)
                subscribed = await expect(ws, "subscribed")
                await expect(ws, "status")
                await replay(ws, 40)
                live: list[int] = []
                replayed: list[dict[str, Any]] = []
                started = False
                while len(replayed) < 80:
                    msg, raw = await message(ws)
                    if msg["type"] == "frame":
                        live.append(msg["seq"])
                    elif msg["type"] == "replay_started":
                        started = True
                    else:
                        assert started and msg["type"] == "replay_frame", msg
                        msg["raw"] = _data(raw)
                        replayed.append(msg)
            # Each stream whole and in order, neither mistaken for the other.
            assert live == list(range(subscribed["seq"] + 1, subscribed["seq"] + 1 + len(live)))
            assert len(live) >= 100  # 2 s of the 100 Hz feed beside 80 replayed frames
            assert [f["seq"] for f in replayed] == list(range(1, 81))
            disk = recorded(gw)
            assert all(f["raw"] == disk[f["seq"]] for f in replayed)


async def test_a_replay_its_client_does_not_read_waits_then_ends_slow_consumer(
    tmp_path: Path,
) -> None:
    """The client reads nothing (a 4 KB receive buffer): the replay fills its budget, waits
    ``stall_timeout``, and ends with ``slow_consumer``; the frames it left unread are dropped,
    the connection stays open and serves the next request."""
    with trio.fail_after(90):
        async with recorded_gateway(
            tmp_path, replay={"queue_bytes": 65536, "stall_timeout": 1.0}
        ) as (_, gw):
            await frames_held(gw, 100)
            assert gw.bound is not None
            raw = await RawClient.connect(gw.bound.stream, rcvbuf=4096)
            try:
                await raw.send_json(
                    {
                        "op": "replay",
                        "feed": "tracking",
                        "fixture": FX,
                        "rate": 1000,
                        "looped": True,
                    }
                )
                # Reading nothing until the gateway has ended the replay as too slow.
                await wait_until(lambda: gw.replays.counters.slow_consumers == 1, 60)
                passes: list[list[int]] = [[]]
                while True:
                    frame = await raw.read_frame()
                    assert frame is not None
                    msg = orjson.loads(frame[1])
                    if msg["type"] == "replay_frame":
                        passes[-1].append(msg["seq"])
                    elif msg["type"] == "replay_loop":
                        passes.append([])
                    elif msg["type"] == "replay_end":
                        break
                    else:
                        assert msg["type"] in ("replay_started", "heartbeat"), msg
                assert (msg["reason"], msg["last_seq"]) == ("slow_consumer", passes[-1][-1])
                for seqs in passes:
                    assert seqs == list(range(1, len(seqs) + 1))
                await raw.send_json({"op": "stop_replay", "feed": "tracking", "fixture": FX})
                frame = await raw.read_frame()
                assert frame is not None
                assert orjson.loads(frame[1])["message"] == f"not replaying tracking/{FX}"
            finally:
                raw.close()


async def error_beside_replay(ws: WebSocketConnection) -> str:
    """The next ``error`` message, skipping the frames of a replay that runs meanwhile."""
    while True:
        msg, _ = await message(ws)
        if msg["type"] != "replay_frame":
            assert msg["type"] == "error", msg
            text: str = msg["message"]
            return text


BAD_REPLAYS: list[tuple[dict[str, Any], str]] = [
    ({"fixture": FX, "rate": 40}, "missing field 'feed'"),
    ({"feed": "tracking", "rate": 40}, "missing field 'fixture'"),
    ({"feed": "tracking", "fixture": FX}, "missing field 'rate'"),
    ({"feed": "tracking", "fixture": FX, "rate": 40, "speed": 2}, "unknown field 'speed'"),
    *(
        ({"feed": "tracking", "fixture": FX, "rate": rate}, "rate must be an integer 1 to 1000")
        for rate in (0, 1001, 40.0, True, "40", None, -5)
    ),
    ({"feed": "tracking", "fixture": FX, "rate": 40, "looped": 1}, "looped must be true or false"),
    *(
        (
            {"feed": "tracking", "fixture": FX, "rate": 40, "from": start},
            "from must have exactly one of seq, phase+mt, ut",
        )
        for start in ({}, {"seq": 1, "ut": 5}, {"phase": 1}, {"mt": 5}, 5, [1], {"ix": 3})
    ),
    (
        {"feed": "tracking", "fixture": FX, "rate": 40, "from": {"seq": 0}},
        "from.seq must be an integer >= 1",
    ),
    (
        {"feed": "tracking", "fixture": FX, "rate": 40, "from": {"seq": True}},
        "from.seq must be an integer >= 1",
    ),
    (
        {"feed": "tracking", "fixture": FX, "rate": 40, "from": {"ut": -1}},
        "from.ut must be an integer >= 0 (unix time in ms)",
    ),
    (
        {"feed": "tracking", "fixture": FX, "rate": 40, "from": {"phase": 1, "mt": 1.5}},
        "from.mt must be an integer >= 0 (match time in ms)",
    ),
    (
        {"feed": "tracking", "fixture": FX, "rate": 40, "from": {"phase": "1", "mt": 0}},
        "from.phase must be an integer >= 0",
    ),
    ({"feed": "nosuch", "fixture": FX, "rate": 40}, "unknown feed 'nosuch'"),
    (
        {"feed": "actions", "fixture": FX, "rate": 40, "from": {"phase": 1, "mt": 0}},
        "from phase+mt needs a tracking feed; 'actions' is not",
    ),
]


async def test_bad_requests_answered_and_starts_not_held_refused(tmp_path: Path) -> None:
    """Without a recorder the memory history (200 frames) no longer reaches the first frame:
    a replay from the start is refused, one from a seq still held runs. Every bad request gets
    its ``error``, a replay never starts from one, and the connection stays usable."""
    with trio.fail_after(60):
        async with recorded_gateway(
            tmp_path,
            fixtures=(FX, FX2),
            recorder=False,
            history=200,
            replay={"max_per_connection": 1},
        ) as (_, gw):
            topic = await frames_held(gw, 400)
            topic2 = await frames_held(gw, 400, FX2)
            async with open_websocket_url(stream_url(gw)) as ws:
                for request, error in BAD_REPLAYS:
                    await send(ws, op="replay", **request)
                    reply = await expect(ws, "error")
                    assert reply["message"] == error, request
                await send(ws, op="stop_replay", feed="tracking", fixture=FX)
                assert (await expect(ws, "error"))["message"] == f"not replaying tracking/{FX}"
                await send(ws, op="stop_replay", feed="tracking", fixture=FX, now=True)
                assert (await expect(ws, "error"))["message"] == "unknown field 'now'"
                await send(ws, op="replays")
                assert (await expect(ws, "error"))["message"] == (
                    "unknown op 'replays': expected subscribe, unsubscribe, replay or stop_replay"
                )
                await replay(ws, 40)
                refused = await expect(ws, "error")
                assert refused["message"] == f"no recording reaches the start of tracking/{FX}"
                await replay(ws, 40, fixture="not-followed")
                refused = await expect(ws, "error")
                assert refused["message"] == (
                    "no recording reaches the start of tracking/not-followed"
                )
                first = topic.seq - 100  # held for a second more; the replay's first
                # batch then holds about 90 frames: at 1 a second it runs for the test's length
                await replay(ws, 1, start={"seq": first})
                started = await expect(ws, "replay_started")
                assert started["from_seq"] == first
                await replay(ws, 1, start={"seq": first})
                assert await error_beside_replay(ws) == f"already replaying tracking/{FX}"
                await replay(ws, 1, fixture=FX2, start={"seq": topic2.seq - 100})
                assert await error_beside_replay(ws) == (
                    "too many replays on this connection (max_per_connection 1)"
                )
                counters = gw.replays.counters
                assert counters.refused["not_held"] == 2
                assert counters.refused["max_per_connection"] == 1
                assert counters.active["memory"] == 1


async def test_a_replay_needs_the_same_feed_access_as_a_subscription(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path, f"{ACTIONS_ONLY} actions\n")
    with trio.fail_after(60):
        async with recorded_gateway(tmp_path, subscribers={"tokens_file": str(tokens)}) as (_, gw):
            await frames_held(gw, 10)
            async with open_websocket_url(stream_url(gw), extra_headers=bearer(ACTIONS_ONLY)) as ws:
                await replay(ws, 40)
                refused = await expect(ws, "error")
                assert refused["message"] == "feed 'tracking' is not allowed for this subscriber"
                assert gw.replays.counters.total.total() == 0


ISOLATION_REPLAYS = 20
ISOLATION_RATE = 100
ISOLATION_WINDOW = 6.0


async def _drain(client: RawClient, counted: list[int]) -> None:
    """Read and drop what a replay's connection gets (bytes counted), as fast as it comes."""
    while data := await client.sock.recv(65536):
        counted[0] += len(data)


async def _worst_gap(ws: WebSocketConnection, seconds: float, last_seq: int) -> tuple[float, int]:
    """The longest time between two live frames over *seconds*, checking they are contiguous
    from *last_seq* + 1; (worst gap, last seq)."""
    worst = 0.0
    last: float | None = None
    with trio.move_on_after(seconds):
        while True:
            msg, _ = await message(ws)
            now = trio.current_time()
            if msg["type"] != "frame":
                assert msg["type"] == "status", msg
                continue
            assert msg["seq"] == last_seq + 1
            last_seq = msg["seq"]
            if last is not None:
                worst = max(worst, now - last)
            last = now
    return worst, last_seq


async def test_live_subscribers_worst_gap_with_and_without_20_replays(tmp_path: Path) -> None:
    """A live subscriber of a 25 Hz fixture, measured over 6 s alone and then beside 20 looped
    replays of the same fixture from its first frame (from disk: the history holds 50 frames),
    100 frames a second each (2,000 replayed frames a second, read by 20 raw sockets). Its
    frames stay contiguous and its worst gap stays far below a broken value (a replay that
    held the event loop while reading, or wrote through the live queue, would stretch it to
    seconds): generous bound 1 s; healthy about 0.1 s (the numbers are printed)."""
    with trio.fail_after(120):
        async with recorded_gateway(tmp_path, rate_hz=25.0) as (_, gw):
            assert gw.bound is not None
            await frames_held(gw, 100)
            # Both ends of every connection live in this process: frozen, the startup objects
            # are not rescanned by full collections (which take a while here, whenever).
            gc.collect()
            gc.freeze()
            try:
                async with (
                    open_websocket_url(stream_url(gw)) as ws,
                    trio.open_nursery() as nursery,
                ):
                    await send(ws, op="subscribe", feed="tracking", fixture=FX)
                    last = (await expect(ws, "subscribed"))["seq"]
                    alone, last = await _worst_gap(ws, ISOLATION_WINDOW, last)
                    counted = [0]
                    for _ in range(ISOLATION_REPLAYS):
                        client = await RawClient.connect(gw.bound.stream)
                        await client.send_json(
                            {
                                "op": "replay",
                                "feed": "tracking",
                                "fixture": FX,
                                "rate": ISOLATION_RATE,
                                "looped": True,
                            }
                        )
                        nursery.start_soon(_drain, client, counted)
                    active = gw.replays.counters.active
                    await wait_until(lambda: active["recording"] == ISOLATION_REPLAYS)
                    before = counted[0]
                    beside, last = await _worst_gap(ws, ISOLATION_WINDOW, last)
                    replayed = counted[0] - before
                    nursery.cancel_scope.cancel()
            finally:
                gc.unfreeze()
            print(
                f"live worst gap: alone {alone * 1000:.0f} ms, beside {ISOLATION_REPLAYS} "
                f"replays at {ISOLATION_RATE}/s {beside * 1000:.0f} ms "
                f"({replayed / ISOLATION_WINDOW / 1e6:.1f} MB/s replayed)"
            )
            assert replayed > 0
            assert alone < 1.0 and beside < 1.0, (alone, beside)


async def test_a_replay_stopped_before_it_began_ends_with_nothing_after(tmp_path: Path) -> None:
    """``replay`` and ``stop_replay`` in one read: ``replay_end`` ``stopped`` (``last_seq``
    0), and nothing of that replay after it, not even the refusal its start would have got."""
    with trio.fail_after(60):
        async with recorded_gateway(tmp_path) as (_, gw):
            await frames_held(gw, 10)
            assert gw.bound is not None
            raw = await RawClient.connect(gw.bound.stream)
            try:
                both = b"".join(
                    mask_frame(orjson.dumps(request))
                    for request in (
                        {"op": "replay", "feed": "tracking", "fixture": "gone", "rate": 5},
                        {"op": "stop_replay", "feed": "tracking", "fixture": "gone"},
                        {"op": "stop_replay", "feed": "tracking", "fixture": "gone"},
                    )
                )
                await raw.send_all(both)
                replies = []
                for _ in range(2):
                    frame = await raw.read_frame()
                    assert frame is not None
                    replies.append(orjson.loads(frame[1]))
                assert replies[0] == {
                    "type": "replay_end",
                    "feed": "tracking",
                    "fixture": "gone",
                    "reason": "stopped",
                    "last_seq": 0,
                }
                # The second stop_replay found nothing to stop.
                assert replies[1]["message"] == "not replaying tracking/gone"
                # One more request, once the replay's task has had its turn: its answer is
                # the next message (the refusal of the stopped replay never comes).
                await raw.send_json({"op": "stop_replay", "feed": "tracking", "fixture": "x"})
                frame = await raw.read_frame()
                assert frame is not None
                assert orjson.loads(frame[1])["message"] == "not replaying tracking/x"
                assert gw.replays.counters.refused.total() == 0
            finally:
                raw.close()


async def test_a_replay_the_memory_history_outruns_ends_source_lost(tmp_path: Path) -> None:
    """No recorder, a history of 200 frames of a 100 Hz feed: a replay at 20 a second from
    the middle of it is overtaken (the history turns over five times as fast as it reads): it
    ends with ``source_lost`` after the last frame it could send, every frame before in order."""
    with trio.fail_after(60):
        async with recorded_gateway(tmp_path, recorder=False, history=200) as (_, gw):
            topic = await frames_held(gw, 300)
            first = topic.first_held + 100  # still held a second from now
            async with open_websocket_url(stream_url(gw)) as ws:
                await replay(ws, 20, start={"seq": first})
                assert (await expect(ws, "replay_started"))["from_seq"] == first
                frames, end = await replay_to_end(ws)
            seqs = [f["seq"] for f in frames]
            assert seqs == list(range(first, first + len(seqs)))
            assert (end["reason"], end["last_seq"]) == ("source_lost", seqs[-1])
