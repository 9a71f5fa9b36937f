"""The data plane's multiplexed endpoint ``/v1/stream`` over real sockets.

Covers: frames delivered verbatim (byte for byte) with contiguous seq, the subscribe ordering
(subscribed, status, backfill, live), backfill null/-1/0/n, resume with after/epoch (recovered
true and false), unsubscribe, every bad request answered with an error on a connection that
stays usable, oversize message (1009), binary message (error), unknown path (404), heartbeats,
ping timeout, on-demand demand/release and its fixture-id rule, max_connections (503),
max_subscriptions, status fan-out and drain (1001), permessage-deflate declined.

Rules: real sockets on 127.0.0.1 port 0 and real time (no MockClock); each test runs under
``trio.fail_after``; frames are published into the hub by the test itself. Two independent
client libraries are used: trio-websocket and ``websockets`` (sync client in a thread). The
helpers here are imported by the other ``test_dataplane_*`` modules.
"""

from __future__ import annotations

import base64
import functools
import os
import socket
import struct
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson
import pytest
import trio
import websockets.sync.client
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

from gateway.config import (
    Config,
    FeedConfig,
    GatewaySection,
    ListenAddress,
    SubscribersSection,
    UpstreamSection,
    load_subscriber_tokens,
)
from gateway.dataplane import SubscriberAuth, SubscriberRegistry, run
from gateway.hub import FixtureDirectory, Hub, Topic
from gateway.model import FixtureState
from tests.kit import wait_until

TRACKING_PATH = "/ws/soccer/tracking/low_latency"
FASTPATH_TEMPLATE = "/soccer/fixtures/{fixture}/actions"
# Spacing, key order, unicode, big and quoted decimals: all must survive byte for byte.
ODD_FRAME = (
    '{"id":"F1", "ix" :0,"ut":1682899391822,"v":0.10000000000000001,'
    '"n":"\\u00e9t\u00e9 \U0001f600","d":"12.50"}'
)


def make_config(*, history: int = 100, **subscribers: Any) -> Config:
    feeds = {
        "tracking": FeedConfig(
            kind="tracking", url=f"wss://dde.example.test{TRACKING_PATH}", history=history
        ),
        "fastpath": FeedConfig(
            kind="fastpath", url=f"wss://streams.example.test{FASTPATH_TEMPLATE}", history=history
        ),
        "ondemand": FeedConfig(
            kind="tracking",
            url="wss://dde.example.test/ws/tennis/live/tracking/players",
            on_demand=True,
            linger=0.0,
        ),
    }
    return Config(
        upstream=UpstreamSection(token_env="DDE_TEST_UNUSED"),
        gateway=GatewaySection(stream_listen=ListenAddress("127.0.0.1", 0)),
        feeds=feeds,
        subscribers=SubscribersSection(**subscribers),
    )


@attrs.define
class Served:
    addr: ListenAddress
    hub: Hub
    registry: SubscriberRegistry
    auth: SubscriberAuth

    @property
    def url(self) -> str:
        return f"ws://{self.addr}/v1/stream"

    def topic(self, fixture: str = "F1", feed: str = "tracking") -> Topic:
        return self.hub.topic(feed, fixture)


@asynccontextmanager
async def serving(
    config: Config, directory: FixtureDirectory | None = None
) -> AsyncIterator[Served]:
    hub = Hub(config.feeds, directory)
    registry = SubscriberRegistry()
    auth = SubscriberAuth(load_subscriber_tokens(config))
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(functools.partial(run, config, hub, registry, auth=auth))
        yield Served(addr, hub, registry, auth)
        nursery.cancel_scope.cancel()


async def send_json(ws: WebSocketConnection, obj: Mapping[str, Any]) -> None:
    await ws.send_message(orjson.dumps(obj).decode())


async def recv_json(ws: WebSocketConnection) -> Any:
    msg = await ws.get_message()
    assert isinstance(msg, str)
    return orjson.loads(msg)


async def recv_type(ws: WebSocketConnection, kind: str) -> Any:
    """The next message of type *kind*, skipping heartbeats only."""
    while True:
        m = await recv_json(ws)
        if m.get("type") == "heartbeat" and kind != "heartbeat":
            continue
        assert m["type"] == kind, m
        return m


async def subscribe(ws: WebSocketConnection, fixture: str = "F1", **extra: Any) -> Any:
    """Subscribe and read ``subscribed`` and the first ``status``; returns ``subscribed``."""
    await send_json(ws, {"op": "subscribe", "feed": "tracking", "fixture": fixture, **extra})
    sub = await recv_type(ws, "subscribed")
    status = await recv_type(ws, "status")
    assert (status["feed"], status["fixture"]) == (sub["feed"], sub["fixture"])
    return sub


# -- a raw client: for peers that misbehave (stop reading, ignore pings) ---------------------


class RawClient:
    """A minimal WebSocket client on a plain socket, so a test controls every byte."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = b""
        self.status = 0
        self.response_head = ""
        #: The reason of the close frame :meth:`read_until_close` saw ("" if none).
        self.close_reason = ""
        #: The RSV bits of the last frame :meth:`read_frame` returned (0x40: compressed).
        self.last_rsv = 0

    @classmethod
    async def connect(
        cls,
        addr: ListenAddress,
        path: str = "/v1/stream",
        *,
        rcvbuf: int | None = None,
        headers: str = "",
    ) -> RawClient:
        sock = trio.socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((addr.host, addr.port))
        self = cls(sock)
        key = base64.b64encode(os.urandom(16)).decode()
        await self.send_all(
            (
                f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{headers}\r\n"
            ).encode()
        )
        while b"\r\n\r\n" not in self.buf:
            data = await sock.recv(4096)
            assert data, "closed during handshake"
            self.buf += data
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.status = int(head.split()[1])
        self.response_head = head.decode()
        return self

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = await self.sock.send(view)
            view = view[n:]

    async def send_frame(self, payload: bytes, opcode: int = 1) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await self.send_all(head + mask + masked)

    async def send_json(self, obj: Mapping[str, Any]) -> None:
        await self.send_frame(orjson.dumps(obj))

    async def read_frame(self) -> tuple[int, bytes] | None:
        """(opcode, payload) of the next server frame; None at EOF."""
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            try:
                data = await self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.buf += data

    def _parse(self) -> tuple[int, bytes] | None:
        b = self.buf
        if len(b) < 2:
            return None
        assert b[1] & 0x80 == 0, "server frames are never masked"
        n = b[1] & 0x7F
        off = 2
        if n == 126:
            if len(b) < 4:
                return None
            n = struct.unpack("!H", b[2:4])[0]
            off = 4
        elif n == 127:
            if len(b) < 10:
                return None
            n = struct.unpack("!Q", b[2:10])[0]
            off = 10
        if len(b) < off + n:
            return None
        self.buf = b[off + n :]
        self.last_rsv = b[0] & 0x70
        return b[0] & 0x0F, b[off : off + n]

    async def read_until_close(self) -> tuple[list[bytes], int | None]:
        """Every text payload until the close frame (its code) or EOF (None)."""
        texts: list[bytes] = []
        while True:
            frame = await self.read_frame()
            if frame is None:
                return texts, None
            op, payload = frame
            if op == 8:
                self.close_reason = payload[2:].decode()
                return texts, struct.unpack("!H", payload[:2])[0] if payload else 1005
            if op == 1:
                texts.append(payload)

    def close(self) -> None:
        self.sock.close()


# -- tests ---------------------------------------------------------------------------------


async def test_frames_verbatim_and_contiguous_trio_websocket() -> None:
    with trio.fail_after(20):
        async with serving(make_config()) as s:
            topic = s.topic()
            async with open_websocket_url(s.url) as ws:
                sub = await subscribe(ws)
                assert sub["seq"] == 0 and sub["epoch"] == topic.epoch
                assert sub["recovered"] is False
                raws = [ODD_FRAME.replace('"ix" :0', f'"ix" :{i}') for i in range(50)]
                for raw in raws:
                    topic.publish(raw, None)
                for i, raw in enumerate(raws, start=1):
                    text = await ws.get_message()
                    assert isinstance(text, str)
                    prefix = f'{{"type":"frame","feed":"tracking","fixture":"F1","seq":{i},"data":'
                    assert text == prefix + raw + "}"
                    assert orjson.loads(text)["data"] == orjson.loads(raw)


async def test_frames_verbatim_websockets_client() -> None:
    """The ``websockets`` package as an independent client (sync API in a thread)."""
    with trio.fail_after(20):
        async with serving(make_config()) as s:
            topic = s.topic()
            for i in range(5):
                topic.publish(ODD_FRAME.replace('"ix" :0', f'"ix" :{i}'), None)

            def client() -> tuple[list[str], str | None]:
                # websockets offers permessage-deflate by default; the gateway must decline
                # (frames are pre-encoded once for everyone, uncompressed).
                with websockets.sync.client.connect(s.url, open_timeout=10) as ws:
                    assert ws.request is not None and ws.response is not None
                    assert "permessage-deflate" in ws.request.headers["Sec-WebSocket-Extensions"]
                    extensions = ws.response.headers.get("Sec-WebSocket-Extensions")
                    ws.send('{"op":"subscribe","feed":"tracking","fixture":"F1","backfill":3}')
                    return [str(ws.recv(timeout=10)) for _ in range(5)], extensions

            got, extensions = await trio.to_thread.run_sync(client)
            assert extensions is None
            assert [orjson.loads(m)["type"] for m in got] == [
                "subscribed",
                "status",
                "frame",
                "frame",
                "frame",
            ]
            assert orjson.loads(got[0])["seq"] == 5
            assert [orjson.loads(m)["seq"] for m in got[2:]] == [3, 4, 5]
            assert got[4].endswith(',"data":' + ODD_FRAME.replace('"ix" :0', '"ix" :4') + "}")


@pytest.mark.parametrize(
    ("backfill", "expected"),
    [
        (None, list(range(3, 13))),
        (-1, list(range(3, 13))),
        (0, []),
        (4, [9, 10, 11, 12]),
        (50, list(range(3, 13))),
        ("missing", []),
    ],
)
async def test_backfill(backfill: Any, expected: list[int]) -> None:
    with trio.fail_after(20):
        async with serving(make_config(history=10)) as s:
            topic = s.topic()
            for i in range(12):
                topic.publish(f'{{"ix":{i}}}', None)
            async with open_websocket_url(s.url) as ws:
                extra = {} if backfill == "missing" else {"backfill": backfill}
                sub = await subscribe(ws, **extra)
                assert sub["seq"] == 12
                for seq in expected:
                    m = await recv_type(ws, "frame")
                    assert m["seq"] == seq and m["data"] == {"ix": seq - 1}
                # Live follows backfill with no gap and no duplicate.
                topic.publish('{"ix":12}', None)
                m = await recv_type(ws, "frame")
                assert m["seq"] == 13


async def test_resume_after() -> None:
    with trio.fail_after(20):
        async with serving(make_config(history=5)) as s:
            topic = s.topic()
            for i in range(8):
                topic.publish(f'{{"ix":{i}}}', None)
            async with open_websocket_url(s.url) as ws:
                # In history: frames 6..8, recovered.
                sub = await subscribe(ws, after=5, epoch=topic.epoch)
                assert sub["recovered"] is True
                assert [(await recv_type(ws, "frame"))["seq"] for _ in range(3)] == [6, 7, 8]
            async with open_websocket_url(s.url) as ws:
                # Exactly up to date: nothing to send, still recovered.
                sub = await subscribe(ws, after=8, epoch=topic.epoch)
                assert sub["recovered"] is True
                topic.publish("{}", None)
                assert (await recv_type(ws, "frame"))["seq"] == 9
            async with open_websocket_url(s.url) as ws:
                # Wrong epoch: live only.
                sub = await subscribe(ws, after=5, epoch="not-this-one")
                assert sub["recovered"] is False
                topic.publish("{}", None)
                assert (await recv_type(ws, "frame"))["seq"] == 10
            async with open_websocket_url(s.url) as ws:
                # seq 2 fell out of the 5-frame history: live only.
                sub = await subscribe(ws, after=2, epoch=topic.epoch)
                assert sub["recovered"] is False
                topic.publish("{}", None)
                assert (await recv_type(ws, "frame"))["seq"] == 11


async def test_a_resume_ahead_of_the_topic_is_recovered_and_repeats_nothing() -> None:
    """A client that has frames this instance has not yet (a cluster relay behind the instance
    it came from: same epoch, ``after`` above the topic's seq) is recovered: it gets the frame
    after its last once the topic has it, never the ones it has. (Before: recovered false and
    every frame from the topic's seq on again.)"""
    with trio.fail_after(20):
        async with serving(make_config(history=5)) as s:
            topic = s.topic()
            for i in range(3):
                topic.publish(f'{{"ix":{i}}}', None)
            async with open_websocket_url(s.url) as ws:
                sub = await subscribe(ws, after=6, epoch=topic.epoch)
                assert sub["recovered"] is True and sub["seq"] == 3
                for i in range(3, 8):
                    topic.publish(f'{{"ix":{i}}}', None)
                assert [(await recv_type(ws, "frame"))["seq"] for _ in range(1)] == [7]
                topic.publish('{"ix":8}', None)
                assert (await recv_type(ws, "frame"))["seq"] == 8


async def test_unsubscribe_stops_frames() -> None:
    with trio.fail_after(20):
        async with serving(make_config()) as s:
            t1, t2 = s.topic("F1"), s.topic("F2")
            async with open_websocket_url(s.url) as ws:
                await subscribe(ws, "F1")
                await subscribe(ws, "F2")
                assert t1.subscriber_count == 1
                await send_json(ws, {"op": "unsubscribe", "feed": "tracking", "fixture": "F1"})
                await wait_until(lambda: t1.subscriber_count == 0)
                t1.publish('{"gone":1}', None)
                t2.publish('{"kept":1}', None)
                m = await recv_type(ws, "frame")
                assert m["fixture"] == "F2"
                # A second unsubscribe is a bad request.
                await send_json(ws, {"op": "unsubscribe", "feed": "tracking", "fixture": "F1"})
                err = await recv_type(ws, "error")
                assert "not subscribed" in err["message"]


BAD_REQUESTS = [
    ("not json", "invalid JSON"),
    ("[1,2]", "JSON object"),
    ('{"feed":"tracking"}', "missing field 'op'"),
    ('{"op":"dance"}', "unknown op"),
    ('{"op":"subscribe","fixture":"F1"}', "missing field 'feed'"),
    ('{"op":"subscribe","feed":"tracking"}', "missing field 'fixture'"),
    ('{"op":"subscribe","feed":7,"fixture":"F1"}', "feed must be"),
    ('{"op":"subscribe","feed":"tracking","fixture":""}', "fixture must be"),
    ('{"op":"subscribe","feed":"tracking","fixture":"F1","backfill":"all"}', "backfill"),
    ('{"op":"subscribe","feed":"tracking","fixture":"F1","backfill":-2}', "backfill"),
    ('{"op":"subscribe","feed":"tracking","fixture":"F1","backfill":true}', "backfill"),
    ('{"op":"subscribe","feed":"tracking","fixture":"F1","after":3}', "epoch"),
    ('{"op":"subscribe","feed":"tracking","fixture":"F1","after":-1,"epoch":"e"}', "after"),
    ('{"op":"subscribe","feed":"tracking","fixture":"F1","epoch":"e"}', "epoch"),
    (
        '{"op":"subscribe","feed":"tracking","fixture":"F1","after":1,"epoch":"e","backfill":1}',
        "either",
    ),
    ('{"op":"subscribe","feed":"tracking","fixture":"F1","colour":"red"}', "unknown field"),
    ('{"op":"subscribe","feed":"nope","fixture":"F1"}', "unknown feed"),
    ('{"op":"subscribe","feed":"tracking","fixture":"NOPE"}', "unknown fixture"),
    ('{"op":"subscribe","feed":"tracking","fixture":"F1"}', "already subscribed"),
    ('{"op":"unsubscribe","feed":"tracking"}', "missing field 'fixture'"),
    ('{"op":"subscribe","feed":"tracking","fixture":7}', "fixture must be"),
    ('{"op":"subscribe","feed":"tracking","fixture":"F1","after":"3","epoch":"e"}', "after"),
    ('{"op":"subscribe","feed":"tracking","fixture":"F1","after":3,"epoch":5}', "epoch"),
    ('{"op":"subscribe","feed":null,"fixture":"F1"}', "missing field 'feed'"),
    ('{"op":7}', "unknown op"),
    ('{"op":"unsubscribe","feed":["tracking"],"fixture":"F1"}', "feed must be"),
    ('{"op":"unsubscribe","feed":"tracking","fixture":"F1","backfill":1}', "unknown field"),
]


async def test_every_bad_request_gets_an_error_and_the_connection_survives() -> None:
    with trio.fail_after(30):
        async with serving(make_config()) as s:
            topic = s.topic()
            async with open_websocket_url(s.url) as ws:
                await subscribe(ws)
                for text, expected in BAD_REQUESTS:
                    await ws.send_message(text)
                    err = await recv_type(ws, "error")
                    assert expected in err["message"], (text, err)
                    assert err["request"] == text
                long = '{"op":"x","pad":"' + "a" * 5000 + '"}'
                await ws.send_message(long)
                err = await recv_type(ws, "error")
                assert len(err["request"]) < 300
                # Still subscribed and usable.
                topic.publish('{"ok":true}', None)
                assert (await recv_type(ws, "frame"))["data"] == {"ok": True}


async def test_binary_message_gets_an_error() -> None:
    with trio.fail_after(20):
        async with serving(make_config()) as s, open_websocket_url(s.url) as ws:
            await ws.send_message(b"\x00\x01")
            err = await recv_type(ws, "error")
            assert "binary" in err["message"]
            s.topic()
            await subscribe(ws)


async def test_oversize_message_closes_1009() -> None:
    with trio.fail_after(20):
        async with (
            serving(make_config(max_message_bytes=1024)) as s,
            open_websocket_url(s.url) as ws,
        ):
            await ws.send_message("x" * 1000)  # under the limit: just a bad request
            await recv_type(ws, "error")
            await ws.send_message("x" * 5000)
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await ws.get_message()
            assert info.value.reason is not None and info.value.reason.code == 1009


async def test_unknown_path_is_404() -> None:
    with trio.fail_after(20):
        async with serving(make_config()) as s:
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(f"ws://{s.addr}/v2/nothing-here"):
                    pass
            assert info.value.status_code == 404
            # A fastpath fixture nobody follows is refused only after the authentication
            # message (test_dataplane_dropin.py): never a 404 before it.


async def test_heartbeats() -> None:
    with trio.fail_after(20):
        async with (
            serving(make_config(heartbeat_interval=0.1)) as s,
            open_websocket_url(s.url) as ws,
        ):
            for _ in range(2):
                hb = await recv_json(ws)
                assert hb["type"] == "heartbeat"
                assert hb["time"].endswith("Z") and "T" in hb["time"]


async def test_ping_and_ping_timeout() -> None:
    with trio.fail_after(20):
        async with serving(make_config(ping_interval=0.1, ping_timeout=0.3)) as s:
            # trio-websocket answers pings: the connection stays up through many intervals.
            async with open_websocket_url(s.url) as ws:
                await trio.sleep(0.8)
                s.topic()
                await subscribe(ws)
            # A raw client that never answers is closed with 1011.
            raw = await RawClient.connect(s.addr)
            frame = await raw.read_frame()
            assert frame is not None and frame[0] == 9  # a ping
            _, code = await raw.read_until_close()
            assert code == 1011
            raw.close()
            await wait_until(lambda: len(s.registry) == 0)


class FakeDirectory:
    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.followed: set[tuple[str, str]] = {("tracking", "STATIC")}
        self.calls: list[tuple[str, str, str]] = []

    def is_followed(self, feed: str, fixture: str) -> bool:
        return (feed, fixture) in self.followed

    def demand(self, feed: str, fixture: str) -> bool:
        self.calls.append(("demand", feed, fixture))
        if self.refuse:
            return False
        self.followed.add((feed, fixture))
        return True

    def release(self, feed: str, fixture: str) -> None:
        self.calls.append(("release", feed, fixture))


async def test_on_demand_demand_and_release() -> None:
    with trio.fail_after(20):
        directory = FakeDirectory()
        async with serving(make_config(), directory) as s:
            async with open_websocket_url(s.url) as ws:
                await send_json(ws, {"op": "subscribe", "feed": "ondemand", "fixture": "M1"})
                sub = await recv_type(ws, "subscribed")
                assert sub["seq"] == 0
                assert directory.calls == [("demand", "ondemand", "M1")]
                topic = s.hub.get("ondemand", "M1")
                assert topic is not None and topic.subscriber_count == 1
                # A fixture the directory follows (not on demand) gets its topic made.
                await send_json(ws, {"op": "subscribe", "feed": "tracking", "fixture": "STATIC"})
                await recv_type(ws, "status")  # after the status of M1
                assert (await recv_type(ws, "subscribed"))["fixture"] == "STATIC"
                await send_json(ws, {"op": "unsubscribe", "feed": "ondemand", "fixture": "M1"})
                await wait_until(lambda: len(directory.calls) == 2)
                assert directory.calls[1] == ("release", "ondemand", "M1")
            # Disconnecting releases the rest.
            await wait_until(lambda: ("release", "tracking", "STATIC") in directory.calls)
        directory = FakeDirectory(refuse=True)
        async with serving(make_config(), directory) as s, open_websocket_url(s.url) as ws:
            await send_json(ws, {"op": "subscribe", "feed": "ondemand", "fixture": "M2"})
            err = await recv_type(ws, "error")
            assert "refused" in err["message"]
            assert s.hub.get("ondemand", "M2") is None


async def test_on_demand_refuses_ids_that_could_change_an_upstream_url() -> None:
    with trio.fail_after(20):
        config = make_config()
        feeds = dict(config.feeds)
        feeds["fpod"] = FeedConfig(
            kind="fastpath",
            url="wss://streams.example.test/basketball/fixtures/{fixture}/actions",
            on_demand=True,
        )
        directory = FakeDirectory()
        async with serving(attrs.evolve(config, feeds=feeds), directory) as s:
            async with open_websocket_url(s.url) as ws:
                for bad in ("../../x", "a\nFAKE LOG LINE", "x" * 200):
                    await send_json(ws, {"op": "subscribe", "feed": "ondemand", "fixture": bad})
                    err = await recv_type(ws, "error")
                    assert "invalid fixture id" in err["message"]
                assert directory.calls == []
            # Drop-in fastpath: an encoded "/" in the path is refused after the authentication
            # message (nothing about a fixture is told before it), never asked of the directory.
            url = f"ws://{s.addr}/basketball/fixtures/..%2F..%2Fx/actions"
            async with open_websocket_url(url) as ws:
                await send_json(ws, {"authToken": "t"})
                assert await recv_json(ws) == {"error": "fixture not found", "status": 404}
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason is not None and closed.value.reason.code == 1000
            assert directory.calls == []
            # A valid id on the same feed is accepted (and followed after authentication).
            async with open_websocket_url(f"ws://{s.addr}/basketball/fixtures/G-1/actions") as ws:
                await send_json(ws, {"authToken": "t"})
                await wait_until(lambda: directory.calls == [("demand", "fpod", "G-1")])


async def test_max_connections_503() -> None:
    with trio.fail_after(20):
        async with serving(make_config(max_connections=2)) as s:
            async with open_websocket_url(s.url), open_websocket_url(s.url):
                await wait_until(lambda: len(s.registry) == 2)
                with pytest.raises(ConnectionRejected) as info:
                    async with open_websocket_url(s.url):
                        pass
                assert info.value.status_code == 503
                assert s.registry.rejected == 1
            await wait_until(lambda: len(s.registry) == 0)
            async with open_websocket_url(s.url):
                pass


async def test_max_subscriptions() -> None:
    with trio.fail_after(20):
        async with serving(make_config(max_subscriptions=2)) as s:
            for f in ("A", "B", "C"):
                s.topic(f)
            async with open_websocket_url(s.url) as ws:
                await subscribe(ws, "A")
                await subscribe(ws, "B")
                await send_json(ws, {"op": "subscribe", "feed": "tracking", "fixture": "C"})
                err = await recv_type(ws, "error")
                assert "max_subscriptions" in err["message"]
                await send_json(ws, {"op": "unsubscribe", "feed": "tracking", "fixture": "A"})
                await subscribe(ws, "C")


async def test_status_fanout_dedup_and_topic_close() -> None:
    with trio.fail_after(20):
        async with serving(make_config()) as s:
            topic = s.topic()
            async with open_websocket_url(s.url) as ws:
                await subscribe(ws)
                topic.set_status(FixtureState.LIVE, "")
                topic.set_status(FixtureState.LIVE, "")  # deduplicated
                topic.set_status(FixtureState.BACKOFF, "retry in 1.0 s")
                st = await recv_type(ws, "status")
                assert (st["state"], st["detail"]) == ("live", "")
                st = await recv_type(ws, "status")
                assert (st["state"], st["detail"]) == ("backoff", "retry in 1.0 s")
                s.hub.close_topic("tracking", "F1")
                st = await recv_type(ws, "status")
                assert st["state"] == "stopped"
                assert s.hub.get("tracking", "F1") is None
                # The subscription is gone: subscribing again reaches the new topic.
                new = s.topic()
                sub = await subscribe(ws)
                assert sub["epoch"] == new.epoch != topic.epoch


async def test_drain_closes_everyone_with_1001() -> None:
    with trio.fail_after(20):
        async with serving(make_config()) as s:
            s.topic()
            async with open_websocket_url(s.url) as a, open_websocket_url(s.url) as b:
                await subscribe(a)
                await wait_until(lambda: len(s.registry) == 2)
                await s.registry.drain()
                assert len(s.registry) == 0
                for ws in (a, b):
                    with pytest.raises(ConnectionClosed) as info:
                        while True:
                            await ws.get_message()
                    assert info.value.reason is not None and info.value.reason.code == 1001
                # New subscribers are refused while draining.
                with pytest.raises(ConnectionRejected) as rej:
                    async with open_websocket_url(s.url):
                        pass
                assert rej.value.status_code == 503


def wire_size(payload: bytes) -> int:
    """A server frame's size on the wire: the payload and its (unmasked) header."""
    n = len(payload)
    return n + (2 if n < 126 else 4 if n < 65536 else 10)


async def test_bytes_sent_are_every_byte_on_the_wire() -> None:
    with trio.fail_after(20):
        async with serving(make_config()) as s:
            topic = s.topic()
            raw = await RawClient.connect(s.addr, rcvbuf=4096)  # a big frame is written in parts
            assert raw.status == 101
            await raw.send_json({"op": "subscribe", "feed": "tracking", "fixture": "F1"})
            wire = 0
            for _ in range(2):  # subscribed, then the fixture's status: replies
                got = await raw.read_frame()
                assert got is not None and got[0] == 1
                wire += wire_size(got[1])
            texts = ["{}", '{"pad":"' + "é" * 200 + '"}', '{"pad":"' + "x" * 300_000 + '"}']
            for text in texts:
                topic.publish(text, None)
            for _ in texts:
                got = await raw.read_frame()
                assert got is not None and got[0] == 1
                assert orjson.loads(got[1])["type"] == "frame"
                wire += wire_size(got[1])
            await wait_until(lambda: s.registry.stats().frames_sent == len(texts))
            assert s.registry.stats().bytes_sent == wire
            raw.close()
            await wait_until(lambda: len(s.registry) == 0)
            # A gone subscriber's bytes stay counted (its close frame too, if it was written).
            assert s.registry.stats().bytes_sent >= wire


async def test_registry_views() -> None:
    with trio.fail_after(20):
        async with serving(make_config()) as s:
            topic = s.topic()
            async with open_websocket_url(s.url) as ws:
                await subscribe(ws)
                topic.publish("{}", None)
                await recv_type(ws, "frame")
                (view,) = s.registry.views()
                assert view.endpoint == "/v1/stream"
                assert view.subscriptions == ("tracking/F1",)
                assert view.frames_sent == 1 and view.frames_dropped == 0
                assert view.peer.startswith("127.0.0.1:")
            await wait_until(lambda: len(s.registry) == 0)
            stats = s.registry.stats()
            assert (stats.connections, stats.accepted, stats.frames_sent) == (0, 1, 1)
            assert (stats.frames_dropped, stats.slow_disconnects, stats.rejected) == (0, 0, 0)


async def test_handshake_timeout_and_plain_http() -> None:
    with trio.fail_after(20):
        async with serving(make_config(handshake_timeout=0.3)) as s:
            # Connects and says nothing: dropped after handshake_timeout.
            idle = trio.socket.socket()
            await idle.connect((s.addr.host, s.addr.port))
            assert await idle.recv(100) == b""
            idle.close()
            # Plain HTTP, no upgrade: 400.
            plain = trio.socket.socket()
            await plain.connect((s.addr.host, s.addr.port))
            await plain.send(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await plain.recv(100)).startswith(b"HTTP/1.1 400")
            plain.close()
            assert len(s.registry) == 0
