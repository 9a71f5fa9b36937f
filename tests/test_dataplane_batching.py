"""``write_delay``: a subscriber's frames held up to N ms and written with one system call.

Covers: the config key (default 0, bounds, TOML types) and the ``?write_delay=`` option of
``/v1/stream`` (validated: 400 otherwise); the connection class chosen (the plain, eager
:class:`Connection` unless a delay is asked for); frames arriving complete and in order,
batched (the connection's count of write system calls), and never earlier than the delay
allows nor later than the delay plus slack; the queue's byte budget still applying; the
:class:`WriteTicker`'s timing exactly, under ``MockClock``: a batch written one delay after its
first frame, batches opened close together sharing a wake-up, nothing while idle.

Rules: real sockets on 127.0.0.1 port 0 and real time, every test under ``trio.fail_after``;
no speed is asserted: the lower bounds follow from the delay itself (trio never wakes a sleep
early), the upper bounds have a generous slack. The ticker's own tests run on memory only,
under ``MockClock(autojump_threshold=0)`` (the suite's 120 s timeout bounds them).
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio

from gateway.config import ConfigError, structure_config
from gateway.dataplane import Connection, DelayedConnection, WriteTicker
from tests.kit import wait_until
from tests.test_config import errors_of, minimal
from tests.test_dataplane import ODD_FRAME, RawClient, Served, make_config, serving

#: Added to the delay for "arrives in time": a noisy 2-core VM stalls now and then.
SLACK = 2.0


def frame_text(i: int) -> str:
    return ODD_FRAME.replace('"ix" :0', f'"ix" :{i}')


async def connect_and_subscribe(s: Served, query: str = "") -> tuple[RawClient, Connection]:
    s.topic()  # the topic exists before anyone subscribes
    client = await RawClient.connect(s.addr, "/v1/stream" + query)
    assert client.status == 101
    await client.send_json({"op": "subscribe", "feed": "tracking", "fixture": "F1"})
    kinds: list[str] = []
    while len(kinds) < 2:
        frame = await client.read_frame()
        assert frame is not None
        kind = orjson.loads(frame[1])["type"]
        if kind != "heartbeat":
            kinds.append(kind)
    assert kinds == ["subscribed", "status"]
    # The newest connection: the registry keeps them in order.
    n = len(s.registry.connections_now())
    await wait_until(lambda: len(s.registry.connections_now()) >= max(n, 1))
    return client, s.registry.connections_now()[-1]


async def read_frames(client: RawClient, n: int) -> list[tuple[float, Any]]:
    """The next *n* data frames as (arrival time, message)."""
    got: list[tuple[float, Any]] = []
    while len(got) < n:
        frame = await client.read_frame()
        assert frame is not None, "closed early"
        message = orjson.loads(frame[1])
        if message["type"] == "frame":
            got.append((trio.current_time(), message))
    return got


# -- config ----------------------------------------------------------------------------------


def test_write_delay_config_default_bounds_and_types() -> None:
    assert structure_config(minimal()).subscribers.write_delay == 0.0
    assert structure_config(minimal(subscribers={"write_delay": 5})).subscribers.write_delay == 5
    for bad in (-1, 1001, 2.5):
        errors = errors_of(minimal(subscribers={"write_delay": bad}))
        assert any("write_delay" in e for e in errors), errors
    with pytest.raises(ConfigError):
        structure_config(minimal(subscribers={"write_delay": "5"}))


# -- the connection option -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("configured", "query", "cls", "delay"),
    [
        (0, "", Connection, 0.0),
        (0, "?write_delay=0", Connection, 0.0),
        (0, "?write_delay=5", DelayedConnection, 0.005),
        (20, "", DelayedConnection, 0.02),
        (20, "?write_delay=0", Connection, 0.0),
        (20, "?write_delay=3", DelayedConnection, 0.003),
    ],
)
async def test_connection_class_follows_config_and_query(
    configured: int, query: str, cls: type[Connection], delay: float
) -> None:
    with trio.fail_after(20):
        async with serving(make_config(write_delay=configured)) as s:
            client, conn = await connect_and_subscribe(s, query)
            assert type(conn) is cls
            assert conn.write_delay == pytest.approx(delay)
            client.close()


@pytest.mark.parametrize("value", ["abc", "-1", "1001", "2.5", "nan", "inf", "\u0661", ""])
async def test_bad_write_delay_is_refused_with_400(value: str) -> None:
    with trio.fail_after(20):
        async with serving(make_config()) as s:
            client = await RawClient.connect(s.addr, f"/v1/stream?write_delay={value}")
            assert client.status == 400 if value else client.status == 101
            client.close()


# -- batching over real sockets --------------------------------------------------------------


async def test_burst_goes_out_in_one_write_in_order_and_complete() -> None:
    with trio.fail_after(20):
        async with serving(make_config()) as s:
            client, conn = await connect_and_subscribe(s, "?write_delay=50")
            topic = s.topic()
            await wait_until(lambda: conn.idle)
            before = conn.writer_writes
            texts = [frame_text(i) for i in range(40)]
            for text in texts:
                topic.publish(text, None)
            got = await read_frames(client, len(texts))
            assert [m["seq"] for _, m in got] == list(range(1, 41))
            assert [orjson.dumps(m["data"]) for _, m in got] == [
                orjson.dumps(orjson.loads(t)) for t in texts
            ]
            # 40 frames, one system call (about 7 KB: the socket buffer takes it whole).
            assert conn.writer_writes - before == 1
            assert conn.frames_sent == 40
            client.close()


async def test_trickled_frames_are_batched_and_arrive_within_the_delay() -> None:
    delay = 0.1
    with trio.fail_after(30):
        async with serving(make_config()) as s:
            client, conn = await connect_and_subscribe(s, "?write_delay=100")
            topic = s.topic()
            published: dict[int, float] = {}
            got: list[tuple[float, Any]] = []

            async def reader() -> None:
                got.extend(await read_frames(client, 30))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                before = conn.writer_writes
                start = trio.current_time()
                for i in range(30):
                    published[i + 1] = trio.current_time()
                    topic.publish(frame_text(i), None)
                    await trio.sleep(0.01)
            elapsed = trio.current_time() - start
            assert [m["seq"] for _, m in got] == list(range(1, 31))
            # At most one batch per delay (one write each: the batches are small).
            writes = conn.writer_writes - before
            assert 1 <= writes <= elapsed / delay + 2
            assert writes < 30
            for arrived, m in got:
                assert arrived - published[m["seq"]] <= delay + SLACK
            client.close()


async def test_a_frame_right_after_a_batch_waits_for_the_delay() -> None:
    """The lower bound: the next batch is never taken before the delay has passed."""
    delay = 0.2
    with trio.fail_after(20):
        async with serving(make_config()) as s:
            client, _ = await connect_and_subscribe(s, "?write_delay=200")
            topic = s.topic()
            await trio.sleep(delay)  # the replies' batch is older than the delay
            t0 = trio.current_time()
            topic.publish(frame_text(0), None)
            await read_frames(client, 1)
            topic.publish(frame_text(1), None)
            [(t3, m)] = await read_frames(client, 1)
            assert m["seq"] == 2
            assert t3 - t0 >= delay - 0.001
            client.close()


async def test_a_batch_opens_with_its_first_frame_and_holds_its_window() -> None:
    """After a quiet spell the first frame still waits the whole delay (it opens the batch),
    and a frame published inside that window goes out with it, in the same write."""
    delay = 0.5
    with trio.fail_after(20):
        async with serving(make_config()) as s:
            client, conn = await connect_and_subscribe(s, "?write_delay=500")
            topic = s.topic()
            await wait_until(lambda: conn.idle)
            await trio.sleep(delay)  # quiet for longer than the delay
            before = conn.writer_writes
            t0 = trio.current_time()
            topic.publish(frame_text(0), None)
            await trio.sleep(0.05)  # pacing the publisher: well inside the window
            topic.publish(frame_text(1), None)
            got = await read_frames(client, 2)
            assert [m["seq"] for _, m in got] == [1, 2]
            assert got[0][0] - t0 >= delay - 0.001  # trio never wakes a sleep early
            assert conn.writer_writes - before == 1
            client.close()


async def test_eager_connection_unchanged_writes_nothing_through_the_writer() -> None:
    with trio.fail_after(20):
        async with serving(make_config()) as s:
            client, conn = await connect_and_subscribe(s)
            await wait_until(lambda: conn.idle)
            before = conn.writer_writes
            topic = s.topic()
            for i in range(5):
                topic.publish(frame_text(i), None)
            got = await read_frames(client, 5)
            assert [m["seq"] for _, m in got] == [1, 2, 3, 4, 5]
            # Written eagerly by the publisher: the writer task had nothing to do.
            assert conn.writer_writes == before
            client.close()


async def test_budget_still_applies_with_a_delay() -> None:
    with trio.fail_after(20):
        async with serving(make_config(queue_bytes=4096)) as s:
            client, conn = await connect_and_subscribe(s, "?write_delay=500")
            topic = s.topic()
            for i in range(40):  # ~7 KB at once, held for the delay: over the 4 KB budget
                topic.publish(frame_text(i), None)
            _, code = await client.read_until_close()
            assert code == 4008
            assert conn.slow_disconnected
            client.close()


async def test_subscribers_of_one_delay_share_one_tick() -> None:
    """One ticker task per delay writes every subscriber's batch: one wake-up, one write each."""
    with trio.fail_after(20):
        async with serving(make_config(write_delay=50)) as s:
            topic = s.topic()
            clients: list[RawClient] = []
            conns: list[DelayedConnection] = []
            for _ in range(5):
                client, conn = await connect_and_subscribe(s)
                assert isinstance(conn, DelayedConnection)
                clients.append(client)
                conns.append(conn)
                await wait_until(lambda c=conn: c.idle)
            ticker = conns[0].ticker
            assert all(c.ticker is ticker for c in conns)
            ticks = ticker.ticks
            before = [c.writer_writes for c in conns]
            for i in range(20):
                topic.publish(frame_text(i), None)
            for client in clients:
                got = await read_frames(client, 20)
                assert [m["seq"] for _, m in got] == list(range(1, 21))
            assert ticker.ticks - ticks == 1
            assert [c.writer_writes - b for c, b in zip(conns, before, strict=True)] == [1] * 5
            for client in clients:
                client.close()


# -- the ticker's timing, under MockClock --------------------------------------------------


class Batch:
    """A stand-in for a delayed connection or group: records when the ticker wrote it."""

    def __init__(self, name: str, log: list[tuple[str, float]]) -> None:
        self.name = name
        self.log = log

    def flush_tick(self) -> None:
        self.log.append((self.name, trio.current_time()))


async def test_a_batch_is_written_one_delay_after_it_opened(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A batch waits exactly the delay from its first frame, whatever the previous batch did;
    batches opened within COALESCE of the delay share a wake-up (written early, never late)."""
    ticker = WriteTicker(0.010)
    log: list[tuple[str, float]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        await trio.sleep(1.0)  # idle: no wake-up
        assert ticker.ticks == 0
        t0 = trio.current_time()
        ticker.schedule(Batch("a", log))
        await trio.sleep(0.001)  # within 1.25 ms of a: written with it
        ticker.schedule(Batch("b", log))
        await trio.sleep(0.002)  # 3 ms after a: its own wake-up
        ticker.schedule(Batch("c", log))
        await trio.sleep(0.050)
        assert [(name, round(t - t0, 6)) for name, t in log] == [
            ("a", 0.010),
            ("b", 0.010),
            ("c", 0.013),
        ]
        assert ticker.ticks == 2
        # A batch opened right after one was written waits a whole delay again.
        log.clear()
        t1 = trio.current_time()
        ticker.schedule(Batch("d", log))
        await trio.sleep(0.010)
        ticker.schedule(Batch("e", log))
        await trio.sleep(0.050)
        assert [(name, round(t - t1, 6)) for name, t in log] == [("d", 0.010), ("e", 0.020)]
        nursery.cancel_scope.cancel()


async def test_a_batch_opened_while_writing_is_due_a_delay_later(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """What a write schedules (a member leaving a group queues its frames) is not written in
    the same wake-up: it waits its own delay."""
    ticker = WriteTicker(0.005)
    log: list[tuple[str, float]] = []

    class Reopens(Batch):
        def flush_tick(self) -> None:
            super().flush_tick()
            ticker.schedule(Batch("again", log))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        t0 = trio.current_time()
        ticker.schedule(Reopens("first", log))
        await trio.sleep(0.1)
        assert [(name, round(t - t0, 6)) for name, t in log] == [("first", 0.005), ("again", 0.010)]
        nursery.cancel_scope.cancel()


def test_a_ticker_needs_a_positive_interval() -> None:
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="interval > 0"):
            WriteTicker(bad)
