"""Batch groups: delayed subscribers with the same topics get one shared buffer per batch.

Covers (gateway.dataplane._batchgroup): subscribers of one topic and one delay end up in one
group and each frame is added to it once; every member gets every frame, complete and in
order; members with different topic sets are in different groups and a subscriber of two
topics gets them in publish order; what is for one member alone (a status change, a new
subscription) keeps its place between the frames, and the member rejoins afterwards; a member
that stops reading leaves (its writes fall short) without costing the others a frame; a burst
past the byte budget leaves each member to its own slow policy (a gap message under
drop-oldest, no frame twice). The group's bookkeeping (a member that joins after the batch's
first frame, leaving with frames pending, the budget) is also checked directly on stand-ins
for the connections.

Rules: real sockets on 127.0.0.1 port 0 and real time, every test under ``trio.fail_after``;
nothing waits a guessed time: the state is awaited (``wait_until``) or the frames themselves.
"""

from __future__ import annotations

import socket
import time
from typing import Any, cast

import orjson
import pytest
import trio

from gateway.config import FeedConfig
from gateway.dataplane import BatchGroup, DelayedConnection, WriteTicker, join_group
from gateway.hub import Frame, LatencyHistogram, Topic
from gateway.model import FixtureState
from tests.kit import wait_until
from tests.test_dataplane import (
    FASTPATH_TEMPLATE,
    TRACKING_PATH,
    RawClient,
    Served,
    make_config,
    serving,
)
from tests.test_dataplane_batching import frame_text

FEED = "tracking"


async def subscribe(s: Served, *fixtures: str, query: str = "") -> tuple[RawClient, Any]:
    """A raw client subscribed to *fixtures*; returns it and its connection."""
    for fixture in fixtures:
        s.topic(fixture)
    n = len(s.registry.connections_now())
    client = await RawClient.connect(s.addr, "/v1/stream" + query)
    assert client.status == 101
    await wait_until(lambda: len(s.registry.connections_now()) > n)
    conn = s.registry.connections_now()[-1]
    for fixture in fixtures:
        await client.send_json({"op": "subscribe", "feed": FEED, "fixture": fixture})
        kinds = [m["type"] for m in await read_messages(client, 2)]
        assert kinds == ["subscribed", "status"]
    return client, conn


def is_heartbeat(message: Any) -> bool:
    """A heartbeat of either endpoint: ``/v1/stream``'s message or the vendor's."""
    return message.get("type") == "heartbeat" or str(message.get("message", "")).startswith(
        "Heartbeat"
    )


async def read_messages(client: RawClient, n: int) -> list[Any]:
    """The next *n* messages (JSON), heartbeats skipped."""
    got: list[Any] = []
    while len(got) < n:
        frame = await client.read_frame()
        assert frame is not None, "closed early"
        message = orjson.loads(frame[1])
        if not is_heartbeat(message):
            got.append(message)
    return got


def frames_of(messages: list[Any]) -> list[tuple[str, int]]:
    return [(m["fixture"], m["seq"]) for m in messages if m["type"] == "frame"]


async def grouped(*conns: Any) -> None:
    await wait_until(lambda: all(c.group is not None for c in conns))


async def subscribed_grouped(s: Served, n: int, fixture: str) -> list[tuple[RawClient, Any]]:
    """*n* raw clients subscribed to *fixture*, once all of them are in a batch group."""
    pairs = [await subscribe(s, fixture) for _ in range(n)]
    await grouped(*(conn for _, conn in pairs))
    return pairs


async def test_subscribers_of_one_topic_share_one_group_and_get_every_frame() -> None:
    with trio.fail_after(30):
        async with serving(make_config(write_delay=50)) as s:
            pairs = await subscribed_grouped(s, 4, "F1")
            conns = [conn for _, conn in pairs]
            group = conns[0].group
            assert isinstance(group, BatchGroup)
            assert all(c.group is group for c in conns)
            assert set(group.members) == set(conns)
            assert list(conns[0].ticker.groups.values()) == [group]
            stats = s.registry.stats()
            assert (stats.batched, stats.batch_groups) == (4, 1)
            views = s.registry.views()
            assert [(v.write_delay_ms, v.batched) for v in views] == [(50, True)] * 4
            topic = s.topic("F1")
            writes = [c.writer_writes for c in conns]
            sent = [c.frames_sent for c in conns]
            for i in range(3):
                topic.publish(frame_text(i), None)
            # One part per frame, however many members: added once, by the first of them.
            assert len(group.parts) == 3
            for client, _ in pairs:
                assert frames_of(await read_messages(client, 3)) == [
                    ("F1", 1),
                    ("F1", 2),
                    ("F1", 3),
                ]
            # One write each for the three frames (all published before the batch was due).
            assert [c.writer_writes - w for c, w in zip(conns, writes, strict=True)] == [1] * 4
            assert [c.frames_sent - n for c, n in zip(conns, sent, strict=True)] == [3] * 4
            # Trickled over several batches: still every frame, once, in order.
            for i in range(3, 40):
                topic.publish(frame_text(i), None)
                await trio.sleep(0.004)
            for client, _ in pairs:
                got = frames_of(await read_messages(client, 37))
                assert got == [("F1", seq) for seq in range(4, 41)]
            for client, _ in pairs:
                client.close()


async def test_topic_sets_make_groups_and_two_topics_arrive_in_publish_order() -> None:
    with trio.fail_after(30):
        async with serving(make_config(write_delay=40)) as s:
            both_a, conn_a = await subscribe(s, "F1", "F2")
            both_b, conn_b = await subscribe(s, "F1", "F2")
            one, conn_one = await subscribe(s, "F1")
            await grouped(conn_a, conn_b, conn_one)
            assert conn_a.group is conn_b.group
            assert conn_one.group is not conn_a.group
            assert len(conn_a.ticker.groups) == 2
            t1, t2 = s.topic("F1"), s.topic("F2")
            order: list[tuple[str, int]] = []
            for i in range(30):
                topic = t1 if i % 3 else t2
                topic.publish(frame_text(i), None)
                order.append((topic.fixture, topic.seq))
                if i % 7 == 0:
                    await trio.sleep(0.02)
            for client in (both_a, both_b):
                assert frames_of(await read_messages(client, 30)) == order
            assert frames_of(await read_messages(one, 20)) == [o for o in order if o[0] == "F1"]
            for client in (both_a, both_b, one):
                client.close()


async def test_a_status_change_keeps_its_place_and_the_members_rejoin() -> None:
    with trio.fail_after(30):
        async with serving(make_config(write_delay=200)) as s:
            pairs = await subscribed_grouped(s, 3, "F1")
            conns = [conn for _, conn in pairs]
            topic = s.topic("F1")
            # All within one delay: the frames wait in the group when the status comes.
            for i in range(3):
                topic.publish(frame_text(i), None)
            topic.set_status(FixtureState.BACKOFF, "upstream dropped")
            assert all(c.group is None for c in conns)
            for i in range(3, 6):
                topic.publish(frame_text(i), None)
            for client, _ in pairs:
                got = await read_messages(client, 7)
                kinds = [(m["type"], m.get("seq", m.get("state"))) for m in got]
                assert kinds == [
                    ("frame", 1),
                    ("frame", 2),
                    ("frame", 3),
                    ("status", "backoff"),
                    ("frame", 4),
                    ("frame", 5),
                    ("frame", 6),
                ]
            await grouped(*conns)
            topic.publish(frame_text(6), None)
            for client, _ in pairs:
                assert frames_of(await read_messages(client, 1)) == [("F1", 7)]
            for client, _ in pairs:
                client.close()


async def test_subscribing_while_grouped_keeps_order_and_joins_the_new_set() -> None:
    with trio.fail_after(30):
        async with serving(make_config(write_delay=100)) as s:
            (client, conn), (other, other_conn) = await subscribed_grouped(s, 2, "F1")
            t1, t2 = s.topic("F1"), s.topic("F2")
            t1.publish(frame_text(0), None)
            await client.send_json({"op": "subscribe", "feed": FEED, "fixture": "F2"})
            await wait_until(lambda: conn.group is None)
            t2.publish(frame_text(1), None)
            t1.publish(frame_text(2), None)
            got = await read_messages(client, 5)
            assert [(m["type"], m["fixture"]) for m in got] == [
                ("frame", "F1"),
                ("subscribed", "F2"),
                ("status", "F2"),
                ("frame", "F2"),
                ("frame", "F1"),
            ]
            assert frames_of(got) == [("F1", 1), ("F2", 1), ("F1", 2)]
            assert frames_of(await read_messages(other, 2)) == [("F1", 1), ("F1", 2)]
            await grouped(conn)
            assert conn.group is not other_conn.group
            for c in (client, other):
                c.close()


async def test_a_member_that_stops_reading_leaves_and_costs_the_others_nothing() -> None:
    config = make_config(write_delay=10, queue_bytes=64 * 1024, slow_policy="disconnect")
    with trio.fail_after(60):
        async with serving(config) as s:
            readers = [await subscribe(s, "F1") for _ in range(3)]
            stuck, stuck_conn = await subscribe(s, "F1")
            stuck.sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
            await grouped(*(c for _, c in readers), stuck_conn)
            topic = s.topic("F1")
            received: dict[int, list[int]] = {i: [] for i in range(len(readers))}

            async def read_all(i: int, client: RawClient) -> None:
                while True:
                    frame = await client.read_frame()
                    assert frame is not None
                    m = orjson.loads(frame[1])
                    if m["type"] == "frame":
                        received[i].append(m["seq"])

            async with trio.open_nursery() as nursery:
                for i, (client, _) in enumerate(readers):
                    nursery.start_soon(read_all, i, client)
                while not stuck_conn.slow_disconnected:
                    for i in range(20):
                        topic.publish(frame_text(i), None)
                    await trio.sleep(0.005)
                published = topic.seq
                await wait_until(lambda: all(len(r) == published for r in received.values()))
                nursery.cancel_scope.cancel()
            for seqs in received.values():
                assert seqs == list(range(1, published + 1))
            assert all(c.group is not None for _, c in readers)
            assert stuck_conn.group is None
            for client, _ in [*readers, (stuck, None)]:
                client.close()


async def test_a_member_closing_gets_nothing_after_its_close_frame() -> None:
    with trio.fail_after(30):
        async with serving(make_config(write_delay=5)) as s:
            (closer, closer_conn), (other, other_conn) = await subscribed_grouped(s, 2, "F1")
            topic = s.topic("F1")
            stop = trio.Event()

            async def publish_until_stopped() -> None:
                i = 0
                while not stop.is_set():
                    topic.publish(frame_text(i), None)
                    i += 1
                    await trio.sleep(0.001)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(publish_until_stopped)
                await read_messages(closer, 5)
                await closer.send_frame(b"\x03\xe8", opcode=8)  # close, 1000
                texts, code = await closer.read_until_close()
                assert code == 1000
                seqs = [orjson.loads(t)["seq"] for t in texts]
                assert seqs == sorted(seqs)
                # Nothing after the close frame: the next read is the end of the stream.
                assert await closer.read_frame() is None
                assert closer_conn.group is None
                assert other_conn.group is not None
                got = frames_of(await read_messages(other, 20))
                assert [seq for _, seq in got] == list(range(got[0][1], got[0][1] + 20))
                stop.set()
            for c in (closer, other):
                c.close()


async def test_a_burst_past_the_budget_gets_a_gap_under_drop_oldest() -> None:
    config = make_config(write_delay=200, queue_bytes=4096, slow_policy="drop-oldest")
    with trio.fail_after(30):
        async with serving(config) as s:
            client, conn = await subscribe(s, "F1")
            await grouped(conn)
            topic = s.topic("F1")
            for i in range(40):  # ~7 KB within one delay: past the 4 KB budget
                topic.publish(frame_text(i), None)
            seen: list[int] = []
            gaps: list[tuple[int, int]] = []
            while not seen or seen[-1] < 40:
                (m,) = await read_messages(client, 1)
                if m["type"] == "gap":
                    gaps.append((m["from_seq"], m["to_seq"]))
                else:
                    assert m["type"] == "frame"
                    seen.append(m["seq"])
            assert gaps, "frames were dropped: a gap message says so"
            missing = [seq for a, b in gaps for seq in range(a, b + 1)]
            assert sorted(seen + missing) == list(range(1, 41))
            assert seen == sorted(set(seen))
            assert conn.frames_dropped == len(missing)
            client.close()


async def dropin(s: Served, path: str, *, fixture: str | None) -> tuple[RawClient, Any]:
    """A raw vendor client on drop-in *path*, authenticated (and its fixture requested)."""
    n = len(s.registry.connections_now())
    client = await RawClient.connect(s.addr, path)
    assert client.status == 101
    await wait_until(lambda: len(s.registry.connections_now()) > n)
    conn = s.registry.connections_now()[-1]
    await client.send_json({"authToken": "any"})
    if fixture is not None:
        assert (await read_messages(client, 1))[0]["message"] == "Authorisation accepted"
        await client.send_json({"fixtureId": fixture, "backfill": 0})
    return client, conn


async def test_dropin_subscribers_share_a_group_of_vendor_frames() -> None:
    with trio.fail_after(30):
        async with serving(make_config(write_delay=20)) as s:
            topic = s.topic("F1")
            pairs = [await dropin(s, TRACKING_PATH, fixture="F1") for _ in range(3)]
            await wait_until(lambda: topic.subscriber_count == 3)
            conns = [conn for _, conn in pairs]
            await grouped(*conns)
            group = conns[0].group
            assert all(c.group is group for c in conns)
            assert group.encoding == "raw_ws"
            # A /v1/stream subscriber of the same fixture and delay gets envelopes: its own group.
            client, conn = await subscribe(s, "F1")
            await grouped(conn)
            assert conn.group is not group
            for i in range(30):
                topic.publish(frame_text(i), None)
                if i % 8 == 0:
                    await trio.sleep(0.03)
            for vendor, _ in pairs:
                got = await read_messages(vendor, 30)
                assert [m["ix"] for m in got] == list(range(30))  # the frames as they came
            assert frames_of(await read_messages(client, 30)) == [("F1", n) for n in range(1, 31)]
            for c in (*(v for v, _ in pairs), client):
                c.close()


async def test_fastpath_dropin_members_get_disconnected_and_connected_in_order() -> None:
    with trio.fail_after(30):
        async with serving(make_config(write_delay=100)) as s:
            topic = s.topic("F1", feed="fastpath")
            topic.set_status(FixtureState.LIVE, "")
            path = FASTPATH_TEMPLATE.replace("{fixture}", "F1")
            pairs = [await dropin(s, path, fixture=None) for _ in range(2)]
            await wait_until(lambda: topic.subscriber_count == 2)
            conns = [conn for _, conn in pairs]
            # Nothing is written after a fastpath authentication: they join at once.
            await grouped(*conns)
            topic.publish(fastpath_action(1), 1)
            topic.publish(fastpath_action(2), 2)
            topic.set_status(FixtureState.BACKOFF, "retry")
            assert all(c.group is None for c in conns)
            topic.set_status(FixtureState.LIVE, "")
            topic.publish(fastpath_action(3), 3)
            for vendor, _ in pairs:
                got = await read_messages(vendor, 5)
                kinds = [m.get("state") or m["fixtureAction"]["fixtureSeqNum"] for m in got]
                assert kinds == [1, 2, "Disconnected", "Connected", 3]
            # Live again and nothing owed: both rejoin, and share the next frames again.
            await grouped(*conns)
            assert conns[0].group is conns[1].group
            topic.publish(fastpath_action(4), 4)
            for vendor, _ in pairs:
                got = await read_messages(vendor, 1)
                assert got[0]["fixtureAction"]["fixtureSeqNum"] == 4
            for vendor, _ in pairs:
                vendor.close()


def fastpath_action(n: int) -> str:
    return orjson.dumps(
        {"fixtureAction": {"actionId": f"a-{n}", "fixtureSeqNum": n, "fixtureId": "F1"}}
    ).decode()


# -- the group's bookkeeping, on stand-ins for connections ------------------------------------


class FakeMember:
    """What a BatchGroup uses of a DelayedConnection, over a real socket pair: what the group
    writes to ``fd`` is read back with :meth:`received`; the rest is recorded."""

    def __init__(self, ticker: WriteTicker, budget: int = 1 << 20) -> None:
        self.ticker = ticker
        self.deflate = False
        self.budget = budget
        self.policy = "disconnect"
        self.idle = True
        self.group: Any = None
        self.latency = LatencyHistogram()
        self.sock, self.peer = socket.socketpair()
        self.sock.setblocking(False)
        self.peer.setblocking(False)
        self.fd = self.sock.fileno()
        self.writer_writes = 0
        self.frames_sent = 0
        self.bytes_sent = 0
        #: write_shared calls (a member that joined after the batch's first frame).
        self.writes: list[tuple[bytes, list[bytes], int, float]] = []
        self.pending: list[tuple[Frame, bytes, Any]] = []

    def received(self) -> bytes:
        data = b""
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                return data
            data += chunk

    def write_shared(self, data: bytes, parts: list[bytes], frames: int, sampled: float) -> bool:
        self.writes.append((bytes(data), list(parts), frames, sampled))
        return True

    def shared_failed(self) -> None:
        raise AssertionError("no write fails here")

    def shared_short(
        self, data: bytes, parts: list[bytes], frames: int, sampled: float, n: int
    ) -> None:
        raise AssertionError("no write falls short here")

    def take_pending(self, pending: list[tuple[Frame, bytes, Any]]) -> None:
        self.pending.extend(pending)

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


def make_topic() -> Topic:
    return Topic(FeedConfig(kind="tracking", url="wss://dde.example.test/ws/t"), "F1")


def member(ticker: WriteTicker, budget: int = 1 << 20) -> DelayedConnection:
    return cast(DelayedConnection, FakeMember(ticker, budget))


def fake(conn: DelayedConnection) -> FakeMember:
    return cast(FakeMember, conn)


def publish(group: BatchGroup, topic: Topic, n: int) -> list[Frame]:
    frames = []
    for i in range(n):
        topic.publish(frame_text(i), None)
        frame = topic.latest_frame
        assert frame is not None
        group.add(frame, topic)
        frames.append(frame)
    return frames


async def test_a_member_joining_after_the_first_frame_gets_only_the_later_ones() -> None:
    # async: adding a frame opens a batch on the ticker, which reads trio's clock.
    ticker = WriteTicker(0.01)
    topic = make_topic()
    a, b = member(ticker), member(ticker)
    group = join_group(a, {topic: "sub-a"})  # type: ignore[dict-item]
    first = publish(group, topic, 2)
    assert join_group(b, {topic: "sub-b"}) is group  # type: ignore[dict-item]
    later = publish(group, topic, 1)
    group.flush_tick()
    assert fake(a).received() == b"".join(f.envelope_ws for f in first + later)
    assert (fake(a).writer_writes, fake(a).frames_sent) == (1, 3)
    assert fake(a).writes == []
    assert fake(b).writes == [(later[0].envelope_ws, [later[0].envelope_ws], 1, later[0].published)]
    assert fake(b).received() == b""
    # The next batch goes to both, the same bytes, inline.
    nxt = publish(group, topic, 2)
    group.flush_tick()
    both = b"".join(f.envelope_ws for f in nxt)
    assert fake(a).received() == both == fake(b).received()
    assert (fake(b).writer_writes, fake(b).frames_sent) == (1, 2)
    for conn in (a, b):
        fake(conn).close()


async def test_leaving_queues_the_pending_frames_with_the_members_own_sink() -> None:
    ticker = WriteTicker(0.01)
    topic = make_topic()
    a, b = member(ticker), member(ticker)
    group = join_group(a, {topic: "sub-a"})  # type: ignore[dict-item]
    join_group(b, {topic: "sub-b"})  # type: ignore[dict-item]
    frames = publish(group, topic, 2)
    group.leave(a)
    assert fake(a).group is None
    assert fake(a).pending == [(f, f.envelope_ws, "sub-a") for f in frames]
    group.flush_tick()
    assert fake(a).received() == b""
    assert fake(b).received() == b"".join(f.envelope_ws for f in frames)
    assert ticker.groups == {group.key: group}
    group.leave(b)
    assert fake(b).pending == []  # nothing pending once the batch is written
    assert ticker.groups == {}
    for conn in (a, b):
        fake(conn).close()


async def test_past_the_budget_every_member_leaves_when_the_batch_is_due() -> None:
    ticker = WriteTicker(0.01)
    topic = make_topic()
    a, b = member(ticker, budget=5000), member(ticker, budget=5000)
    group = join_group(a, {topic: "sub-a"})  # type: ignore[dict-item]
    join_group(b, {topic: "sub-b"})  # type: ignore[dict-item]
    frames = publish(group, topic, 40)  # ~7 KB
    assert fake(a).group is group  # not during the fan-out
    group.flush_tick()
    for conn, sink in ((a, "sub-a"), (b, "sub-b")):
        assert fake(conn).received() == b""
        assert fake(conn).group is None
        assert fake(conn).pending == [(f, f.envelope_ws, sink) for f in frames]
        fake(conn).close()
    assert ticker.groups == {}


async def test_join_refuses_a_busy_connection_and_keys_by_budget() -> None:
    ticker = WriteTicker(0.01)
    topic = make_topic()
    busy = member(ticker)
    fake(busy).idle = False
    with pytest.raises(RuntimeError, match="cannot join"):
        join_group(busy, {topic: "s"})  # type: ignore[dict-item]
    a, small = member(ticker), member(ticker, budget=100)
    assert join_group(a, {topic: "s"}) is not join_group(small, {topic: "s"})  # type: ignore[dict-item]
    with pytest.raises(RuntimeError, match="cannot join"):
        join_group(a, {topic: "s"})  # type: ignore[dict-item]
    for conn in (busy, a, small):
        fake(conn).close()


def test_sample_many_counts_as_many_samples() -> None:
    one_by_one, at_once = LatencyHistogram(), LatencyHistogram()
    published = time.perf_counter() - 0.003  # 3 ms ago: well inside one bucket
    for n in (1, 5, 7, 100, 3, 16):
        for _ in range(n):
            one_by_one.sample(published)
        at_once.sample_many(published, n)
        assert at_once.counts == one_by_one.counts
        assert at_once.count == one_by_one.count
    assert at_once.count == 132 // 8
