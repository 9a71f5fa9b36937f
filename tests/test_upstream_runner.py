"""The upstream supervisor over a fake in-memory connector, under MockClock.

Covers: the global connect rate with 50 fixtures failing at once, the stall watchdog, backoff
delays between attempts, tracking resume widening, state transitions (unauthorized, not_found,
stopped), token handling (missing token file, re-read per attempt, never leaked), crash isolation
between fixtures, and config reload. No sockets: every test runs on memory channels with
``autojump_clock`` (MockClock, autojump_threshold=0), so timings are exact virtual seconds.

The token is read on the event loop here (``read_token_on_loop``), not in the production
reader's worker thread: while a thread runs every task looks blocked, so MockClock would jump
to the next deadline and the timings would no longer be exact (this was seen: a handful of
these tests failed at random). The production reader has its own tests below, and the
simulator tests run it on the real clock.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
import trio.testing

from gateway.config import (
    Config,
    FixtureConfig,
    Secret,
    SecretError,
    UpstreamSection,
    structure_config,
)
from gateway.model import FixtureState, ResumePoint
from gateway.upstream import (
    FASTPATH_ACCEPT,
    MAX_MALFORMED_RUN,
    TOKEN_POLL_INTERVAL,
    Backoff,
    FixtureRunner,
    Supervisor,
    UpstreamClosed,
    UpstreamConnection,
    UpstreamRejected,
    UpstreamUnavailable,
    read_token_off_loop,
)
from tests.conftest import TEST_TOKEN
from tests.kit import RecordingSink

ACCEPTED = '{"message":"Authorisation accepted","level":"INFO"}'
HEARTBEAT = '{"message":"Heartbeat sent at 2023-05-01T00:03:11.822Z","level":"INFO"}'


def frame(ix: int) -> str:
    return orjson.dumps({"id": "f1", "ix": ix, "mt": ix * 40}).decode()


def make_config(tmp_path: Path, upstream: dict[str, Any] | None = None, **extra: Any) -> Config:
    token_file = tmp_path / "token"
    if not token_file.exists():
        token_file.write_text(TEST_TOKEN + "\n")
    up = {
        "token_file": str(token_file),
        "connect_rate": 1000.0,
        "backoff_initial": 0.1,
        "backoff_max": 1.0,
        "stall_timeout": 5.0,
        "handshake_timeout": 3.0,
        "unauthorized_retry": 60.0,
        "not_found_retry": 30.0,
    }
    up.update(upstream or {})
    data: dict[str, Any] = {
        "upstream": up,
        "feeds": {
            "trk": {"kind": "tracking", "url": "ws://upstream.test/ws/soccer/tracking"},
            "fp": {
                "kind": "fastpath",
                "url": "ws://upstream.test/soccer/fixtures/{fixture}/actions",
            },
        },
    }
    data.update(extra)
    return structure_config(data)


async def read_token_on_loop(up: UpstreamSection) -> Secret:
    """The token read in place, as before it moved to a thread (see the module docstring)."""
    return up.read_token()


_CLOSE = object()


class FakeConn:
    """Client side of an in-memory connection; the test's server script drives the other side."""

    def __init__(self) -> None:
        self._to_client_send, self._to_client = trio.open_memory_channel[Any](math.inf)
        self._to_server_send, self.from_client = trio.open_memory_channel[str](1000)
        self.closed_by_client = False
        self._close_code: int | None = None

    # client API (UpstreamConnection)
    async def send_message(self, message: str) -> None:
        if self._close_code is not None or self.closed_by_client:
            raise UpstreamClosed(self._close_code or 1006)
        await self._to_server_send.send(message)

    async def get_message(self) -> str | bytes:
        if self.closed_by_client:
            raise UpstreamClosed(1000)
        item = await self._to_client.receive()
        if isinstance(item, tuple) and item[0] is _CLOSE:
            self._close_code = item[1]
            raise UpstreamClosed(item[1])
        assert isinstance(item, str | bytes)
        return item

    async def aclose(self) -> None:
        self.closed_by_client = True
        await trio.lowlevel.checkpoint()

    # server API
    def push(self, message: str | bytes) -> None:
        self._to_client_send.send_nowait(message)

    def close(self, code: int) -> None:
        self._to_client_send.send_nowait((_CLOSE, code))

    async def recv(self) -> dict[str, Any]:
        text = await self.from_client.receive()
        obj: dict[str, Any] = orjson.loads(text)
        return obj


@attrs.define
class Attempt:
    at: float
    url: str
    headers: list[tuple[bytes, bytes]]
    conn: FakeConn


Script = Callable[[FakeConn, Attempt], Awaitable[None]]


def accepting_only(
    token: str,
    refusal: str = '{"errorMessage":"Supplied token could not be authenticated"}',
    close_code: int = 1008,
) -> Script:
    """A vendor that refuses every token but *token* (*refusal*, then *close_code*), and
    streams frame 1 on from an accepted subscription."""

    async def script(conn: FakeConn, attempt: Attempt) -> None:
        auth = await conn.recv()
        if auth.get("authToken") != token:
            conn.push(refusal)
            conn.close(close_code)
            return
        conn.push(ACCEPTED)
        await conn.recv()
        conn.push(frame(1))
        await trio.sleep_forever()

    return script


class FakeConnector:
    """Records attempts; ``script`` plays the server for each one (in the test's nursery).

    ``refuse(attempt)`` may return an exception to raise instead of connecting.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        script: Script,
        refuse: Callable[[Attempt], BaseException | None] | None = None,
    ) -> None:
        self.nursery = nursery
        self.script = script
        self.refuse = refuse
        self.attempts: list[Attempt] = []
        self.closed: list[FakeConn] = []

    @asynccontextmanager
    async def __call__(
        self, url: str, *, headers: Sequence[tuple[bytes, bytes]], connect_timeout: float
    ) -> AsyncIterator[UpstreamConnection]:
        conn = FakeConn()
        attempt = Attempt(trio.current_time(), url, list(headers), conn)
        self.attempts.append(attempt)
        await trio.lowlevel.checkpoint()
        if self.refuse is not None:
            exc = self.refuse(attempt)
            if exc is not None:
                raise exc
        self.nursery.start_soon(self.script, conn, attempt)
        try:
            yield conn
        finally:
            await conn.aclose()
            self.closed.append(conn)


async def tracking_server(conn: FakeConn, attempt: Attempt, frames: int = 10) -> None:
    auth = await conn.recv()
    assert auth == {"authToken": TEST_TOKEN}
    conn.push(ACCEPTED)
    await conn.recv()
    for i in range(frames):
        conn.push(frame(i))
    await trio.sleep_forever()


@asynccontextmanager
async def running(
    config: Config,
    script: Script,
    refuse: Callable[[Attempt], BaseException | None] | None = None,
    **supervisor: Any,  # resume_for, watchers
) -> AsyncIterator[tuple[Supervisor, FakeConnector, dict[tuple[str, str], RecordingSink]]]:
    sinks: dict[tuple[str, str], RecordingSink] = {}

    def sink_for(feed: Any, fixture: FixtureConfig) -> RecordingSink:
        return sinks.setdefault(fixture.key, RecordingSink())

    async with trio.open_nursery() as nursery:
        connector = FakeConnector(nursery, script, refuse)
        sup = Supervisor(
            config,
            sink_for,
            connect=connector,
            rng=random.Random(7),
            read_token=read_token_on_loop,
            **supervisor,
        )
        await nursery.start(sup.run)
        # Virtual time: a hang fails fast with a traceback instead of burning pytest-timeout.
        with trio.fail_after(3600):
            yield sup, connector, sinks
        nursery.cancel_scope.cancel()


async def until(predicate: Callable[[], bool], step: float = 0.01) -> None:
    """Poll (virtual time under MockClock); the caller's fail_after bounds it."""
    while True:
        if predicate():
            return
        await trio.sleep(step)


async def wait_state(sup: Supervisor, feed: str, fx: str, state: FixtureState) -> None:
    while True:
        handle = sup.get(feed, fx)
        assert handle is not None
        if handle.status.state == state:
            return
        await trio.sleep(0.01)


# -- rate limit --------------------------------------------------------------------------------


async def test_fifty_failing_fixtures_respect_global_connect_rate(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rate = 5.0
    fixtures = [{"feed": "trk", "id": f"fx{i}"} for i in range(50)]
    config = make_config(
        tmp_path,
        {"connect_rate": rate, "backoff_initial": 0.01, "backoff_max": 0.05},
        fixtures=fixtures,
    )

    async def never(conn: FakeConn, attempt: Attempt) -> None:
        raise AssertionError("no attempt should connect")

    async with running(config, never, refuse=lambda a: UpstreamUnavailable("refused")) as (
        sup,
        connector,
        _,
    ):
        await trio.sleep(60.0)
        # Waiting for a limiter slot counts as connecting.
        states = {h.status.state for h in sup.handles()}
        assert states <= {FixtureState.BACKOFF, FixtureState.CONNECTING}
        assert all(h.status.last_error == "refused" for h in sup.handles())
    times = sorted(a.at for a in connector.attempts)
    # Backoff is tiny, so the limiter alone decides: about rate attempts per second.
    assert len(times) >= 250
    j = 0
    for i, t in enumerate(times):
        while times[j] < t - 1.0:
            j += 1
        assert i - j + 1 <= rate + 1, f"{i - j + 1} attempts in [{t - 1.0}, {t}]"


async def test_rate_limit_fairness_first_round(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """All 50 fixtures get their first attempt before any fixture gets a third one."""
    fixtures = [{"feed": "fp", "id": f"fx{i}"} for i in range(50)]
    config = make_config(
        tmp_path,
        {"connect_rate": 5.0, "backoff_initial": 0.01, "backoff_max": 0.05},
        fixtures=fixtures,
    )

    async def never(conn: FakeConn, attempt: Attempt) -> None:
        raise AssertionError

    async with running(config, never, refuse=lambda a: UpstreamUnavailable("x")) as (_, c, _s):
        await trio.sleep(30.0)
    seen: set[str] = set()
    counts: dict[str, int] = {}
    for a in c.attempts:
        counts[a.url] = counts.get(a.url, 0) + 1
        if len(seen) < 50:
            assert counts[a.url] <= 2
        seen.add(a.url)
    assert len(seen) == 50


async def test_waiting_fixtures_connect_watched_then_most_recent_first(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A restart: the resume points (the recording's last frames) say which fixtures were active
    most recently, the hub which have subscribers; the supervisor hands both to the limiter."""
    fixtures = [{"feed": "fp", "id": f"fx{i}"} for i in range(6)]
    up = {"connect_rate": 1.0, "backoff_initial": 20.0, "backoff_max": 20.0}
    config = make_config(tmp_path, up, fixtures=fixtures)
    recent = {"fx2": 100.0, "fx4": 200.0}
    watchers = {"fx5": 1}

    def resume_for(feed: Any, fixture: FixtureConfig) -> ResumePoint | None:
        at = recent.get(fixture.id)
        return None if at is None else ResumePoint(position=1, received_at=at)

    async with running(
        config,
        tracking_server,
        refuse=lambda a: UpstreamUnavailable("x"),
        resume_for=resume_for,
        watchers=lambda feed, fx: watchers.get(fx, 0),
    ) as (_, c, _s):
        await trio.sleep(5.5)
    order = list(dict.fromkeys(a.url.split("/")[-2] for a in c.attempts))
    # All reach the limiter before the first slot is granted (the first one's zero wait is a
    # checkpoint): watched, then by the last frame before the restart, then in arrival order.
    assert order[:3] == ["fx5", "fx4", "fx2"]
    assert sorted(order[3:]) == ["fx0", "fx1", "fx3"]


# -- backoff between attempts --------------------------------------------------------------------


async def test_backoff_delays_grow_and_stay_capped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(
        tmp_path,
        {"backoff_initial": 0.5, "backoff_max": 4.0},
        fixtures=[{"feed": "trk", "id": "f1"}],
    )

    async def never(conn: FakeConn, attempt: Attempt) -> None:
        raise AssertionError

    async with running(config, never, refuse=lambda a: UpstreamUnavailable("down")) as (_, c, _s):
        await trio.sleep(120.0)
    gaps = [b.at - a.at for a, b in zip(c.attempts, c.attempts[1:], strict=False)]
    for n, gap in enumerate(gaps):
        assert gap <= min(4.0, 0.5 * 2**n) + 1e-6
    # Capped at 4 s with full jitter: about 60 attempts in 120 s, certainly more than 30.
    assert len(c.attempts) > 30


# -- stall watchdog ----------------------------------------------------------------------------


async def test_stall_closes_and_reconnects(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(tmp_path, {"stall_timeout": 5.0}, fixtures=[{"feed": "trk", "id": "f1"}])
    last_push: list[float] = []

    async def stalls(conn: FakeConn, attempt: Attempt) -> None:
        await conn.recv()
        conn.push(ACCEPTED)
        sub = await conn.recv()
        base = 0 if len(last_push) == 0 else 3
        assert sub["backfill"] == (0 if base == 0 else sub["backfill"])
        for i in range(base, base + 3):
            conn.push(frame(i))
        last_push.append(trio.current_time())
        await trio.sleep_forever()  # then silence

    async with running(config, stalls) as (sup, c, sinks):
        await until(lambda: len(c.attempts) >= 2)
        await wait_state(sup, "trk", "f1", FixtureState.LIVE)
    first, second = c.attempts[0], c.attempts[1]
    assert first.conn.closed_by_client
    assert second.at - last_push[0] >= 5.0
    assert second.at - last_push[0] <= 5.0 + 1.0 + 0.01  # stall + at most backoff_max
    assert sinks["trk", "f1"].ixs == [0, 1, 2, 3, 4, 5]
    handle = sup.get("trk", "f1")
    assert handle is not None
    assert handle.status.counters.connects == 2
    assert handle.status.counters.reconnects == 1


async def test_stall_watchdog_rearms_while_messages_flow(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Frames every 0.5 s for four stall periods: the watchdog's deadline passes several times
    # while messages flow and must be re-armed without losing or reordering a frame; then
    # silence, and the stall is detected stall_timeout after the last message, not earlier.
    config = make_config(tmp_path, {"stall_timeout": 5.0}, fixtures=[{"feed": "trk", "id": "f1"}])
    last_push: list[float] = []

    async def steady(conn: FakeConn, attempt: Attempt) -> None:
        await conn.recv()
        conn.push(ACCEPTED)
        await conn.recv()
        if last_push:
            await trio.sleep_forever()  # the reconnect: nothing new
        for i in range(40):
            conn.push(frame(i))
            await trio.sleep(0.5)
        last_push.append(trio.current_time() - 0.5)
        await trio.sleep_forever()

    async with running(config, steady) as (sup, c, sinks):
        await until(lambda: len(c.attempts) >= 2)
    assert 5.0 <= c.attempts[1].at - last_push[0] <= 5.0 + 1.0 + 0.01
    assert sinks["trk", "f1"].ixs == list(range(40))
    handle = sup.get("trk", "f1")
    assert handle is not None
    assert handle.status.last_error == "stalled: no message for 5.0 s"


async def test_handshake_timeout_without_acceptance(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(
        tmp_path,
        {"handshake_timeout": 3.0, "stall_timeout": 100.0},
        fixtures=[{"feed": "trk", "id": "f1"}],
    )

    async def mute(conn: FakeConn, attempt: Attempt) -> None:
        await conn.recv()
        while True:  # heartbeats do not count as acceptance
            conn.push(HEARTBEAT)
            await trio.sleep(1.0)

    async with running(config, mute) as (sup, c, _):
        await until(lambda: len(c.attempts) >= 2)
    assert 3.0 <= c.attempts[1].at - c.attempts[0].at <= 3.0 + 1.0 + 0.01
    h = sup.get("trk", "f1")
    assert h is not None
    assert h.status.last_error == "no authorisation reply within 3.0 s"


# -- resume ------------------------------------------------------------------------------------


async def test_tracking_resume_widens_until_backfill_reaches(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A burst while disconnected outruns the rate estimate: requests widen until they reach."""
    config = make_config(tmp_path, fixtures=[{"feed": "trk", "id": "f1", "backfill": 0}])
    history: list[str] = []
    requests: list[int] = []
    total = 6000
    first_conn: list[FakeConn] = []

    async def server(conn: FakeConn, attempt: Attempt) -> None:
        await conn.recv()
        conn.push(ACCEPTED)
        backfill = (await conn.recv())["backfill"]
        requests.append(backfill)
        first_conn.append(conn)
        sent = 0 if backfill == -1 else max(0, len(history) - backfill)
        while not conn.closed_by_client:  # the vendor: backfill, then follow the feed
            while sent < len(history):
                conn.push(history[sent])
                sent += 1
            await trio.sleep(0.01)

    async def producer() -> None:
        await until(lambda: len(first_conn) > 0)
        for _ in range(20):
            history.append(frame(len(history)))
            await trio.sleep(0.01)
        first_conn[0].close(1011)
        history.extend(frame(i) for i in range(len(history), 5020))  # burst while away
        while len(history) < total:
            history.append(frame(len(history)))
            await trio.sleep(0.01)

    async with running(config, server) as (sup, _, sinks):
        await producer()
        await until(lambda: len(sinks["trk", "f1"].frames) >= total)
    assert sinks["trk", "f1"].ixs == list(range(total))
    assert requests[0] == 0
    assert requests[1] > 0
    # The too-small reply tells where the vendor's head is: one widening reaches past the burst.
    assert len(requests) == 3
    assert requests[2] >= 5000
    h = sup.get("trk", "f1")
    assert h is not None
    assert h.status.counters.gaps == 0
    assert h.status.counters.duplicates_dropped > 0


async def test_fastpath_url_accept_header_and_start_position(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(tmp_path, fixtures=[{"feed": "fp", "id": "a b/c"}])
    sent_total = 0

    async def server(conn: FakeConn, attempt: Attempt) -> None:
        nonlocal sent_total
        assert await conn.recv() == {"authToken": TEST_TOKEN}
        conn.push('{"eventElementType":"ConnectionStateChanged","state":"Connected"}')
        for seq in range(1, 6):
            conn.push(orjson.dumps({"fixtureAction": {"fixtureSeqNum": seq}}).decode())
        sent_total += 5
        conn.close(1001)

    async with running(config, server) as (sup, c, sinks):
        await until(lambda: len(c.attempts) >= 3)
    urls = [a.url for a in c.attempts]
    assert urls[0] == "ws://upstream.test/soccer/fixtures/a%20b%2Fc/actions?startPosition=0"
    assert urls[1].endswith("?startPosition=5")
    assert urls[2].endswith("?startPosition=10")
    assert all(a.headers == [(b"Accept", FASTPATH_ACCEPT.encode())] for a in c.attempts)
    h = sup.get("fp", "a b/c")
    assert h is not None
    assert h.status.counters.gaps == 0
    # Unsequenced status packets are forwarded as frames too.
    assert h.status.counters.frames == len(sinks["fp", "a b/c"].frames) >= 12


async def test_fastpath_position_travels_with_the_frame(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The classifier's verdict reaches the sink: the vendor position, or None when unnumbered.

    The third event carries its ``fixtureSeqNum`` under a key other than ``fixtureAction``: the
    classifier finds it there, and the sink is told so (the hub never parses again).
    """
    config = make_config(tmp_path, fixtures=[{"feed": "fp", "id": "m1"}])
    packets = [
        '{"eventElementType":"ConnectionStateChanged","state":"Connected"}',
        '{"fixtureAction":{"fixtureSeqNum":1}}',
        '{"fixtureSeqNum":2,"type":"score"}',
        '{"matchEvent":{"fixtureSeqNum":3,"type":"corner"}}',
    ]

    async def server(conn: FakeConn, attempt: Attempt) -> None:
        await conn.recv()
        for raw in packets:
            conn.push(raw)
        await trio.sleep_forever()

    async with running(config, server) as (_, _, sinks):
        await until(lambda: len(sinks["fp", "m1"].frames) >= len(packets))
        sink = sinks["fp", "m1"]
        assert sink.frames == packets
        assert sink.positions == [None, 1, 2, 3]


# -- states ------------------------------------------------------------------------------------


async def test_a_refused_token_is_probed_at_a_steady_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Waits that doubled after each refusal up to ``unauthorized_retry`` (60 s) left fixtures
    up to a minute without data after a token flapped: the probe keeps a steady interval."""
    caplog.set_level(logging.DEBUG)
    config = make_config(
        tmp_path,
        {"unauthorized_retry": 60.0, "unauthorized_probe_interval": 2.0},
        fixtures=[{"feed": "trk", "id": "f1"}],
    )

    async def refuses(conn: FakeConn, attempt: Attempt) -> None:
        await conn.recv()
        conn.push('{"errorMessage":"Supplied token could not be authenticated"}')
        conn.close(1008)

    async with running(config, refuses) as (sup, c, sinks):
        await wait_state(sup, "trk", "f1", FixtureState.UNAUTHORIZED)
        h = sup.get("trk", "f1")
        assert h is not None
        assert (FixtureState.UNAUTHORIZED, h.status.detail) in sinks["trk", "f1"].states
        await until(lambda: len(c.attempts) >= 40)
    gaps = [b.at - a.at for a, b in itertools.pairwise(c.attempts)]
    assert gaps == pytest.approx([2.0] * 39, abs=0.05)
    h = sup.get("trk", "f1")
    assert h is not None
    assert h.status.last_error is not None
    assert "Supplied token could not be authenticated" in h.status.last_error
    assert TEST_TOKEN not in caplog.text
    assert TEST_TOKEN not in repr(h) and TEST_TOKEN not in repr(sup.handles())


async def test_refused_fixtures_send_one_probe_and_all_go_when_it_is_accepted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Ten fixtures refused for 5 minutes: one probe every 2 s (not ten fixtures doubling on
    their own), and the first accepted probe sends all of them at once."""
    ids = [f"f{i}" for i in range(10)]
    config = make_config(
        tmp_path,
        {"unauthorized_retry": 600.0, "unauthorized_probe_interval": 2.0},
        fixtures=[{"feed": "trk", "id": i} for i in ids],
    )
    vendor_accepts = False

    async def script(conn: FakeConn, attempt: Attempt) -> None:
        await conn.recv()
        if not vendor_accepts:
            conn.push('{"errorMessage":"Supplied token could not be authenticated"}')
            conn.close(1008)
            return
        conn.push(ACCEPTED)
        await conn.recv()
        conn.push(frame(1))
        await trio.sleep_forever()

    async with running(config, script) as (sup, c, _):
        for i in ids:
            await wait_state(sup, "trk", i, FixtureState.UNAUTHORIZED)
        t0 = trio.current_time()
        await trio.sleep(300.0)
        probes = [a.at for a in c.attempts if a.at > t0]
        assert len(probes) == pytest.approx(150, abs=1)
        assert all(b - a == pytest.approx(2.0, abs=0.05) for a, b in itertools.pairwise(probes))
        assert sup.gate.waiting >= 9 and sup.gate.prober is not None  # the prober may probe
        refused = [h.status.counters.refused for h in sup.handles()]
        assert sum(refused) == len(c.attempts)  # each refusal counted once, by its fixture
        assert max(refused) >= 150 and sorted(refused)[:9] == [1] * 9  # the others: once
        vendor_accepts = True
        accepted = trio.current_time()
        for i in ids:
            await wait_state(sup, "trk", i, FixtureState.LIVE)
        assert trio.current_time() - accepted <= 2.0 + 0.1
        for i in ids:
            h = sup.get("trk", i)
            assert h is not None and h.status.counters.frames == 1
        assert sup.gate.waiting == 0 and sup.gate.prober is None


async def test_a_removed_prober_hands_the_probe_on(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(
        tmp_path,
        {"unauthorized_retry": 600.0, "unauthorized_probe_interval": 2.0},
        fixtures=[{"feed": "trk", "id": "f1"}, {"feed": "trk", "id": "f2"}],
    )

    async def refuses(conn: FakeConn, attempt: Attempt) -> None:
        await conn.recv()
        conn.push('{"errorMessage":"Supplied token could not be authenticated"}')
        conn.close(1008)

    async with running(config, refuses) as (sup, c, _):
        await until(lambda: len(c.attempts) >= 6)
        prober = sup.gate.prober
        assert isinstance(prober, FixtureRunner)
        other = "f2" if prober.fixture.id == "f1" else "f1"
        removed = trio.current_time()
        before = len(c.attempts)
        assert sup.remove("trk", prober.fixture.id)
        await until(lambda: len(c.attempts) > before)
        assert c.attempts[-1].at - removed == pytest.approx(2.0, abs=0.05)
        new = sup.gate.prober
        assert isinstance(new, FixtureRunner) and new.fixture.id == other


async def test_a_changed_token_file_is_tried_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Rotating the token file ends the wait after a refusal (within the poll interval)."""
    config = make_config(
        tmp_path, {"unauthorized_retry": 600.0}, fixtures=[{"feed": "trk", "id": "f1"}]
    )
    good = "rotated-token-value"

    async with running(config, accepting_only(good)) as (sup, c, _):
        await until(lambda: len(c.attempts) >= 6)  # refused 6 times: waits are 32 s now
        t0 = trio.current_time()
        (tmp_path / "token").write_text(good + "\n")
        await wait_state(sup, "trk", "f1", FixtureState.LIVE)
        assert trio.current_time() - t0 <= TOKEN_POLL_INTERVAL + 0.5
        assert len(c.attempts) == 7


async def test_a_token_echoed_by_the_upstream_is_scrubbed_everywhere(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream answering "Supplied token <token> could not be authenticated" put the token
    into ``detail``/``last_error`` (HTTP) and the subscribers' status messages."""
    caplog.set_level(logging.DEBUG)
    config = make_config(tmp_path, fixtures=[{"feed": "trk", "id": "f1"}])
    padding = "x" * 190  # the token straddles the 200-character cut of a detail

    async def script(conn: FakeConn, attempt: Attempt) -> None:
        await conn.recv()
        if len(c.attempts) == 1:
            conn.push(orjson.dumps({"errorMessage": f"Supplied token {TEST_TOKEN} bad"}).decode())
        else:
            conn.push(ACCEPTED)
            await conn.recv()
            conn.push(orjson.dumps({"message": padding + TEST_TOKEN, "level": "ERROR"}).decode())
            conn.push(orjson.dumps({"message": f"info {TEST_TOKEN}", "level": "INFO"}).decode())
        await trio.sleep_forever()

    async with running(config, script) as (sup, c, sinks):
        await until(lambda: len(c.attempts) >= 2)
        h = sup.get("trk", "f1")
        assert h is not None
        await until(lambda: h.status.last_error is not None and "x" * 20 in h.status.last_error)
        states = sinks["trk", "f1"].states
    assert any("Supplied token <redacted> bad" in detail for _, detail in states), states
    everything = repr(states) + repr(h.status) + caplog.text
    assert TEST_TOKEN not in everything
    assert TEST_TOKEN[:8] not in everything  # nor a piece of it cut at a length limit


async def test_an_upstream_sending_only_garbage_reaches_a_failure_state(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """493 malformed frames once left a fixture `connecting` for ever."""
    config = make_config(tmp_path, fixtures=[{"feed": "fp", "id": "m1"}])

    async def garbage(conn: FakeConn, attempt: Attempt) -> None:
        await conn.recv()
        for _ in range(MAX_MALFORMED_RUN + 10):
            conn.push("<<not json>>")
        await trio.sleep_forever()

    async with running(config, garbage) as (sup, c, sinks):
        await until(lambda: len(c.attempts) >= 2)
        h = sup.get("fp", "m1")
        assert h is not None
        states = sinks["fp", "m1"].states
    assert (
        FixtureState.BACKOFF,
        f"{MAX_MALFORMED_RUN} malformed messages in a row and nothing "
        "valid: the upstream sends garbage",
    ) in states
    assert FixtureState.LIVE not in [state for state, _ in states]
    assert h.status.counters.malformed >= MAX_MALFORMED_RUN


async def test_slow_garbage_does_not_keep_a_connection_alive(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Malformed messages are not liveness: the stall watchdog fires through a trickle of them."""
    config = make_config(tmp_path, fixtures=[{"feed": "fp", "id": "m1"}])

    async def trickle(conn: FakeConn, attempt: Attempt) -> None:
        await conn.recv()
        conn.push('{"fixtureAction":{"fixtureSeqNum":1}}')
        for _ in range(40):
            await trio.sleep(1.0)
            conn.push("<<not json>>")
        await trio.sleep_forever()

    async with running(config, trickle) as (_, c, sinks):
        await until(lambda: len(c.attempts) >= 2)
        states = sinks["fp", "m1"].states
    assert (FixtureState.BACKOFF, "stalled: no message for 5.0 s") in states
    assert c.attempts[1].at - c.attempts[0].at < 7.0


@pytest.mark.parametrize(
    ("refusal", "state"),
    [
        (UpstreamRejected(401), FixtureState.UNAUTHORIZED),
        (UpstreamRejected(403), FixtureState.UNAUTHORIZED),
        (UpstreamRejected(404), FixtureState.NOT_FOUND),
        (UpstreamRejected(406), FixtureState.BACKOFF),
    ],
)
async def test_handshake_refusal_states(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    refusal: BaseException,
    state: FixtureState,
) -> None:
    config = make_config(tmp_path, fixtures=[{"feed": "fp", "id": "f1"}])

    async def never(conn: FakeConn, attempt: Attempt) -> None:
        raise AssertionError

    async with running(config, never, refuse=lambda a: refusal) as (sup, _, _s):
        await wait_state(sup, "fp", "f1", state)
    h = sup.get("fp", "f1")
    assert h is not None
    assert h.status.last_error == f"handshake refused: HTTP {refusal.status}"  # type: ignore[attr-defined]


async def test_not_found_message_and_retry(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(
        tmp_path, {"not_found_retry": 30.0}, fixtures=[{"feed": "trk", "id": "nope"}]
    )

    async def unknown(conn: FakeConn, attempt: Attempt) -> None:
        await conn.recv()
        conn.push(ACCEPTED)
        await conn.recv()
        conn.push('{"message":"Could not find fixture topic soccer.tracking.nope","level":"WARN"}')
        await trio.sleep_forever()  # the vendor leaves it open; we must close

    async with running(config, unknown) as (sup, c, _):
        await wait_state(sup, "trk", "nope", FixtureState.NOT_FOUND)
        await trio.sleep(31.0)
    assert len(c.attempts) == 2
    assert c.attempts[1].at - c.attempts[0].at == pytest.approx(30.0)
    assert c.attempts[0].conn.closed_by_client


async def test_close_1008_before_acceptance_is_unauthorized(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(tmp_path, fixtures=[{"feed": "trk", "id": "f1"}])

    async def closes(conn: FakeConn, attempt: Attempt) -> None:
        await conn.recv()
        conn.close(1008)

    async with running(config, closes) as (sup, _, _s):
        await wait_state(sup, "trk", "f1", FixtureState.UNAUTHORIZED)


async def test_missing_token_file_is_backoff_without_connecting(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(tmp_path, fixtures=[{"feed": "trk", "id": "f1"}])
    (tmp_path / "token").unlink()

    async with running(config, tracking_server) as (sup, c, sinks):
        await wait_state(sup, "trk", "f1", FixtureState.BACKOFF)
        h = sup.get("trk", "f1")
        assert h is not None
        assert h.status.last_error is not None
        assert "token unavailable" in h.status.last_error
        assert c.attempts == []
        (tmp_path / "token").write_text(TEST_TOKEN)  # re-read on the next attempt
        await wait_state(sup, "trk", "f1", FixtureState.LIVE)
        await until(lambda: len(sinks["trk", "f1"].frames) >= 10)


async def test_malformed_frames_counted_and_skipped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(tmp_path, fixtures=[{"feed": "trk", "id": "f1"}])

    async def noisy(conn: FakeConn, attempt: Attempt) -> None:
        await conn.recv()
        conn.push(ACCEPTED)
        await conn.recv()
        junks: list[str | bytes] = ["{", "[]", '{"ix":"3"}', b"\xff\xfe", "plain", '{"a":1}']
        for i, junk in enumerate(junks):
            conn.push(frame(i))
            conn.push(junk)
        conn.push(HEARTBEAT)
        await trio.sleep_forever()

    async with running(config, noisy) as (sup, _, sinks):
        await until(lambda: len(sinks["trk", "f1"].frames) >= 6)
        await trio.sleep(1.0)
    h = sup.get("trk", "f1")
    assert h is not None
    assert h.status.counters.malformed == 6
    assert h.status.counters.heartbeats == 1
    assert h.status.state == FixtureState.STOPPED  # the supervisor was stopped
    assert sinks["trk", "f1"].ixs == list(range(6))


# -- isolation, add/remove, reload -------------------------------------------------------------


async def test_crashing_sink_restarts_only_its_fixture(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(
        tmp_path, fixtures=[{"feed": "trk", "id": "bad"}, {"feed": "trk", "id": "good"}]
    )
    sinks: dict[tuple[str, str], RecordingSink] = {
        ("trk", "bad"): RecordingSink(fail_publish=1),
        ("trk", "good"): RecordingSink(),
    }

    async with trio.open_nursery() as nursery:
        connector = FakeConnector(nursery, tracking_server)
        sup = Supervisor(
            config, lambda f, fx: sinks[fx.key], connect=connector, read_token=read_token_on_loop
        )
        await nursery.start(sup.run)
        await until(lambda: min(len(s.frames) for s in sinks.values()) >= 10)
        nursery.cancel_scope.cancel()
    bad, good = sup.get("trk", "bad"), sup.get("trk", "good")
    assert bad is not None and good is not None
    assert bad.status.counters.crashes == 1
    assert bad.status.last_error == "internal error (RuntimeError)"
    assert good.status.counters.crashes == 0
    assert good.status.counters.connects == 1
    assert sinks["trk", "good"].ixs == list(range(10))
    # The crashed fixture resumed: ix 0 was never delivered, so it was requested again.
    assert sinks["trk", "bad"].ixs == list(range(10))
    assert "task crashed" in caplog.text and "Traceback" in caplog.text


async def test_add_remove_and_unknown_feed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(tmp_path)
    async with running(config, tracking_server) as (sup, c, sinks):
        assert sup.add(FixtureConfig(feed="trk", id="f1"))
        assert not sup.add(FixtureConfig(feed="trk", id="f1"))
        with pytest.raises(KeyError, match="unknown feed"):
            sup.add(FixtureConfig(feed="nope", id="f1"))
        await wait_state(sup, "trk", "f1", FixtureState.LIVE)
        assert sup.remove("trk", "f1")
        assert not sup.remove("trk", "f1")
        assert sup.get("trk", "f1") is None
        await trio.sleep(1.0)
        assert c.attempts[0].conn.closed_by_client
    assert sinks["trk", "f1"].states[-1] == (FixtureState.STOPPED, "removed")
    assert [s for s, _ in sinks["trk", "f1"].states] == [
        FixtureState.CONNECTING,
        FixtureState.LIVE,
        FixtureState.STOPPED,
    ]


async def test_add_before_run_and_stop_on_cancel(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(tmp_path)
    sink = RecordingSink()
    async with trio.open_nursery() as nursery:
        connector = FakeConnector(nursery, tracking_server)
        sup = Supervisor(
            config, lambda f, fx: sink, connect=connector, read_token=read_token_on_loop
        )
        assert sup.add(FixtureConfig(feed="trk", id="early"))
        await nursery.start(sup.run)
        await wait_state(sup, "trk", "early", FixtureState.LIVE)
        nursery.cancel_scope.cancel()
    assert connector.attempts[0].conn.closed_by_client
    assert sink.states[-1] == (FixtureState.STOPPED, "supervisor stopped")


async def test_update_config_rotates_token_and_wakes_unauthorized(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(
        tmp_path, {"unauthorized_retry": 600.0}, fixtures=[{"feed": "trk", "id": "f1"}]
    )
    new_token = tmp_path / "token2"
    new_token.write_text("rotated-token")
    refusal = '{"message":"Authentication message had incorrect format","level":"ERROR"}'

    async with running(config, accepting_only("rotated-token", refusal, 1000)) as (sup, c, _):
        await wait_state(sup, "trk", "f1", FixtureState.UNAUTHORIZED)
        t0 = trio.current_time()
        new_config = make_config(
            tmp_path,
            {"token_file": str(new_token), "connect_rate": 2.0},
            fixtures=[{"feed": "trk", "id": "f1"}],
        )
        sup.update_config(new_config)
        assert sup.limiter.rate == 2.0
        await wait_state(sup, "trk", "f1", FixtureState.LIVE)
        assert trio.current_time() - t0 < 5.0
    assert len(c.attempts) == 2


async def test_backoff_reset_counts_live_time_up_to_the_last_message(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection live 10 s then stalled for 25 s was healthy for 10 s, not 35: no reset.
    One live 40 s (>= backoff_reset_after) resets the backoff, so the retry comes quickly."""
    config = make_config(
        tmp_path,
        {
            "backoff_initial": 0.5,
            "backoff_max": 64.0,
            "backoff_reset_after": 30.0,
            "stall_timeout": 25.0,
        },
        fixtures=[{"feed": "trk", "id": "f1"}],
    )
    ended: list[float] = []
    original = Backoff.connection_ended

    def spy(self: Backoff, live_for: float) -> None:
        ended.append(live_for)
        original(self, live_for)

    monkeypatch.setattr(Backoff, "connection_ended", spy)
    next_ix = [0]
    stalled_at: list[float] = []

    async def lives_then_stalls(conn: FakeConn, attempt: Attempt) -> None:
        await conn.recv()
        conn.push(ACCEPTED)
        await conn.recv()
        live = 10.0 if len(stalled_at) == 0 else 40.0
        end = trio.current_time() + live
        while True:
            conn.push(frame(next_ix[0]))
            next_ix[0] += 1
            if trio.current_time() >= end:
                break
            await trio.sleep(1.0)
        stalled_at.append(trio.current_time())
        await trio.sleep_forever()

    async with running(config, lives_then_stalls) as (_, c, sinks):
        await until(lambda: len(c.attempts) >= 3)
    assert ended[0] == pytest.approx(10.0, abs=1.0)
    assert ended[1] == pytest.approx(40.0, abs=1.0)
    # After the 40 s connection the backoff was reset: the retry follows the stall detection
    # within backoff_initial (full jitter draws from [0, 0.5]).
    assert c.attempts[2].at - (stalled_at[1] + 25.0) <= 0.5 + 1e-6
    assert sinks["trk", "f1"].ixs == list(range(next_ix[0]))


# -- the production token reader ---------------------------------------------------------------
# Real clock here (no autojump_clock): a worker thread and MockClock's autojump do not mix.


def _release_fifo(path: Path, after: float) -> threading.Thread:
    """Open *path* (a FIFO) for writing after *after* s and write the test token, from a thread.

    The open blocks until a reader opens the other end; the thread is a daemon, so a test that
    fails before reading leaves nothing behind.
    """

    def write() -> None:
        time.sleep(after)
        path.write_text(TEST_TOKEN)  # blocks until the reader opens the FIFO

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


async def test_token_file_read_does_not_block_the_event_loop(tmp_path: Path) -> None:
    # A FIFO stands for a hung filesystem: reading it blocks until the writer shows up 0.5 s
    # later. Read on the loop, the ticker could not tick in the meantime.
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    up = UpstreamSection(token_file=fifo)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.01)

    _release_fifo(fifo, after=0.5)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            secret = await read_token_off_loop(up)
            nursery.cancel_scope.cancel()
    assert secret.matches(TEST_TOKEN)
    assert ticks >= 5


async def test_token_read_is_abandoned_on_cancel(tmp_path: Path) -> None:
    # A fixture removed while its token file hangs must not wait for the file: the read is
    # abandoned (its thread finishes on its own once the writer below releases it).
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    up = UpstreamSection(token_file=fifo)
    _release_fifo(fifo, after=5.0)
    start = time.monotonic()
    with trio.fail_after(30), trio.move_on_after(0.2):
        await read_token_off_loop(up)
    assert time.monotonic() - start < 2.0


async def test_token_file_errors_come_back_from_the_thread(tmp_path: Path) -> None:
    up = UpstreamSection(token_file=tmp_path / "missing")
    with pytest.raises(SecretError, match="cannot read token file"):
        await read_token_off_loop(up)


@pytest.mark.parametrize("source", ["file", "env"])
async def test_only_a_token_file_goes_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    # The environment needs no I/O: read in place, no thread hop per attempt.
    readers: list[int] = []
    original = UpstreamSection.read_token

    def spy(self: UpstreamSection) -> Secret:
        readers.append(threading.get_ident())
        return original(self)

    monkeypatch.setattr(UpstreamSection, "read_token", spy)
    monkeypatch.setenv("DDE_TEST_TOKEN", TEST_TOKEN)
    (tmp_path / "token").write_text(TEST_TOKEN)
    if source == "file":
        up = UpstreamSection(token_file=tmp_path / "token")
    else:
        up = UpstreamSection(token_env="DDE_TEST_TOKEN")
    with trio.fail_after(30):
        secret = await read_token_off_loop(up)
    assert secret.matches(TEST_TOKEN)
    on_loop = readers == [threading.get_ident()]
    assert on_loop is (source == "env")
