"""``max_rate`` on ``/v1/stream`` subscribe: latest-wins conflation per subscription.

Covers: the :class:`~gateway.dataplane.Conflator` timing rules under
``MockClock(autojump_threshold=0)`` (no sockets: at most ``rate`` a second, each delivery the
latest item offered, a held item out exactly when the rate allows, flush, discard, the timer's
re-check when a direct send moved the due time); and over real sockets: at most ``max_rate``
frames a second with ``seq`` showing the skipped ones, the latest frame delivered once
publishing stops, ``conflated`` in the registry views, a plain subscription on the same
connection untouched, a status change sending the held frame first, strict validation, and the
byte budget still closing a conflated subscriber that does not read (4008).

Rules: MockClock only with memory state (the conflator), real time with sockets; every test
under ``trio.fail_after``; progress polled with ``wait_until`` (never a guessed sleep).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import orjson
import pytest
import trio
import trio.testing
from trio_websocket import WebSocketConnection, open_websocket_url

from gateway.dataplane import MAX_RATE, MIN_RATE, Conflator
from gateway.model import FixtureState
from tests.kit import wait_until
from tests.test_dataplane import RawClient, make_config, recv_type, send_json, serving, subscribe

EPS = 1e-9
FRAME = '{"ix":%d,"pad":"' + "x" * 3000 + '"}'


class Recorder:
    """A conflator's deliver callback: (trio time, item) of each delivery."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, int]] = []
        self.last_offered = -1

    def deliver(self, item: int) -> None:
        # Whatever goes out is the newest item offered so far: never a stale one.
        assert item == self.last_offered
        self.sent.append((trio.current_time(), item))


def _offer(c: Conflator[int], rec: Recorder, item: int) -> bool:
    rec.last_offered = item
    return c.offer(item)


# -- the conflator, under MockClock --------------------------------------------------------


@pytest.mark.parametrize("rate", [10.0, 3.0, 25.0])
async def test_fast_input_is_capped_and_always_latest(
    autojump_clock: trio.testing.MockClock, rate: float
) -> None:
    rec = Recorder()
    c: Conflator[int] = Conflator(rate, rec.deliver)
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.run)
            start = trio.current_time()
            for i in range(200):  # 100 items a second for 2 s
                _offer(c, rec, i)
                await trio.sleep(0.01)
            await wait_until(lambda: c.held is None)
            nursery.cancel_scope.cancel()
    times = [t for t, _ in rec.sent]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 1 / rate - EPS  # never faster than the rate
    span = times[-1] - start
    assert len(times) <= rate * span + 1 + EPS
    assert len(times) >= rate * 2 - 1  # and not much slower: the timer sends when allowed
    assert rec.sent[-1][1] == 199  # the last item offered went out
    assert c.conflated == 200 - len(rec.sent)
    items = [item for _, item in rec.sent]
    assert items == sorted(items)


async def test_held_item_goes_out_exactly_when_the_rate_allows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = Recorder()
    c: Conflator[int] = Conflator(10.0, rec.deliver)
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.run)
            t0 = trio.current_time()
            assert not _offer(c, rec, 1)  # nothing held: out at once, synchronously
            assert rec.sent == [(t0, 1)]
            await trio.sleep(0.01)
            assert not _offer(c, rec, 2)  # too early: held
            assert c.held == 2
            await trio.sleep(0.02)
            assert _offer(c, rec, 3)  # replaces 2
            assert c.conflated == 1
            await wait_until(lambda: len(rec.sent) == 2)
            # Item 3 left at t0 + 0.1 exactly: not one tick later, not at the next item.
            assert abs(rec.sent[1][0] - (t0 + 0.1)) < EPS
            assert rec.sent[1][1] == 3
            # A long pause: the next item goes out at once again.
            await trio.sleep(5)
            assert not _offer(c, rec, 4)
            assert rec.sent[-1] == (trio.current_time(), 4)
            nursery.cancel_scope.cancel()


async def test_slow_input_passes_untouched(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    c: Conflator[int] = Conflator(10.0, rec.deliver)
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.run)
            for i in range(20):
                _offer(c, rec, i)
                assert rec.sent[-1][1] == i  # synchronously, no timer involved
                await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    assert c.conflated == 0


async def test_flush_and_discard(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    c: Conflator[int] = Conflator(2.0, rec.deliver)
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.run)
            _offer(c, rec, 1)
            await trio.sleep(0.1)
            _offer(c, rec, 2)
            c.flush()  # out now, whatever the rate
            t_flush = trio.current_time()
            assert rec.sent[-1] == (t_flush, 2)
            c.flush()  # nothing held: nothing happens
            assert len(rec.sent) == 2
            await trio.sleep(0.1)
            _offer(c, rec, 3)  # the rate counts from the flush
            await wait_until(lambda: len(rec.sent) == 3)
            assert abs(rec.sent[-1][0] - (t_flush + 0.5)) < EPS
            await trio.sleep(0.1)
            _offer(c, rec, 4)
            c.discard()  # the subscription ended: 4 never goes out
            await trio.sleep(2)
            assert [item for _, item in rec.sent] == [1, 2, 3]
            nursery.cancel_scope.cancel()


async def test_timer_rechecks_a_moved_due_time(autojump_clock: trio.testing.MockClock) -> None:
    # The timer sleeps until the due time of item 2; before it runs, item 3 arrives late
    # enough to go out directly (moving the due time) and item 4 is held. The timer must
    # not send 4 early on the old due time.
    rec = Recorder()
    c: Conflator[int] = Conflator(10.0, rec.deliver)
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.run)
            _offer(c, rec, 1)
            await trio.sleep(0.05)
            _offer(c, rec, 2)  # held until t0 + 0.1
            autojump_clock.jump(0.1)  # time passes without the timer task running yet
            _offer(c, rec, 3)  # due now: out directly (2 conflated), next due + 0.1
            t3 = trio.current_time()
            _offer(c, rec, 4)  # held
            await wait_until(lambda: len(rec.sent) == 3)
            assert rec.sent[-1][1] == 4
            assert rec.sent[-1][0] >= t3 + 0.1 - EPS
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("rate", [0.0, -1.0, math.inf, math.nan, 5e-324, MIN_RATE / 2])
def test_rate_must_be_at_least_the_floor_and_finite(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        Conflator(rate, print)


# -- over a real socket ----------------------------------------------------------------------


async def _frames(ws: WebSocketConnection, into: list[dict[str, Any]]) -> None:
    while True:
        m = await recv_type(ws, "frame")
        into.append(m)


async def test_max_rate_over_a_socket_caps_conflates_and_ends_on_the_latest() -> None:
    rate = 10
    with trio.fail_after(60):
        async with serving(make_config()) as s, open_websocket_url(s.url) as ws:
            capped, plain = s.topic("F1"), s.topic("F2")
            await subscribe(ws, "F2")  # a plain subscription on the same connection
            t0 = trio.current_time()
            await subscribe(ws, "F1", max_rate=rate)
            got: list[dict[str, Any]] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_frames, ws, got)
                # Publish F1 at ~200 a second for a little over a second, F2 now and then.
                for i in range(1, 241):
                    capped.publish(FRAME % i, None)
                    if i % 10 == 0:
                        plain.publish(FRAME % i, None)
                    await trio.sleep(0.005)
                # No stale frame held: the last one published reaches the client.
                await wait_until(lambda: any(m["fixture"] == "F1" and m["seq"] == 240 for m in got))
                t_end = trio.current_time()
                nursery.cancel_scope.cancel()
            ones = [m["seq"] for m in got if m["fixture"] == "F1"]
            twos = [m["seq"] for m in got if m["fixture"] == "F2"]
            # Every send happened between t0 and t_end, at least 1/rate apart.
            assert len(ones) <= rate * (t_end - t0) + 1
            assert ones == sorted(set(ones)) and ones[-1] == 240
            assert len(ones) < 240  # conflation did skip frames: seq shows which
            assert twos == list(range(1, 25))  # the plain subscription got every frame
            (conn,) = s.registry.connections_now()
            (view,) = s.registry.views()
            assert view.conflated == conn.frames_conflated > 0
            # Each frame is either delivered or conflated (none is held once caught up).
            assert conn.frames_conflated == 240 - len(ones)


async def test_a_status_change_sends_the_held_frame_first() -> None:
    with trio.fail_after(30):
        async with serving(make_config()) as s, open_websocket_url(s.url) as ws:
            topic = s.topic("F1")
            await subscribe(ws, "F1", max_rate=0.2)  # one frame every 5 s at most
            topic.publish('{"ix":1}', None)
            topic.publish('{"ix":2}', None)  # held: the rate does not allow it yet
            topic.set_status(FixtureState.BACKOFF, "connection lost")
            first = await recv_type(ws, "frame")
            second = await recv_type(ws, "frame")
            status = await recv_type(ws, "status")
            assert [first["seq"], second["seq"]] == [1, 2]
            assert status["state"] == "backoff"
            # And the topic closing ends the subscription: status stopped, nothing after it.
            topic.publish('{"ix":3}', None)  # held (the flush just sent 2)
            s.hub.close_topic("tracking", "F1")
            assert (await recv_type(ws, "frame"))["seq"] == 3
            assert (await recv_type(ws, "status"))["state"] == "stopped"
            (conn,) = s.registry.connections_now()
            handler = conn.handler
            assert handler is not None and handler.subscription_names() == []


BAD_MAX_RATES: list[tuple[dict[str, Any], str]] = [
    ({"max_rate": 0}, "max_rate must be"),
    ({"max_rate": -1}, "max_rate must be"),
    ({"max_rate": MAX_RATE + 1}, "max_rate must be"),
    # The probe: 5e-324 (the smallest double) was accepted: one frame, then nothing.
    ({"max_rate": 5e-324}, "max_rate must be null or a number >= 0.01 and <= 1000"),
    ({"max_rate": 1e-300}, "max_rate must be"),
    ({"max_rate": MIN_RATE * 0.999}, "max_rate must be"),
    ({"max_rate": -0.0}, "max_rate must be"),
    ({"max_rate": -5e-324}, "max_rate must be"),
    ({"max_rate": 1.7e308}, "max_rate must be"),
    ({"max_rate": "10"}, "max_rate must be"),
    ({"max_rate": True}, "max_rate must be"),
    ({"max_rate": [10]}, "max_rate must be"),
    ({"max_rate": 10, "backfill": 5}, "cannot be combined"),
    ({"max_rate": 10, "backfill": None}, "cannot be combined"),
    ({"max_rate": 10, "backfill": -1}, "cannot be combined"),
    ({"max_rate": 10, "after": 0, "epoch": "e"}, "cannot be combined"),
]


async def test_max_rate_is_validated_strictly() -> None:
    with trio.fail_after(30):
        async with serving(make_config()) as s, open_websocket_url(s.url) as ws:
            topic = s.topic("F1")
            s.topic("F2"), s.topic("F3")
            for extra, expected in BAD_MAX_RATES:
                await send_json(
                    ws, {"op": "subscribe", "feed": "tracking", "fixture": "F1", **extra}
                )
                err = await recv_type(ws, "error")
                assert expected in err["message"], (extra, err)
            # JSON has no NaN or infinity, and orjson refuses a number too large for a double.
            for absurd in ("NaN", "Infinity", "-Infinity", "1e400", "-1e400"):
                request = '{"op":"subscribe","feed":"tracking","fixture":"F1","max_rate":'
                await ws.send_message(request + absurd + "}")
                err = await recv_type(ws, "error")
                assert err["message"] == "invalid JSON", (absurd, err)
            assert topic.subscriber_count == 0  # nothing was subscribed by a bad request
            # The bounds themselves are fine, and so are null and an explicit backfill 0.
            s.topic("F4")
            await subscribe(ws, "F4", max_rate=MIN_RATE)
            await subscribe(ws, "F1", max_rate=MAX_RATE)
            await subscribe(ws, "F2", max_rate=0.5, backfill=0)
            await subscribe(ws, "F3", max_rate=None)
            assert (
                s.topic("F1").subscriber_count
                == s.topic("F2").subscriber_count
                == s.topic("F3").subscriber_count
                == 1
            )
            await send_json(ws, {"op": "unsubscribe", "feed": "tracking", "fixture": "F2"})
            await wait_until(lambda: s.topic("F2").subscriber_count == 0)
            s.topic("F2").publish('{"ix":1}', None)
            s.topic("F3").publish('{"ix":1}', None)
            m = await recv_type(ws, "frame")
            assert m["fixture"] == "F3"  # F2's subscription (and its timer) ended


async def test_a_conflated_subscriber_that_does_not_read_is_closed_4008() -> None:
    with trio.fail_after(60):
        config = make_config(queue_bytes=64 * 1024, slow_policy="disconnect")
        async with serving(config) as s:
            topic = s.topic()
            stuck = await RawClient.connect(s.addr, rcvbuf=4096)
            await stuck.send_json(
                {"op": "subscribe", "feed": "tracking", "fixture": "F1", "max_rate": MAX_RATE}
            )
            for expected in ("subscribed", "status"):
                frame = await stuck.read_frame()
                assert frame is not None and orjson.loads(frame[1])["type"] == expected
            published = 0
            while topic.slow_disconnects == 0:
                assert published < 20_000, "the stuck subscriber was never disconnected"
                published += 1
                topic.publish(FRAME % published, None)
                await trio.sleep(0.002)
            assert s.registry.slow_disconnects == 1
            texts, code = await stuck.read_until_close()
            assert code == 4008
            seqs = [orjson.loads(t)["seq"] for t in texts]
            assert seqs == sorted(seqs) and len(seqs) < published
            stuck.close()
