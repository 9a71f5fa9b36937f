"""Slow subscribers: the byte budget, both slow policies, and that nobody else suffers.

Covers: a subscriber that stops reading (raw socket, tiny SO_RCVBUF) is disconnected with 4008
under ``disconnect`` while 20 others receive every frame in order; under ``drop-oldest`` it gets
a ``gap`` message whose range, together with the frames it did get, accounts for every seq
exactly once; with 10k frames published at a stuck subscriber its queued bytes never exceed
``queue_bytes`` plus one frame; counters (per subscriber, per topic, totals) are kept.

Rules: real sockets on 127.0.0.1 port 0, real time, ``trio.fail_after`` everywhere. Progress is
driven by counters of the code under test (never by sleeping a guessed time).
"""

from __future__ import annotations

import orjson
import trio
import trio.lowlevel
from trio_websocket import WebSocketConnection, open_websocket_url

from tests.kit import wait_until
from tests.test_dataplane import (
    RawClient,
    make_config,
    recv_type,
    serving,
    subscribe,
)

QUEUE_BYTES = 64 * 1024
FRAME = '{"ix":%d,"pad":"' + "x" * 3000 + '"}'


async def _subscribe_raw(raw: RawClient, fixture: str = "F1") -> None:
    await raw.send_json({"op": "subscribe", "feed": "tracking", "fixture": fixture})
    for expected in ("subscribed", "status"):
        frame = await raw.read_frame()
        assert frame is not None
        assert orjson.loads(frame[1])["type"] == expected


async def test_stuck_subscriber_disconnected_4008_others_get_every_frame() -> None:
    with trio.fail_after(60):
        config = make_config(queue_bytes=QUEUE_BYTES, slow_policy="disconnect")
        async with serving(config) as s:
            topic = s.topic()
            stuck = await RawClient.connect(s.addr, rcvbuf=4096)
            assert stuck.status == 101
            await _subscribe_raw(stuck)
            received: list[list[int]] = [[] for _ in range(20)]
            published = 0

            async def healthy(i: int, ws: WebSocketConnection) -> None:
                while True:
                    m = await recv_type(ws, "frame")
                    received[i].append(m["seq"])

            async with trio.open_nursery() as nursery:
                clients = []
                for i in range(20):
                    ws = await nursery.start(_open, s.url)
                    await subscribe(ws)
                    clients.append(ws)
                    nursery.start_soon(healthy, i, ws)
                # Bursts of 10 frames, each burst read by all healthy clients before the next.
                while topic.slow_disconnects == 0:
                    assert published < 3000, "the stuck subscriber was never disconnected"
                    for _ in range(10):
                        published += 1
                        topic.publish(FRAME % published, None)
                    await wait_until(lambda n=published: all(len(r) == n for r in received))
                assert s.registry.slow_disconnects == 1
                # The stuck client reads at last: complete frames, then the 4008 close frame.
                texts, code = await stuck.read_until_close()
                assert (code, stuck.close_reason) == (4008, "subscriber too slow")
                seqs = [orjson.loads(t)["seq"] for t in texts]
                assert seqs == list(range(1, len(seqs) + 1))
                assert len(seqs) < published
                stuck.close()
                # Everyone else carries on.
                for _ in range(20):
                    published += 1
                    topic.publish(FRAME % published, None)
                await wait_until(lambda n=published: all(len(r) == n for r in received))
                for r in received:
                    assert r == list(range(1, published + 1))
                assert topic.subscriber_count == 20
                nursery.cancel_scope.cancel()


async def _open(url: str, *, task_status: trio.TaskStatus[WebSocketConnection]) -> None:
    async with open_websocket_url(url) as ws:
        task_status.started(ws)
        await trio.sleep_forever()


async def test_drop_oldest_sends_gap_and_accounts_for_every_seq() -> None:
    with trio.fail_after(60):
        config = make_config(queue_bytes=QUEUE_BYTES, slow_policy="drop-oldest")
        async with serving(config) as s:
            topic = s.topic()
            stuck = await RawClient.connect(s.addr, rcvbuf=4096)
            await _subscribe_raw(stuck)
            published = 0
            while topic.drops < 50:
                assert published < 5000, "nothing was ever dropped"
                published += 1
                topic.publish(FRAME % published, None)
                await trio.lowlevel.checkpoint()
            (conn,) = s.registry.connections_now()
            assert conn.frames_dropped == topic.drops == s.registry.drops
            # Read everything that is there, then one more live frame to end on.
            seen: list[int] = []
            gaps: list[tuple[int, int]] = []
            published += 1
            topic.publish(FRAME % published, None)
            while not seen or seen[-1] != published:
                frame = await stuck.read_frame()
                assert frame is not None
                m = orjson.loads(frame[1])
                if m["type"] == "gap":
                    assert m["reason"] == "slow_consumer"
                    assert (m["feed"], m["fixture"]) == ("tracking", "F1")
                    gaps.append((m["from_seq"], m["to_seq"]))
                    # A gap comes right before the frame after it.
                    seen.extend(range(m["from_seq"], m["to_seq"] + 1))
                elif m["type"] == "frame":
                    seen.append(m["seq"])
            assert gaps
            assert seen == list(range(1, published + 1))
            assert sum(b - a + 1 for a, b in gaps) == topic.drops
            stuck.close()


async def test_memory_bounded_with_stuck_subscriber_10k_frames() -> None:
    with trio.fail_after(60):
        config = make_config(queue_bytes=QUEUE_BYTES, slow_policy="drop-oldest", history=10)
        async with serving(config) as s:
            topic = s.topic()
            stuck = await RawClient.connect(s.addr, rcvbuf=4096)
            await _subscribe_raw(stuck)
            (conn,) = s.registry.connections_now()
            frame_bytes = len(FRAME % 10000) + 100  # envelope and header included
            worst = 0
            for i in range(1, 10_001):
                topic.publish(FRAME % i, None)
                worst = max(worst, conn.queued_bytes)
                assert conn.queued_bytes <= QUEUE_BYTES + frame_bytes
            assert worst > QUEUE_BYTES - frame_bytes  # the budget was really reached
            assert conn.frames_dropped > 9000
            (view,) = s.registry.views()
            assert view.frames_dropped == conn.frames_dropped
            assert view.queued_bytes == conn.queued_bytes
            stuck.close()


async def test_memory_bounded_disconnect_policy() -> None:
    with trio.fail_after(60):
        config = make_config(queue_bytes=QUEUE_BYTES, slow_policy="disconnect")
        async with serving(config) as s:
            topic = s.topic()
            stuck = await RawClient.connect(s.addr, rcvbuf=4096)
            await _subscribe_raw(stuck)
            (conn,) = s.registry.connections_now()
            frame_bytes = len(FRAME % 10000) + 100
            for i in range(1, 10_001):
                topic.publish(FRAME % i, None)
                assert conn.queued_bytes <= QUEUE_BYTES + frame_bytes
            assert conn.slow_disconnected
            assert topic.slow_disconnects == 1
            stuck.close()
            await wait_until(lambda: len(s.registry) == 0)
