"""Hostile callers of the HTTP control plane: what one may cost the gateway and everybody else.

Covers, each found by a hostile-input probe:
- 3: the list routes are paged (``?limit=`` at most 1,000, ``?after=``, ``X-Total-Count``, a
  ``Link`` to the next page) and rendered a step at a time with checkpoints between steps, so
  parallel scrapes of every route with 5,000 subscribers connected hold the event loop for
  at most ~13 ms of CPU at a time (before: ~40 ms);
- 4: a streamed recording download ends its connection as HTTP says (``Connection: close``:
  closed after the body; keep-alive: the idle timeout applies after it; pipelined requests
  behind it are answered), and downloads at once are limited per client address (429) and
  overall (503), with ``Retry-After``, counted in ``dde_api_downloads_refused_total``;
- 5: HTTP/2 is off: an ``Upgrade: h2c`` request is answered in HTTP/1.1 (no 101), the HTTP/2
  preface is answered 505 and closed; 20 pipelined HTTP/1.1 requests, the first asking for
  h2c, are all answered in order (the upgrade used to leave all but the first unanswered).

Rules: real sockets on 127.0.0.1 port 0 (against the simulator where upstream is involved),
real time, ``trio.fail_after`` everywhere, progress driven by the server's answers (never a
guessed sleep); the one time bound (the CPU time of the longest task step) is measured in CPU
time, not wall time, and sits between the healthy and the broken value.
"""

from __future__ import annotations

import gc
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import h11
import orjson
import pytest
import trio
from trio_websocket import open_websocket_url

from gateway.config import Config, ListenAddress
from gateway.controlplane import (
    DOWNLOAD_RETRY_AFTER,
    MAX_PAGE_LIMIT,
    RENDER_STEP,
    SubscriberView,
    render_list,
)
from tests.kit import StepWatch, simulator_and_gateway, stream_url, wait_until
from tests.memory_target import MemoryTarget
from tests.test_controlplane import Client, assert_error, make_config, samples, serving
from tests.test_dataplane import RawClient, subscribe

TIMEOUT = 60  # generous: a loaded 2-core machine
#: Less than the keep-alive idle timeout (5 s): an idle connection is not closed before.
GRACE = 2.0

SCRAPED = ("/v1/subscribers", "/v1/fixtures", "/v1/recordings", "/v1/status", "/metrics")


async def _open_idle_subscribers(addr: ListenAddress, n: int, into: list[RawClient]) -> None:
    """*n* cheap subscribers: raw connections that upgrade and then sit idle."""
    limit = trio.CapacityLimiter(50)

    async def one() -> None:
        async with limit:
            raw = await RawClient.connect(addr)
            assert raw.status == 101, raw.response_head
            into.append(raw)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)


@attrs.frozen
class Stalls:
    """What parallel scrapes cost everybody else, in seconds: the worst gap between a healthy
    25 Hz subscriber's frames, the slowest ``/healthz`` answer, and the most CPU time one task
    step took (work done without letting another task run: the machine's load is not in it)."""

    gap: float
    healthz: float
    step_cpu: float


async def worst_stalls_under_scrapes(
    tmp_path: Path, *, subscribers: int, scrapers: int, rounds: int
) -> Stalls:
    """:class:`Stalls` while *scrapers* clients GET every list route *rounds* times, with
    *subscribers* idle subscribers connected."""
    async with simulator_and_gateway(
        tmp_path,
        [("tracking", "1")],
        rate_hz=25.0,
        subscribers={"max_connections": subscribers + 10, "ping_interval": 600.0},
    ) as (_, gw):
        assert gw.bound is not None
        idle: list[RawClient] = []
        await _open_idle_subscribers(gw.bound.stream, subscribers, idle)
        gaps: list[float] = []
        health: list[float] = []
        client = Client(gw.bound.http)

        async def scrape() -> None:
            for _ in range(rounds):
                for path in SCRAPED:
                    reply = await client.get(path)
                    assert reply.status == 200, reply

        async def probe() -> None:
            while True:
                start = trio.current_time()
                assert (await client.get("/healthz")).status == 200
                health.append(trio.current_time() - start)
                await trio.sleep(0.05)

        async with open_websocket_url(stream_url(gw)) as ws:
            await subscribe(ws, "1")
            # Both ends of the connections live in this process: a full garbage collection
            # takes up to a second here, whenever it comes. Frozen, they are not scanned, and
            # the gaps measure how long the requests hold the event loop.
            gc.collect()
            gc.freeze()
            steps = StepWatch(time.thread_time_ns)
            trio.lowlevel.add_instrument(steps)
            try:
                async with trio.open_nursery() as nursery:

                    async def watch() -> None:
                        last: float | None = None
                        while True:
                            msg = orjson.loads(await ws.get_message())
                            now = trio.current_time()
                            if msg["type"] == "frame":
                                if last is not None:
                                    gaps.append(now - last)
                                last = now

                    nursery.start_soon(watch)
                    nursery.start_soon(probe)
                    async with trio.open_nursery() as scrapes:
                        for _ in range(scrapers):
                            scrapes.start_soon(scrape)
                    nursery.cancel_scope.cancel()
            finally:
                trio.lowlevel.remove_instrument(steps)
                gc.unfreeze()
        for raw in idle:
            raw.sock.close()
    return Stalls(max(gaps), max(health), steps.worst / 1e9)


# -- 3: list routes are paged and rendered in steps ---------------------------------------------


async def test_parallel_scrapes_with_5000_subscribers_hold_the_event_loop_briefly(
    tmp_path: Path,
) -> None:
    """10 clients GET every list route 3 times with 5,000 subscribers connected. Each answer
    used to be built in one task step: the most CPU time one step took was 32-41 ms here
    (5,000 views, dicts and their JSON); paged, with a checkpoint after each facade call and
    every 100 items: 11-13 ms. CPU time, so the machine's load is not in it; the bound sits
    between. (The healthy subscriber's worst gap, reported by the same run: 123-201 ms before,
    82-114 ms after, with the garbage collector frozen; not frozen, whole-list answers also
    set off full collections over the 5,000 connections: 577-718 ms before, 74-128 ms after.)"""
    with trio.fail_after(240):
        stalls = await worst_stalls_under_scrapes(tmp_path, subscribers=5000, scrapers=10, rounds=3)
    assert stalls.step_cpu < 0.025, stalls


async def test_render_list_lets_other_tasks_run_between_steps() -> None:
    """Structural: a task counting its turns runs between the steps of one rendering."""
    items = list(range(10 * RENDER_STEP + 1))
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(count_turns)
        await trio.lowlevel.checkpoint()
        before = turns
        body = await render_list(items, lambda i: {"i": i})
        during = turns - before
        nursery.cancel_scope.cancel()
    assert orjson.loads(body) == [{"i": i} for i in items]
    # 11 steps, 10 checkpoints between them: the other task ran at (almost) every one.
    assert during >= 9, during


def _next_link(reply_headers: dict[str, str], route: str) -> str | None:
    """The path of a page's ``rel="next"`` link (relative to the route), or None."""
    link = reply_headers.get("link")
    if link is None:
        return None
    match = re.fullmatch(r'<([a-z]+\?[^>]*)>; rel="next"', link)
    assert match is not None, link
    assert match.group(1).startswith(route.rsplit("/", 1)[1] + "?"), link
    return f"{route.rsplit('/', 1)[0]}/{match.group(1)}"


async def _walk(client: Client, first: str, route: str) -> tuple[list[list[str]], int]:
    """Every page from *first* on, following the links: each page's keys and the total."""
    pages: list[list[str]] = []
    path: str | None = first
    total = -1
    while path is not None:
        reply = await client.get(path)
        assert reply.status == 200, reply
        items = reply.json()
        pages.append([i["id"] if "id" in i else f"{i['feed']}/{i['fixture']}" for i in items])
        total = int(reply.headers["x-total-count"])
        path = _next_link(reply.headers, route)
    return pages, total


async def test_subscriber_pages_walk_every_subscriber_once_in_id_order(tmp_path: Path) -> None:
    async with serving(make_config(tmp_path)) as (client, target):
        for i in range(1, 251):
            target.add_subscriber(
                SubscriberView(str(i), "10.0.0.1:4000", "/v1/stream", (), 0, 0, 0, 0.0)
            )
        pages, total = await _walk(client, "/v1/subscribers?limit=100", "/v1/subscribers")
        assert total == 250
        assert [len(p) for p in pages] == [100, 100, 50]
        # In numeric order (ids are decimal): "9" before "10".
        assert [i for p in pages for i in p] == [str(i) for i in range(1, 251)]
        # The default page is at most MAX_PAGE_LIMIT; no next link when everything fits.
        reply = await client.get("/v1/subscribers")
        assert len(reply.json()) == 250
        assert "link" not in reply.headers
        assert reply.headers["x-total-count"] == "250"
        for bad in ("0", str(MAX_PAGE_LIMIT + 1), "x", "-1"):
            assert_error(await client.get(f"/v1/subscribers?limit={bad}"), 400, "query.limit")


async def test_fixture_and_recording_pages(tmp_path: Path) -> None:
    async with serving(make_config(tmp_path)) as (client, target):
        for fixture in ("a1", "a2", "a3", "a4"):
            target.follow("hoops", fixture, 0)
            target.record("hoops", fixture, "{}")
        keys = ["hoops/a1", "hoops/a2", "hoops/a3", "hoops/a4", "soccer/123"]
        pages, total = await _walk(client, "/v1/fixtures?limit=2", "/v1/fixtures")
        assert (pages, total) == ([keys[:2], keys[2:4], keys[4:]], 5)
        pages, total = await _walk(client, "/v1/recordings?limit=3", "/v1/recordings")
        assert (pages, total) == ([keys[:3], keys[3:4]], 4)
        reply = await client.get("/v1/fixtures?after=hoops%2Fa3")
        assert [f["fixture"] for f in reply.json()] == ["a4", "123"]
        assert_error(await client.get("/v1/fixtures?after=hoops"), 400, "query.after")
        assert_error(await client.get("/v1/recordings?limit=0"), 400, "query.limit")


# -- raw HTTP/1.1 over a socket ------------------------------------------------------------------


async def _connect(address: ListenAddress, source: str = "127.0.0.1") -> trio.SocketStream:
    """A connection to *address* from the loopback address *source* (another "client")."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect((address.host, address.port))
    return trio.SocketStream(sock)


def _get(path: str, *headers: str) -> bytes:
    return "".join(
        [f"GET {path} HTTP/1.1\r\nhost: api.test\r\n", *(h + "\r\n" for h in headers), "\r\n"]
    ).encode()


@attrs.define
class _Responses:
    """Reads HTTP/1.1 responses off one connection, one after the other (h11 parses them)."""

    stream: trio.SocketStream
    conn: h11.Connection = attrs.field(factory=lambda: h11.Connection(h11.CLIENT))
    eof: bool = False

    async def next(self) -> tuple[int, dict[str, str], bytes]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        # The client side of h11 must have sent a request to read a response.
        self.conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        self.conn.send(h11.EndOfMessage())
        status, headers, body = 0, {}, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(65536)
                self.eof = self.eof or not data
                self.conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, body
            else:
                raise AssertionError(f"unexpected {event!r}")

    async def wait_eof(self) -> None:
        """Until the server closes the connection (nothing else may arrive)."""
        while data := await self.stream.receive_some(65536):
            raise AssertionError(f"data after the last response: {data[:100]!r}")


class HeldDownloads(MemoryTarget):
    """A recording download sends its lines, then stays open until ``release`` is set."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.release = trio.Event()

    def recording_download(
        self, feed: str, fixture: str, after: int, limit: int | None
    ) -> AsyncIterator[bytes] | None:
        lines = super().recording_download(feed, fixture, after, limit)
        if lines is None:
            return None

        async def held() -> AsyncIterator[bytes]:
            async for chunk in lines:
                yield chunk
            await self.release.wait()

        return held()


RECORDING = "/v1/fixtures/soccer/123/recording"
RECORDED = "/v1/fixtures/tracking/1/recording"


@pytest.fixture
def recorded(tmp_path: Path) -> MemoryTarget:
    target = MemoryTarget(make_config(tmp_path))
    for ix in range(3):
        target.record("soccer", "123", f'{{"ix":{ix}}}')
    return target


@asynccontextmanager
async def recording_gateway(tmp_path: Path) -> AsyncIterator[ListenAddress]:
    """A gateway recording the simulator's tracking fixture ``1``, once 3 frames are on
    disk: its HTTP address."""
    recorder = {"dir": str(tmp_path / "recordings")}
    async with simulator_and_gateway(tmp_path, [("tracking", "1")], recorder=recorder) as (
        _,
        gw,
    ):
        assert gw.recorder is not None and gw.bound is not None
        log = gw.recorder.get("tracking", "1")
        await wait_until(lambda: log is not None and log.written_seq >= 3)
        yield gw.bound.http


# -- 4: a download ends its connection; downloads at once are limited ----------------------------


async def test_a_download_with_connection_close_is_closed_after_its_body(tmp_path: Path) -> None:
    """The connection used to stay open for ever (500 such downloads held 500 fds)."""
    with trio.fail_after(TIMEOUT):
        async with recording_gateway(tmp_path) as address, await _connect(address) as stream:
            await stream.send_all(_get(RECORDED + "?limit=1", "connection: close"))
            responses = _Responses(stream)
            status, headers, body = await responses.next()
            assert (status, headers["content-type"]) == (200, "application/x-ndjson")
            assert body.count(b"\n") == 1
            await responses.wait_eof()


async def test_after_a_download_the_connection_is_reused_then_closed_when_idle(
    tmp_path: Path,
) -> None:
    """Keep-alive: a request after a download is answered, and an idle connection after a
    download is closed by the keep-alive timeout (it used to stay open for ever)."""
    with trio.fail_after(TIMEOUT):
        async with recording_gateway(tmp_path) as address, await _connect(address) as stream:
            responses = _Responses(stream)
            await stream.send_all(_get(RECORDED + "?limit=2"))
            status, _, body = await responses.next()
            assert (status, body.count(b"\n")) == (200, 2)
            await stream.send_all(_get("/healthz"))
            assert (await responses.next())[0] == 200
            await stream.send_all(_get(RECORDED + "?limit=1"))
            status, _, body = await responses.next()
            assert (status, body.count(b"\n")) == (200, 1)
            start = trio.current_time()
            await responses.wait_eof()
            # Closed by the idle timeout (5 s), not at once: keep-alive still works.
            assert trio.current_time() - start >= GRACE


async def test_downloads_past_the_limits_are_refused_429_per_client_and_503_overall(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    api = attrs.evolve(config.api, max_downloads=3, max_downloads_per_client=2)
    config = attrs.evolve(config, api=api)
    target = HeldDownloads(config)
    target.record("soccer", "123", "{}")
    async with serving(config, target) as (client, _):
        with trio.fail_after(TIMEOUT):
            held: list[trio.SocketStream] = []

            async def start(source: str) -> tuple[int, dict[str, str]]:
                stream = await _connect(client.address, source)
                held.append(stream)
                await stream.send_all(_get(RECORDING))
                head = b""
                while b"\r\n\r\n" not in head:
                    data = await stream.receive_some(65536)
                    assert data, head
                    head += data
                lines = head.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
                status = int(lines[0].split()[1])
                return status, dict(line.lower().split(": ", 1) for line in lines[1:])

            assert (await start("127.0.0.1"))[0] == 200
            assert (await start("127.0.0.1"))[0] == 200
            status, headers = await start("127.0.0.1")
            assert (status, headers["retry-after"]) == (429, str(DOWNLOAD_RETRY_AFTER))
            assert (await start("127.0.0.2"))[0] == 200
            status, headers = await start("127.0.0.3")
            assert (status, headers["retry-after"]) == (503, str(DOWNLOAD_RETRY_AFTER))
            got = samples((await client.get("/metrics")).body.decode())
            assert got[("dde_api_downloads", ())] == 3
            refused = "dde_api_downloads_refused_total"
            assert got[(refused, (("limit", "client"),))] == 1
            assert got[(refused, (("limit", "overall"),))] == 1
            # The refusals explain themselves; other routes are not limited.
            reply = await client.get(RECORDING)
            assert_error(reply, 429, "[api] max_downloads_per_client")
            # Downloads that end give their slots back.
            target.release.set()
            for stream in held:
                await stream.aclose()
            for source in ("127.0.0.1", "127.0.0.1", "127.0.0.4"):
                assert (await start(source))[0] == 200
            for stream in held:
                await stream.aclose()


# -- 5: HTTP/1.1 only; pipelined requests answered in order --------------------------------------


#: The headers of an h2c upgrade request (RFC 7540 section 3.2).
H2C_UPGRADE = (
    "connection: Upgrade, HTTP2-Settings",
    "upgrade: h2c",
    "http2-settings: AAMAAABkAARAAAAAAAIAAAAA",
)


async def test_an_h2c_upgrade_is_answered_in_http_1_1(tmp_path: Path) -> None:
    async with serving(make_config(tmp_path)) as (client, _):
        assert (await client.get("/healthz")).status == 200
        with trio.fail_after(TIMEOUT):
            async with await _connect(client.address) as stream:
                await stream.send_all(_get("/v1/status", *H2C_UPGRADE))
                responses = _Responses(stream)
                status, headers, body = await responses.next()  # h11 refuses a 101 here
                assert (status, orjson.loads(body)["version"]) == (200, "9.9.9")
                assert "upgrade" not in headers
                # Still HTTP/1.1 on the same connection.
                await stream.send_all(_get("/healthz"))
                assert (await responses.next())[0] == 200


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_EMPTY_SETTINGS = bytes.fromhex("000000040000000000")


async def test_an_http2_preface_is_answered_505_and_closed(tmp_path: Path) -> None:
    async with serving(make_config(tmp_path)) as (client, _):
        assert (await client.get("/healthz")).status == 200
        with trio.fail_after(TIMEOUT):
            async with await _connect(client.address) as stream:
                await stream.send_all(H2_PREFACE + H2_EMPTY_SETTINGS)
                got = b""
                while data := await stream.receive_some(65536):
                    got += data
        assert got.startswith(b"HTTP/1.1 505 "), got[:100]
        assert b"\r\nconnection: close\r\n" in got


async def test_20_pipelined_requests_are_answered_in_order(tmp_path: Path) -> None:
    """Written at once on one connection, the first asking for an h2c upgrade and recording
    downloads among them: every one is answered in HTTP/1.1, in order. The upgrade used to
    be answered 101 and the connection switched to HTTP/2: only 1 of the requests was answered
    (the probe: 1 of 100)."""
    routes = [
        ("/healthz", 200, "application/json"),
        ("/v1/fixtures/tracking/1", 200, "application/json"),
        (RECORDED + "?limit=2", 200, "application/x-ndjson"),
        ("/v1/fixtures/tracking/404", 404, "application/json"),
        ("/metrics", 200, "text/plain; version=0.0.4; charset=utf-8"),
    ]
    requests = [routes[i % len(routes)] for i in range(20)]
    pipeline = _get(requests[0][0], *H2C_UPGRADE) + b"".join(
        _get(path) for path, _, _ in requests[1:]
    )
    with trio.fail_after(TIMEOUT):
        async with recording_gateway(tmp_path) as address, await _connect(address) as stream:
            await stream.send_all(pipeline)
            responses = _Responses(stream)
            for path, status, content_type in requests:
                got, headers, _ = await responses.next()
                assert (got, headers["content-type"]) == (status, content_type), path
