"""The replay core on its own (gateway/replay): the pacer (pure numbers and under MockClock
over memory), :func:`run_replay` with an in-memory source and backlog (pacing, looped, the end,
backpressure and the slow-consumer rule), and :func:`open_source` / :class:`HeldSource` over a
real recorder in a temp dir (chunked reads, the start of the fixture, positions, catching up
with a live topic).

Rules of tests/conftest.py: every test has a hard ``trio.fail_after``; MockClock only over
memory; real files for the recorder, nothing sleeps a guessed time.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import pytest
import trio
import trio.testing

from gateway.config import FeedConfig, RecorderSection, ReplaySection, Secret, UpstreamSection
from gateway.hub import Topic
from gateway.recorder import FixtureLog, Recorder
from gateway.replay import (
    CATCH_UP,
    EndReason,
    HeldSource,
    LimitReached,
    NotHeld,
    Pacer,
    PassThroughEnd,
    PassThroughError,
    ReplayFrame,
    ReplayLimits,
    ReplayRequest,
    Replays,
    SourceKind,
    SourceLost,
    Start,
    VendorLink,
    open_source,
    run_replay,
    valid_rate,
)
from gateway.upstream import ConnectLimiter, UpstreamClosed
from tests.kit import wait_until

# -- the pacer ---------------------------------------------------------------------------------


def _windows(times: list[float], width: float = 1.0, step: float = 0.01) -> int:
    """The most of *times* in any half-open window of *width* seconds."""
    best = 0
    t = times[0] if times else 0.0
    end = times[-1] if times else 0.0
    while t <= end:
        best = max(best, sum(1 for x in times if t <= x < t + width))
        t += step
    return best


def test_rates_are_integers_from_1_to_1000() -> None:
    assert valid_rate(1) and valid_rate(1000)
    for bad in (0, 1001, -5, 4.0, True, "40", None):
        assert not valid_rate(bad)
    with pytest.raises(ValueError, match="rate must be an integer 1 to 1000"):
        Pacer(0)


def test_the_pacer_spaces_frames_evenly_and_catches_up_only_a_little() -> None:
    pacer = Pacer(40)
    now = 100.0
    pacer.start(now)
    sent: list[float] = []
    while now < 104.0:
        now += pacer.delay(now)
        sent.append(now)
        pacer.sent(now)
    assert len(sent) == 161  # 0 .. 4.0 s inclusive, 25 ms apart
    gaps = {round(b - a, 6) for a, b in itertools.pairwise(sent)}
    assert gaps == {0.025}
    # Two seconds late (a stalled client, a busy loop): a few frames at once, never 80.
    now += 2.0
    burst = 0
    while pacer.delay(now) == 0.0:
        pacer.sent(now)
        burst += 1
    assert burst == CATCH_UP + 1
    # At 1000/s the catch-up is 50 ms worth (a disk read or a busy loop is a few periods).
    fast = Pacer(1000)
    fast.start(0.0)
    fast.sent(0.0)
    now = 2.0
    burst = 0
    while fast.delay(now) == 0.0:
        fast.sent(now)
        burst += 1
    assert 50 <= burst <= 52  # 50 ms of 1 ms periods, both ends


async def test_forty_a_second_over_four_seconds_under_the_mock_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    times = await _paced_run(rate=40, seconds=4.0, frames=10_000, looped=False)
    assert 144 <= len(times) <= 176  # 160 +/- 10 %
    assert _windows(times) <= 50


# -- run_replay ---------------------------------------------------------------------------------


class ListSource:
    """An in-memory ReplaySource of frames 1..n (ix = seq - 1), in batches of *batch*."""

    kind: SourceKind = "memory"
    epoch = "e1"

    def __init__(self, n: int, batch: int = 7, lose_at: int | None = None) -> None:
        self.frames = [ReplayFrame(s, b'{"ix":%d}' % (s - 1), s - 1) for s in range(1, n + 1)]
        self.batch = batch
        self.first_seq = 1
        self._next = 0
        self.reads = 0
        self.closed = False
        self.lose_at = lose_at

    async def read(self) -> list[ReplayFrame]:
        await trio.lowlevel.checkpoint()
        self.reads += 1
        if self.lose_at is not None and self._next >= self.lose_at:
            raise SourceLost("gone")
        out = self.frames[self._next : self._next + self.batch]
        self._next += len(out)
        return out

    def rewind(self) -> None:
        self._next = 0

    def close(self) -> None:
        self.closed = True


class MemoryBacklog:
    """A transport whose client takes bytes when :meth:`drain` is called (or never)."""

    def __init__(self) -> None:
        self.queued = 0
        self._changed = trio.Event()

    def unsent(self) -> int:
        return self.queued

    async def wait_below(self, limit: int) -> None:
        while self.queued >= limit:
            await self._changed.wait()
            self._changed = trio.Event()

    def drain(self) -> None:
        self.queued = 0
        self._changed.set()


async def _paced_run(*, rate: int, seconds: float, frames: int, looped: bool) -> list[float]:
    source = ListSource(frames)
    times: list[float] = []

    async def send(frame: ReplayFrame) -> None:
        times.append(trio.current_time() - t0)

    backlog = MemoryBacklog()  # never fills: nothing is counted in it
    t0 = trio.current_time()
    with trio.move_on_after(seconds):
        await run_replay(
            source,
            Pacer(rate),
            send,
            backlog=backlog,
            limits=ReplayLimits(budget_bytes=1 << 20, stall_timeout=30.0),
            looped=looped,
        )
    return times


async def test_a_replay_ends_at_the_last_frame_and_a_looped_one_starts_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        seen: list[int] = []

        async def send(frame: ReplayFrame) -> None:
            seen.append(frame.seq)

        limits = ReplayLimits(budget_bytes=1 << 20, stall_timeout=30.0)
        source = ListSource(20)
        result = await run_replay(source, Pacer(100), send, backlog=MemoryBacklog(), limits=limits)
        assert (result.reason, result.last_seq, result.frames, result.passes) == (
            EndReason.END,
            20,
            20,
            1,
        )
        assert seen == list(range(1, 21)) and source.closed

        seen.clear()
        loops: list[int] = []

        async def on_loop(n: int) -> None:
            loops.append(n)

        source = ListSource(20)
        with trio.move_on_after(0.995):  # 100 frames at 100/s, the 100th at 0.99 s
            await run_replay(
                source,
                Pacer(100),
                send,
                backlog=MemoryBacklog(),
                limits=limits,
                looped=True,
                on_loop=on_loop,
            )
        assert seen == list(range(1, 21)) * 5
        assert loops == [2, 3, 4, 5] and source.closed  # closed on cancellation too

        # Nothing held: the end at once, looped or not (no busy loop).
        result = await run_replay(
            ListSource(0), Pacer(10), send, backlog=MemoryBacklog(), limits=limits, looped=True
        )
        assert (result.reason, result.frames) == (EndReason.END, 0)


async def test_a_client_that_does_not_read_stops_the_reading_and_then_the_replay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(120):
        backlog = MemoryBacklog()
        source = ListSource(10_000, batch=10)
        replays = Replays()
        sent: list[int] = []

        async def send(frame: ReplayFrame) -> None:
            backlog.queued += 1000  # the client takes nothing until drained
            sent.append(frame.seq)

        limits = ReplayLimits(budget_bytes=50_000, stall_timeout=10.0)
        async with trio.open_nursery() as nursery:

            async def client() -> None:
                # Reads once, late (after 5 s: within the stall limit), then never again.
                await trio.sleep(5.0)
                # Waited, reading nothing more than the batch in hand and one ahead.
                assert len(sent) == 50 and source.reads == 7
                backlog.drain()

            nursery.start_soon(client)
            result = await run_replay(
                source,
                Pacer(1000),
                send,
                backlog=backlog,
                limits=limits,
                counters=replays.counters,
            )
        assert result.reason is EndReason.SLOW_CONSUMER
        assert result.frames == 100 and result.last_seq == 100 and source.reads == 12
        assert replays.counters.slow_consumers == 1 and replays.counters.frames == 100


async def test_a_send_that_blocks_is_a_slow_consumer_and_a_lost_source_says_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(120):
        limits = ReplayLimits(budget_bytes=1 << 20, stall_timeout=3.0)

        async def stuck(frame: ReplayFrame) -> None:
            if frame.seq == 3:
                await trio.sleep_forever()

        result = await run_replay(
            ListSource(10), Pacer(10), stuck, backlog=MemoryBacklog(), limits=limits
        )
        assert (result.reason, result.last_seq) == (EndReason.SLOW_CONSUMER, 2)

        async def fine(frame: ReplayFrame) -> None:
            pass

        result = await run_replay(
            ListSource(30, batch=10, lose_at=20),
            Pacer(100),
            fine,
            backlog=MemoryBacklog(),
            limits=limits,
        )
        assert (result.reason, result.last_seq, result.detail) == (
            EndReason.SOURCE_LOST,
            20,
            "gone",
        )


def test_the_limits_refuse_past_each_cap_and_count() -> None:
    replays = Replays(ReplaySection(max_replays=1, max_local=2, max_per_connection=2))
    a = replays.local("recording")
    replays.local("memory", on_connection=1)
    with pytest.raises(LimitReached, match="max_local 2"):
        replays.local("recording")
    with pytest.raises(LimitReached, match="max_per_connection 2"):
        replays.local("recording", on_connection=2)
    a.release()
    a.release()  # idempotent
    replays.local("stream")
    v = replays.vendor()
    with pytest.raises(LimitReached, match="max_replays 1"):
        replays.vendor()
    v.release()
    c = replays.counters
    assert dict(c.active) == {"recording": 0, "memory": 1, "stream": 1, "vendor": 0}
    assert dict(c.total) == {"recording": 1, "memory": 1, "stream": 1, "vendor": 1}
    assert dict(c.refused) == {"max_local": 1, "max_per_connection": 1, "max_replays": 1}


# -- sources over a real recording ----------------------------------------------------------------

FEED = FeedConfig(kind="tracking", url="ws://x/y", history=50, name="tracking")


def _tracking(ix: int) -> bytes:
    # The vendor's field order; ph 1 for ix < 500, then ph 2 with the clock restarted.
    ph, mt = (1, ix * 40) if ix < 500 else (2, (ix - 500) * 40)
    return (
        b'{"id":"m1","ix":%d,"mt":%d,"ph":%d,"st":"running","ut":%d,"ba":{"jn":-1},"hm":[%s]}'
        % (ix, mt, ph, 1_682_899_391_822 + ix * 40, b",".join([b'{"tr":"1","mt":0}'] * 20))
    )


@asynccontextmanager
async def recorded_topic(
    root: Path, first_ix: int, n: int
) -> AsyncIterator[tuple[Topic, FixtureLog, Callable[[int], None]]]:
    """A topic with a recorder behind it (as the service wires them), frames ix first_ix.. ;
    yields (topic, log, publish(count))."""
    rec = Recorder(RecorderSection(dir=root, segment_bytes=64 * 1024))
    lg = rec.fixture("tracking", "m1")
    rec.activate(lg)
    topic = Topic(FEED, "m1")
    topic.archive = lg
    next_ix = [first_ix]

    def publish(count: int) -> None:
        for _ in range(count):
            raw = _tracking(next_ix[0])
            topic.publish(raw, next_ix[0])
            rec.append(lg, topic.seq, next_ix[0], raw)
            next_ix[0] += 1

    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run)
        for _ in range(0, n, 200):  # several writer batches: several segments
            publish(min(200, n - topic.seq))
            await wait_until(lambda: lg.written_seq == topic.seq)
        yield topic, lg, publish
        nursery.cancel_scope.cancel()


async def _drain(source: HeldSource) -> list[ReplayFrame]:
    out: list[ReplayFrame] = []
    while batch := await source.read():
        out += batch
    return out


async def test_a_whole_recording_is_read_in_bounded_chunks(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with recorded_topic(tmp_path, 0, 2000) as (topic, lg, publish):
            assert len(lg.segments) >= 3  # several segments, compressed or not
            chunk = 16 * 1024
            source = await open_source(topic, Start.first(), chunk_bytes=chunk)
            assert isinstance(source, HeldSource) and source.kind == "recording"
            frames = await _drain(source)
            assert [f.seq for f in frames] == list(range(1, 2001))
            assert [f.position for f in frames] == list(range(2000))
            assert frames[1234].raw == _tracking(1234)  # verbatim
            stats = source.stats
            frame_bytes = len(_tracking(1999))
            assert stats.bytes == sum(len(f.raw) for f in frames)  # about 1 MB in all
            assert stats.largest_read <= chunk + frame_bytes  # never more than a chunk
            assert stats.reads >= stats.bytes // (chunk + frame_bytes)

            # Live: the end is what is held when the source gets there.
            publish(30)
            more = await _drain(source)
            assert [f.seq for f in more] == list(range(2001, 2031))
            source.rewind()
            assert (await source.read())[0].seq == 1
            source.close()


async def test_the_start_must_be_held(tmp_path: Path) -> None:
    with trio.fail_after(60):
        # Joined late: the oldest frame held is ix 300, not the fixture's first.
        async with recorded_topic(tmp_path / "late", 300, 400) as (topic, _, _):
            refused = await open_source(topic, Start.first())
            assert refused == NotHeld("no recording reaches the start of tracking/m1")
            # A seq, or a time after the oldest frame held, is held.
            by_seq = await open_source(topic, Start.at_seq(120))
            assert isinstance(by_seq, HeldSource) and by_seq.first_seq == 120
            by_ut = await open_source(topic, Start.at_ut(1_682_899_391_822 + 350 * 40 + 1))
            assert isinstance(by_ut, HeldSource) and by_ut.first_seq == 52  # ix 351
            assert isinstance(await open_source(topic, Start.at_ut(0)), NotHeld)
            assert isinstance(await open_source(topic, Start.at_seq(401)), NotHeld)

        # From ix 0: every start is found, by time too.
        async with recorded_topic(tmp_path / "full", 0, 700) as (topic, _, _):
            first = await open_source(topic, Start.first())
            assert isinstance(first, HeldSource) and first.first_seq == 1
            mt = await open_source(topic, Start.at_match_time(2, 4000))
            assert isinstance(mt, HeldSource) and mt.first_seq == 601  # ix 600: ph 2, mt 4000
            assert (await mt.read())[0].raw == _tracking(600)
            assert isinstance(await open_source(topic, Start.at_match_time(3, 0)), NotHeld)


async def test_without_an_archive_the_memory_history_must_reach_the_start() -> None:
    with trio.fail_after(30):
        topic = Topic(FEED, "m1")  # history 50 frames
        for ix in range(40):
            topic.publish(_tracking(ix), ix)
        source = await open_source(topic, Start.first())
        assert isinstance(source, HeldSource) and source.kind == "memory"
        assert [f.position for f in await _drain(source)] == list(range(40))
        for ix in range(40, 60):  # ix 0..9 fall out of the history
            topic.publish(_tracking(ix), ix)
        assert isinstance(await open_source(topic, Start.first()), NotHeld)
        source.rewind()
        with pytest.raises(SourceLost, match="frame 1 of tracking/m1 is no longer held"):
            await source.read()


# -- the vendor pass-through with a scripted vendor (memory) -------------------------------------


class ScriptedVendor:
    """An UpstreamConnection that answers with *script*, then closes; keeps what it was sent."""

    def __init__(self, script: list[str]) -> None:
        self.script = list(script)
        self.sent: list[str] = []
        self.closed = False

    async def send_message(self, message: str) -> None:
        await trio.lowlevel.checkpoint()
        self.sent.append(message)

    async def get_message(self) -> str | bytes:
        await trio.lowlevel.checkpoint()
        if not self.script:
            raise UpstreamClosed(1000, "done")
        return self.script.pop(0)

    async def aclose(self) -> None:
        self.closed = True


async def test_a_pass_through_relays_the_vendor_verbatim_but_never_its_token() -> None:
    token = "tok-SECRET-5f0c2e9a-never-log-me"
    frame = '{"id":"F1","ix":0,"mt":0, "ph":1}'
    vendor = ScriptedVendor(
        [
            '{"message":"Heartbeat sent at 2026-01-01T00:00:00.000Z","level":"INFO"}',
            '{"message":"Authorisation accepted","level":"INFO"}',
            f'{{"message":"odd: {token}","level":"WARN"}}',
            frame,
            '{"message":"Heartbeat sent at 2026-01-01T00:00:10.000Z","level":"INFO"}',
        ]
    )
    connected: list[str] = []

    @asynccontextmanager
    async def connect(
        url: str, *, headers: Sequence[tuple[bytes, bytes]], connect_timeout: float
    ) -> AsyncIterator[ScriptedVendor]:
        connected.append(url)
        try:
            yield vendor
        finally:
            await vendor.aclose()

    async def read_token(up: UpstreamSection) -> Secret:
        await trio.lowlevel.checkpoint()
        return Secret(token)

    up = UpstreamSection(token_env="UNUSED")
    limiter = ConnectLimiter(5.0)
    link = VendorLink(
        limiter=limiter, connector=lambda: connect, upstream=lambda: up, read_token=read_token
    )
    relayed: list[str] = []

    async def send(text: str) -> None:
        relayed.append(text)

    replays = Replays()
    with trio.fail_after(10):
        end = await link.pass_through(
            FEED,
            ReplayRequest("F1", None, 25, True),
            send,
            backlog=MemoryBacklog(),
            limits=ReplayLimits(1 << 20, 5.0),
            counters=replays.counters,
        )
    assert end is PassThroughEnd.VENDOR_CLOSED and vendor.closed
    assert connected == [FEED.url] and link.connects == 1
    auth, request = vendor.sent
    assert orjson.loads(auth) == {"authToken": token}
    assert orjson.loads(request) == {
        "fixtureId": "F1",
        "backfill": -1,
        "replay": {"enabled": True, "packetsPerSecond": 25, "looped": True},
    }
    assert relayed == ['{"message":"odd: <redacted>","level":"WARN"}', frame]
    assert replays.counters.frames == 1


async def test_a_vendor_that_refuses_the_token_is_a_clear_error() -> None:
    vendor = ScriptedVendor(['{"errorMessage":"Supplied token could not be authenticated"}'])

    @asynccontextmanager
    async def connect(
        url: str, *, headers: Sequence[tuple[bytes, bytes]], connect_timeout: float
    ) -> AsyncIterator[ScriptedVendor]:
        yield vendor

    async def read_token(up: UpstreamSection) -> Secret:
        await trio.lowlevel.checkpoint()
        return Secret("tok-SECRET-5f0c2e9a-never-log-me")

    link = VendorLink(
        limiter=ConnectLimiter(5.0),
        connector=lambda: connect,
        upstream=lambda: UpstreamSection(token_env="UNUSED"),
        read_token=read_token,
    )

    async def send(text: str) -> None:
        raise AssertionError("nothing is relayed")

    with trio.fail_after(10), pytest.raises(PassThroughError) as caught:
        await link.pass_through(
            FEED,
            ReplayRequest("F1", 5, 25, False),
            send,
            backlog=MemoryBacklog(),
            limits=ReplayLimits(1 << 20, 5.0),
        )
    assert str(caught.value) == "the vendor refused the gateway's token"
    assert "SECRET" not in repr(caught.value)
    assert len(vendor.sent) == 1  # the auth message only: no request after a refusal
    assert orjson.loads(ReplayRequest("F1", 5, 25, False).text())["backfill"] == 5
