"""The recorder in a cluster (docs/cluster.md, "The recorder in a cluster"): each instance
records what it serves, owned or relayed, under the cluster's epoch and seq.

Two real gateways in this process (the harness of tests/test_cluster_gateway.py), one real
redis-server, the simulator; each instance has its own recorder directory under tmp_path. The
stream and the memory history are kept short (``stream_maxlen`` 100, ``history`` 50), so the
whole match can only come from an instance's own disk. Every wait is a condition with a
deadline; everything binds 127.0.0.1 port 0.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from gateway.config import RecorderSection
from gateway.hub import Hub
from gateway.recorder import Record, Recorder, decode, read_recording
from gateway.service import ClusterRecording
from tests.kit import gateway_config, http_get, http_url, wait_until
from tests.redis_kit import RedisServer
from tests.test_cluster_gateway import (
    Member,
    Subscriber,
    assert_contiguous,
    cluster_of,
    http_call,
    ranked,
    tracking,
)

FX = ranked(1, "gw-a", prefix="rec")[0]
STREAM_MAXLEN = 100
HISTORY = 50
SECTIONS: dict[str, Any] = {
    "feeds": {"tracking": {"history": HISTORY}},
    "cluster": {"stream_maxlen": STREAM_MAXLEN},
}


def recorder_of(root: Path, name: str) -> dict[str, Any]:
    return {"recorder": {"dir": str(root / f"rec-{name}"), "segment_bytes": 64 * 1024}}


def recorded(root: Path, name: str) -> list[Record]:
    return list(read_recording(root / f"rec-{name}" / "tracking" / FX))


def meta(root: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(
        (root / f"rec-{name}" / "tracking" / FX / "meta.json").read_bytes()
    )
    return data


def written(member: Member) -> int:
    recorder = member.gw.recorder
    assert recorder is not None
    lg = recorder.get("tracking", FX)
    return 0 if lg is None else lg.written_seq


def seqs_of(records: list[Record]) -> list[int]:
    return [r.seq for r in records]


def ix_of(raw: bytes) -> int:
    value = orjson.loads(raw)["ix"]
    assert isinstance(value, int)
    return value


async def test_every_instance_records_the_match_under_the_clusters_numbering(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Owner and relay both record every frame once, with the cluster's seq and epoch; a
    subscriber of the relay asking ``backfill: -1`` gets the whole match from that instance's
    disk, once and in order, then live; the download works on each instance."""
    # A history of 200: the relay joins (and records) before the match passes it.
    sections = {**SECTIONS, "feeds": {"tracking": {"history": 200}}}
    with trio.fail_after(90):
        async with cluster_of(tmp_path, redis_server, tracking([FX]), rate_hz=100, **sections) as c:
            # The vendor holds its frames until both instances run: the match starts with both.
            c.sim.faults(FX).stall = True
            a = await c.start("gw-a", **recorder_of(tmp_path, "a"))
            b = await c.start("gw-b", **recorder_of(tmp_path, "b"))
            await wait_until(lambda: a.owns(FX), 20)
            c.sim.faults(FX).stall = False
            await wait_until(lambda: b.epoch(FX) == a.epoch(FX) and b.seq(FX) > 0, 20)
            # Far past the stream (about 100) and the history (200) of both instances.
            await wait_until(lambda: min(written(a), written(b)) >= 6 * STREAM_MAXLEN, 40)
            topic = b.gw.hub.get("tracking", FX)
            assert topic is not None and topic.first_held > STREAM_MAXLEN
            # The stream no longer has the match's start: only a disk can give it.
            oldest = redis_server.call("XRANGE", f"dde:stream:tracking/{FX}", "-", "+", "COUNT", 1)
            assert isinstance(oldest, list) and oldest, oldest
            entry = oldest[0]
            assert isinstance(entry, list) and isinstance(entry[0], bytes), entry
            assert int(entry[0].split(b"-")[0]) > 1, entry[0]
            async with trio.open_nursery() as nursery:
                on_b = await Subscriber.open(nursery, b)
                reply = await on_b.subscribe("tracking", FX, backfill=-1)
                assert reply["epoch"] == a.epoch(FX)
                live_from = reply["seq"] + 30
                await wait_until(
                    lambda: bool(on_b.frames[FX]) and on_b.frames[FX][-1][0] >= live_from, 30
                )
                await on_b.close()
            frames = on_b.frames[FX]
            assert frames[0][0] == 1, frames[:3]
            assert_contiguous(frames, "backfill -1 on the relay")
            assert not on_b.gaps and not on_b.errors

            for member in (a, b):
                status, body = await http_get(
                    http_url(member.gw, f"/v1/fixtures/tracking/{FX}/recording")
                )
                assert status == 200, (member.name, status)
                lines = [decode(line) for line in body.splitlines(keepends=True)]
                assert seqs_of(lines) == list(range(1, len(lines) + 1)), member.name
                assert len(lines) >= 6 * STREAM_MAXLEN
            epoch = a.epoch(FX)
            await c.stop(b)
            await c.stop(a)
    on_a, on_b_disk = recorded(tmp_path, "a"), recorded(tmp_path, "b")
    for name, records in (("a", on_a), ("b", on_b_disk)):
        assert seqs_of(records) == list(range(1, len(records) + 1)), name
        assert [ix_of(r.raw) for r in records] == [r.position for r in records], name
        assert meta(tmp_path, name)["epoch"] == epoch, name
    common = min(len(on_a), len(on_b_disk))
    assert [r.raw for r in on_a[:common]] == [r.raw for r in on_b_disk[:common]]


async def test_an_instance_that_joins_late_records_from_its_join(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """An instance that joins mid-match records what it serves from then on (it does not copy
    the whole stream in its first round); its ``backfill: -1`` takes the older frames from the
    stream while it has them, then its own disk, then live: once each, in order."""
    sections = {**SECTIONS, "cluster": {"stream_maxlen": 5000}}
    with trio.fail_after(90):
        async with cluster_of(tmp_path, redis_server, tracking([FX]), rate_hz=100, **sections) as c:
            a = await c.start("gw-a", **recorder_of(tmp_path, "a"))
            await wait_until(lambda: written(a) >= 4 * HISTORY, 30)
            b = await c.start("gw-b", **recorder_of(tmp_path, "b"))
            await wait_until(lambda: b.seq(FX) > 0, 20)
            joined = b.seq(FX)
            await wait_until(lambda: written(b) >= joined + 3 * HISTORY, 30)
            recorder = b.gw.recorder
            assert recorder is not None
            lg = recorder.get("tracking", FX)
            assert lg is not None
            assert 1 < lg.first_seq <= joined, (lg.first_seq, joined)
            async with trio.open_nursery() as nursery:
                on_b = await Subscriber.open(nursery, b)
                reply = await on_b.subscribe("tracking", FX, backfill=-1)
                live_from = reply["seq"] + 30
                await wait_until(
                    lambda: bool(on_b.frames[FX]) and on_b.frames[FX][-1][0] >= live_from, 30
                )
                await on_b.close()
            frames = on_b.frames[FX]
            assert frames[0][0] == 1, frames[:3]
            assert_contiguous(frames, "backfill -1 on the late relay")
            assert not on_b.gaps and not on_b.errors
            await c.stop(b)
            await c.stop(a)
    records = recorded(tmp_path, "b")
    assert seqs_of(records) == list(range(records[0].seq, records[-1].seq + 1))


@pytest.mark.parametrize(
    ("missed", "maxlen", "ahead"),
    [("in the stream", 5000, 200), ("trimmed", STREAM_MAXLEN, 3 * STREAM_MAXLEN)],
)
async def test_a_restarted_instance_goes_on_recording_from_the_stream(
    tmp_path: Path, redis_server: RedisServer, missed: str, maxlen: int, ahead: int
) -> None:
    """The relay stops; started again on the same directory, its topic takes the stream's
    numbering and its recording goes on: the frames it missed are filled from the stream,
    nothing twice; when the stream no longer has them, the recording has an honest gap (a seq
    jump between two segments), never a frame twice or under another seq."""
    with trio.fail_after(90):
        sections = {**SECTIONS, "cluster": {"stream_maxlen": maxlen}}
        async with cluster_of(tmp_path, redis_server, tracking([FX]), rate_hz=100, **sections) as c:
            a = await c.start("gw-a", **recorder_of(tmp_path, "a"))
            b = await c.start("gw-b", **recorder_of(tmp_path, "b"))
            await wait_until(lambda: a.owns(FX) and written(b) >= 2 * HISTORY, 30)
            await c.stop(b)
            stopped_at = recorded(tmp_path, "b")[-1].seq
            # Missed: more frames than the history holds, fewer than the stream keeps; or more.
            await wait_until(lambda: written(a) >= stopped_at + ahead, 30)
            b2 = await c.start("gw-b", **recorder_of(tmp_path, "b"))
            target = written(a) + 50
            await wait_until(lambda: written(b2) >= target, 30)
            epoch = a.epoch(FX)
            assert b2.epoch(FX) == epoch
            await c.stop(b2)
            await c.stop(a)
            c.check_healthy()
    on_a = {r.seq: r.raw for r in recorded(tmp_path, "a")}
    records = recorded(tmp_path, "b")
    seqs = seqs_of(records)
    assert seqs == sorted(set(seqs)), "a seq recorded twice"
    assert all(on_a[r.seq] == r.raw for r in records), (
        "a frame under another seq than the cluster's"
    )
    assert meta(tmp_path, "b")["epoch"] == epoch
    jumps = [(x, y) for x, y in itertools.pairwise(seqs) if y != x + 1]
    if missed == "in the stream":
        assert seqs == list(range(1, seqs[-1] + 1)), jumps
    else:
        # One gap, where the instance was down and the stream had moved on; visible as a jump.
        ((before, after),) = jumps
        assert before == stopped_at and after > stopped_at + HISTORY, jumps
        index = orjson.loads((tmp_path / "rec-b" / "tracking" / FX / "index.json").read_bytes())
        firsts = [s["first_seq"] for s in index["segments"]]
        assert after in firsts, firsts  # the frames after the gap begin a segment of their own


async def test_a_new_cluster_numbering_never_shares_a_segment_with_the_old(tmp_path: Path) -> None:
    """The topic's epoch changes under the recording: above the last seq recorded, a new
    segment under the new epoch (``meta.json`` keeps the old one up to its last seq); at or
    below it, recording stops with the reason (two numberings never share a recording)."""
    config = gateway_config(9, tmp_path / "token", [])  # no upstream: the test publishes
    recorder = Recorder(RecorderSection(dir=tmp_path / "rec"))
    recording = ClusterRecording(recorder)
    hub = Hub(config.feeds)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(recorder.run)
            topic = hub.topic("tracking", FX)
            recording.attach(topic)
            lg = recorder.get("tracking", FX)
            assert lg is not None
            for i in range(1, 11):
                topic.publish(f'{{"ix":{i}}}', i)
            first_epoch = topic.epoch
            await wait_until(lambda: lg.written_seq == 10)
            # The stream's numbering moved on under another epoch, above what is on disk.
            hub.close_topic("tracking", FX)
            topic = hub.topic("tracking", FX, epoch="e2", seq=20)
            recording.attach(topic)
            for i in range(21, 26):
                topic.publish_at(i, f'{{"ix":{i}}}', i)
            await wait_until(lambda: lg.written_seq == 25)
            assert (lg.epoch, lg.prior_epochs, lg.epoch_after) == ("e2", {first_epoch: 10}, 10)
            assert [s.first_seq for s in lg.segments] == [1]  # closed at the epoch's change
            assert topic.archive is not None and topic.archive.first_seq == 21
            # A numbering that starts again below: refused, with the reason.
            hub.close_topic("tracking", FX)
            topic = hub.topic("tracking", FX, epoch="e3")
            recording.attach(topic)
            for i in range(1, 4):
                topic.publish(f'{{"ix":{100 + i}}}', 100 + i)
            assert lg.state == "stopped" and "restarted at seq 1" in lg.reason, lg.reason
            assert lg.frames_dropped == 3
            nursery.cancel_scope.cancel()
    records = list(read_recording(tmp_path / "rec" / "tracking" / FX))
    assert seqs_of(records) == [*range(1, 11), *range(21, 26)]
    saved = orjson.loads((tmp_path / "rec" / "tracking" / FX / "meta.json").read_bytes())
    assert (saved["epoch"], saved["epoch_after"]) == ("e2", 10)


async def test_a_jump_in_the_relayed_numbering_is_kept_across_a_restart(tmp_path: Path) -> None:
    """A relayed seq jump (the stream was trimmed past the relay) in the middle of one writer
    batch: the frames after it begin a segment of their own, so a restart's recovery keeps
    both sides of the gap (one segment holding both would be cut at the jump)."""
    config = gateway_config(9, tmp_path / "token", [])  # no upstream: the test publishes
    hub = Hub(config.feeds)
    with trio.fail_after(30):
        recorder = Recorder(RecorderSection(dir=tmp_path / "rec"))
        async with trio.open_nursery() as nursery:
            await nursery.start(recorder.run)
            topic = hub.topic("tracking", FX)
            ClusterRecording(recorder).attach(topic)
            for i in range(1, 6):  # one synchronous step: one batch for the writer
                topic.publish(f'{{"ix":{i}}}', i)
            for i in range(9, 13):
                topic.publish_at(i, f'{{"ix":{i}}}', i)
            lg = recorder.get("tracking", FX)
            assert lg is not None
            await wait_until(lambda: lg.written_seq == 12)
            nursery.cancel_scope.cancel()
        again = Recorder(RecorderSection(dir=tmp_path / "rec"))
        await again.close()
    reopened = again.get("tracking", FX)
    assert reopened is not None and reopened.last_seq == 12
    records = list(read_recording(tmp_path / "rec" / "tracking" / FX))
    assert seqs_of(records) == [1, 2, 3, 4, 5, 9, 10, 11, 12]


async def test_a_fixture_no_longer_followed_closes_its_recording_everywhere(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Deleted through the API of one instance: on both, owner and relay, the recording goes
    idle and its segment is closed (listed in the index, compressed)."""
    fx = "api-rec-1"
    with trio.fail_after(60):
        async with cluster_of(
            tmp_path, redis_server, [], extra_sim_fixtures=[("tracking", fx)], rate_hz=100
        ) as c:
            members = [
                await c.start("gw-a", **recorder_of(tmp_path, "a")),
                await c.start("gw-b", **recorder_of(tmp_path, "b")),
            ]
            status = await trio.to_thread.run_sync(
                http_call, members[0], "PUT", f"/v1/fixtures/tracking/{fx}", b"{}"
            )
            assert status == 201

            def log_of(m: Member) -> Any:
                recorder = m.gw.recorder
                assert recorder is not None
                return recorder.get("tracking", fx)

            await wait_until(
                lambda: all(log_of(m) is not None and log_of(m).written_seq >= 50 for m in members),
                30,
            )
            assert {log_of(m).state for m in members} == {"recording"}
            status = await trio.to_thread.run_sync(
                http_call, members[1], "DELETE", f"/v1/fixtures/tracking/{fx}"
            )
            assert status == 204
            await wait_until(
                lambda: all(
                    log_of(m).state == "idle"
                    and log_of(m).open_segment is None
                    and log_of(m).segments
                    and log_of(m).segments[-1].compressed
                    for m in members
                ),
                20,
            )
            c.check_healthy()
