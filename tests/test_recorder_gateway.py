"""The recorder inside a whole gateway: the match from disk, downloads, restart continuity.

- ``backfill: -1`` after 10,000 frames with ``history = 100`` streams every frame from disk,
  then the live ones, with no gap and no duplicate, inside ``queue_bytes``; a resume older than
  the history is recovered from disk; the download equals what the subscriber received, byte
  for byte; ``/v1/recordings`` lists it.
- A gateway restarted on the same directory keeps each topic's epoch and seq: a subscriber
  resuming with ``after`` + ``epoch`` is recovered with nothing lost or repeated (tracking
  ``ix`` continuous across the restart: the upstream backfilled from the recorded ix), and the
  fastpath upstream reconnects with ``startPosition`` = the recorded position.
- A segment swapped for a link to a file outside: the download never serves it; after a
  restart the fixture is listed as refused (``stopped`` with the reason) and counted.
- The simulator serves a recording the gateway made (its directory, or a download saved to a
  file), and a gateway following that replay records the same frames, byte for byte.

Real files in temp dirs, real sockets on 127.0.0.1 port 0, one ``trio.fail_after`` each.
"""

from __future__ import annotations

import http.client
import socket
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio
import trio_websocket
import zstandard

from gateway.config import Config, FixtureConfig
from gateway.recorder import encode, read_recording
from gateway.service import Gateway, RecordedTopic
from gateway.simulator import Simulator, load_recording
from tests.conftest import TEST_TOKEN
from tests.kit import (
    gateway_config,
    http_get,
    http_url,
    next_of_type,
    running_gateway,
    stream_url,
    wait_until,
)

FX = "5501b26a-1c44-4c3b-9ff5-9322084d41f9"
FP = "2ed1cba1-7c3e-4b5e-9a51-0d1f1c2b3a4d"
DATA_KEY = b',"data":'


def _data(message: bytes) -> bytes:
    """The frame inside an envelope, byte for byte (the envelope inserts it verbatim)."""
    return message[message.index(DATA_KEY) + len(DATA_KEY) : -1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _frame(i: int) -> str:
    # Bytes that re-serialising would change: spacing, a float's digits, a non-ASCII text.
    return f'{{"ix": {i}, "mt": 1.10, "name": "Ödegaard", "pad": "{"x" * (i % 50)}"}}'


async def test_the_whole_match_from_disk_then_live_and_the_download(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TEST_TOKEN)
    config = gateway_config(
        _closed_port(),  # no upstream: the test publishes into the fixture's sink itself
        tmp_path / "token",
        [("tracking", FX)],
        feeds={"tracking": {"history": 100}},
        subscribers={"queue_bytes": 64 * 1024},
        recorder={"dir": str(tmp_path / "rec"), "segment_bytes": 64 * 1024},
    )
    total = 10_000
    with trio.fail_after(120):
        async with running_gateway(config) as gw:
            recorder = gw.recorder
            assert recorder is not None
            topic = gw.hub.get("tracking", FX)
            log = recorder.get("tracking", FX)
            assert topic is not None and log is not None
            sink = RecordedTopic(topic, recorder, log)
            for i in range(1, total + 1):
                sink.publish(_frame(i), i)
                if i % 1000 == 0:  # a batch per 1,000: segments rotate between them
                    await wait_until(lambda i=i: log.written_seq == i, timeout=60)
            assert topic.history_len == 100 and topic.first_held == total - 99
            assert len(log.segments) >= 2  # rotated: the backfill crosses segments

            received: list[bytes] = []
            async with trio_websocket.open_websocket_url(
                stream_url(gw), max_message_size=1 << 20
            ) as ws:
                sub = {"op": "subscribe", "feed": "tracking", "fixture": FX, "backfill": -1}
                await ws.send_message(orjson.dumps(sub).decode())
                subscribed = await next_of_type(ws, "subscribed")
                assert (subscribed["seq"], subscribed["recovered"]) == (total, False)
                while len(received) < total:
                    msg = await ws.get_message()
                    raw = msg.encode() if isinstance(msg, str) else msg
                    if raw.startswith(b'{"type":"frame"'):
                        received.append(raw)
                    if len(received) % 1000 == 0:
                        # A slow reader: whatever the backfill, the queue stays in budget.
                        (view,) = gw.subscriber_views()
                        assert view.queued_bytes <= 64 * 1024
                        await trio.sleep(0.01)
                # Live frames follow the disk and the history with no gap.
                for i in range(total + 1, total + 6):
                    sink.publish(_frame(i), i)
                while len(received) < total + 5:
                    msg = await ws.get_message()
                    raw = msg.encode() if isinstance(msg, str) else msg
                    if raw.startswith(b'{"type":"frame"'):
                        received.append(raw)
            seqs = [orjson.loads(m)["seq"] for m in received]
            assert seqs == list(range(1, total + 6))
            assert [_data(m) for m in received] == [_frame(i).encode() for i in range(1, total + 6)]

            # A resume older than the history, from disk.
            async with trio_websocket.open_websocket_url(stream_url(gw)) as ws:
                sub = {
                    "op": "subscribe",
                    "feed": "tracking",
                    "fixture": FX,
                    "after": 4000,
                    "epoch": topic.epoch,
                }
                await ws.send_message(orjson.dumps(sub).decode())
                assert (await next_of_type(ws, "subscribed"))["recovered"] is True
                first = await next_of_type(ws, "frame")
                assert first["seq"] == 4001 and first["data"]["ix"] == 4001

            await wait_until(lambda: log.written_seq == total + 5)
            status, body = await http_get(http_url(gw, f"/v1/fixtures/tracking/{FX}/recording"))
            assert status == 200
            lines = body.splitlines()
            assert [orjson.loads(line)["seq"] for line in lines] == list(range(1, total + 6))
            assert [_data(line) for line in lines] == [_data(m) for m in received]
            status, body = await http_get(
                http_url(gw, f"/v1/fixtures/tracking/{FX}/recording?after=9990&limit=3")
            )
            assert [orjson.loads(line)["seq"] for line in body.splitlines()] == [9991, 9992, 9993]

            status, body = await http_get(http_url(gw, "/v1/recordings"))
            (listed,) = orjson.loads(body)
            assert (listed["feed"], listed["fixture"], listed["state"]) == (
                "tracking",
                FX,
                "recording",
            )
            assert (listed["first_seq"], listed["last_seq"]) == (1, total + 5)
            assert listed["bytes"] > 0 and listed["frames_dropped"] == 0
            assert listed["first_time"] <= listed["last_time"]
            status, body = await http_get(http_url(gw, f"/v1/fixtures/tracking/{FX}"))
            assert orjson.loads(body)["recording"]["last_seq"] == total + 5


def _seq(gw: Gateway, feed: str, fixture: str) -> int:
    topic = gw.hub.get(feed, fixture)
    return 0 if topic is None else topic.seq


def _written(gw: Gateway, feed: str, fixture: str) -> int:
    log = None if gw.recorder is None else gw.recorder.get(feed, fixture)
    return 0 if log is None else log.written_seq


def _config(tmp_path: Path, sim_port: int) -> Config:
    return gateway_config(
        sim_port,
        tmp_path / "token",
        [("tracking", FX), ("actions", FP)],
        recorder={"dir": str(tmp_path / "rec")},
    )


async def _subscribe(
    ws: trio_websocket.WebSocketConnection, feed: str, fixture: str, **extra: Any
) -> dict[str, Any]:
    await ws.send_message(
        orjson.dumps({"op": "subscribe", "feed": feed, "fixture": fixture, **extra}).decode()
    )
    return await next_of_type(ws, "subscribed")


async def test_a_restart_keeps_epoch_and_seq_and_resumes_the_upstream(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TEST_TOKEN)
    sim = Simulator(tokens={TEST_TOKEN}, rate_hz=50.0, heartbeat_interval=1.0, action_interval=0.1)
    sim.add_fixture(FX, kind="tracking")
    sim.add_fixture(FP, kind="fastpath")
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(sim.serve, "127.0.0.1", 0)
            config = _config(tmp_path, port)
            ix_of: dict[int, int] = {}
            async with running_gateway(config) as gw:
                async with trio_websocket.open_websocket_url(stream_url(gw)) as ws:
                    first = await _subscribe(ws, "tracking", FX)
                    epoch = first["epoch"]
                    while len(ix_of) < 40:
                        frame = await next_of_type(ws, "frame")
                        ix_of[frame["seq"]] = frame["data"]["ix"]
                await wait_until(lambda: _seq(gw, "actions", FP) >= 5)
                await gw.drain()
            after = max(ix_of)
            recorded = list(read_recording(tmp_path / "rec" / "actions" / FP))
            position = max(r.position for r in recorded if r.position is not None)

            sim.attempts.clear()
            async with running_gateway(config) as gw:
                topic = gw.hub.get("tracking", FX)
                assert topic is not None and topic.epoch == epoch and topic.seq >= after
                async with trio_websocket.open_websocket_url(stream_url(gw)) as ws:
                    again = await _subscribe(ws, "tracking", FX, after=after, epoch=epoch)
                    assert (again["recovered"], again["epoch"]) == (True, epoch)
                    seqs: list[int] = []
                    while len(seqs) < 100:  # from disk, then live frames of the new run
                        frame = await next_of_type(ws, "frame")
                        seqs.append(frame["seq"])
                        # The same frame under the same seq: the upstream resumed at the
                        # recorded ix and the vendor's backfill covered the restart.
                        assert frame["data"]["ix"] == ix_of[after] + frame["seq"] - after
                    assert seqs == list(range(after + 1, after + 101))
                fastpath = [a for a in sim.attempts if a.fixture_id == FP]
                query = urllib.parse.urlsplit(fastpath[0].path).query
                assert urllib.parse.parse_qs(query)["startPosition"] == [str(position)]
                await wait_until(lambda: _seq(gw, "actions", FP) >= len(recorded) + 3)
                await gw.drain()
            nursery.cancel_scope.cancel()
    # Every action of the match once, in order, across the restart.
    ids = [
        orjson.loads(r.raw)["fixtureAction"]["actionId"]
        for r in read_recording(tmp_path / "rec" / "actions" / FP)
        if r.position is not None
    ]
    expected = [sim.fixtures[FP].script.action(k) for k in range(len(ids))]
    assert ids == [orjson.loads(a.text(1))["fixtureAction"]["actionId"] for a in expected]


async def test_the_simulator_replays_a_recording_and_the_gateway_reproduces_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "token").write_text(TEST_TOKEN)
    replayed = "replayed-match"
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            original = Simulator(tokens={TEST_TOKEN}, rate_hz=200.0, heartbeat_interval=1.0)
            original.add_fixture(FX, kind="tracking")
            port = await nursery.start(original.serve, "127.0.0.1", 0)
            config = gateway_config(
                port, tmp_path / "token", [("tracking", FX)], recorder={"dir": str(tmp_path / "a")}
            )
            async with running_gateway(config) as gw:
                await wait_until(lambda: _written(gw, "tracking", FX) >= 150)
                _, download = await http_get(http_url(gw, f"/v1/fixtures/tracking/{FX}/recording"))
                await gw.drain()
            made = [r.raw for r in read_recording(tmp_path / "a" / "tracking" / FX)]
            assert len(made) >= 150

            # The recorder's directory, served as a fixture of another simulator.
            replay = Simulator(tokens={TEST_TOKEN}, rate_hz=200.0, heartbeat_interval=1.0)
            replay.add_fixture(
                replayed, kind="tracking", recording=tmp_path / "a" / "tracking" / FX
            )
            port = await nursery.start(replay.serve, "127.0.0.1", 0)
            config = attrs.evolve(
                gateway_config(port, tmp_path / "token", [], recorder={"dir": str(tmp_path / "b")}),
                fixtures=(FixtureConfig(feed="tracking", id=replayed, backfill=-1),),
            )
            async with running_gateway(config) as gw:
                await wait_until(
                    lambda: _written(gw, "tracking", replayed) >= len(made), timeout=60
                )
                await gw.drain()
            nursery.cancel_scope.cancel()
    again = [r.raw for r in read_recording(tmp_path / "b" / "tracking" / replayed)]
    assert again == made  # the same frames, byte for byte, in the same order
    # A download saved to a file replays too (the simulator reads record lines).
    saved = tmp_path / "download.jsonl"
    saved.write_bytes(download)
    assert [f.encode() for f in load_recording(saved)] == made[: len(download.splitlines())]


async def test_downloads_and_listings_never_read_through_a_planted_link(tmp_path: Path) -> None:
    """A closed segment swapped for a link to another recording outside the directory: the
    download never serves its lines (it is cut short); after a restart the fixture is refused,
    shown as such (listing, metrics), and its download is empty; the file outside is never
    changed."""
    (tmp_path / "token").write_text(TEST_TOKEN)
    root = tmp_path / "rec"
    config = gateway_config(
        _closed_port(),  # no upstream: the test publishes into the fixture's sink itself
        tmp_path / "token",
        [("tracking", FX)],
        recorder={"dir": str(root), "segment_bytes": 64 * 1024},
    )
    secret = tmp_path / "outside" / "secret.jsonl.zst"
    secret.parent.mkdir()
    secret.write_bytes(
        zstandard.ZstdCompressor().compress(
            b"".join(encode(i, i, 1.0, b'{"ix": %d, "SECRET": 1}' % i) for i in range(1, 2001))
        )
    )
    kept = secret.read_bytes()
    url = f"/v1/fixtures/tracking/{FX}/recording"
    with trio.fail_after(90):
        async with running_gateway(config) as gw:
            recorder = gw.recorder
            topic = gw.hub.get("tracking", FX)
            assert recorder is not None and topic is not None
            log = recorder.get("tracking", FX)
            assert log is not None
            sink = RecordedTopic(topic, recorder, log)
            for i in range(1, 1001):
                sink.publish(_frame(i), i)
            await wait_until(lambda: log.written_seq == 1000)
            sink.publish(_frame(1001), 1001)  # past segment_bytes: a second segment
            await wait_until(lambda: bool(log.segments) and log.segments[0].compressed)
            first = root / "tracking" / FX / log.segments[0].name
            first.unlink()
            first.symlink_to(secret)

            complete, body = await _download(http_url(gw, url))
            assert b"SECRET" not in body and not complete
        assert secret.read_bytes() == kept

        async with running_gateway(config) as gw:
            status, body = await http_get(http_url(gw, "/v1/recordings"))
            (listed,) = orjson.loads(body)
            assert (listed["fixture"], listed["state"]) == (FX, "stopped")
            assert "is a symlink" in listed["reason"] and listed["last_seq"] == 0
            status, body = await http_get(http_url(gw, url))
            assert (status, body) == (200, b"")  # followed, nothing recorded: nothing read
            status, body = await http_get(http_url(gw, "/metrics"))
            assert b'dde_recorder_fixtures{state="stopped"} 1.0' in body
    assert secret.read_bytes() == kept and first.is_symlink()


async def _download(url: str) -> tuple[bool, bytes]:
    """GET *url*: (whether the body came whole, the bytes that came)."""

    def fetch() -> tuple[bool, bytes]:
        with urllib.request.urlopen(url, timeout=30) as resp:
            try:
                return True, resp.read()
            except http.client.IncompleteRead as exc:
                return False, exc.partial

    return await trio.to_thread.run_sync(fetch)
