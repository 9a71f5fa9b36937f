"""The lean default connector's own WebSocket client (gateway.upstream._lean).

Covers the frame decoder against an independent encoder: server frames are built by wsproto (or
by hand where wsproto refuses to build a broken one) and written by a raw trio TCP server, which
also parses what the client sends with wsproto (so masking, pongs and close frames are checked by
a second implementation). Cases: fragmented messages with a ping between fragments, 16/64-bit
lengths, binary, frames split across reads, a cancelled read mid-frame, the close handshake in
both directions, invalid UTF-8 (1007), an oversized message (1009), a masked server frame (1002).

Rules: real sockets on 127.0.0.1 port 0, real clock, each test under ``trio.fail_after``.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.lowlevel
import trustme
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from gateway.upstream import (
    MAX_MESSAGE_SIZE,
    UpstreamClosed,
    UpstreamConnection,
    UpstreamUnavailable,
    open_websocket_connector,
)
from gateway.wire import OP_BINARY, OP_CLOSE, OP_TEXT, frame_header, mask_frame

GUARD = 30.0

Script = Callable[[trio.abc.Stream, WSConnection], Awaitable[None]]


class _Peer:
    """A raw WebSocket server: wsproto handshake, then *script*, then it records client events."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.events: list[Event] = []
        self.done = trio.Event()

    async def handle(self, stream: trio.abc.Stream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        try:
            while not any(
                isinstance(e, Request) for e in self._feed(ws, await stream.receive_some())
            ):
                pass
            await stream.send_all(ws.send(AcceptConnection()))
            await self.script(stream, ws)
            while data := await stream.receive_some():
                for event in self._feed(ws, data):
                    self.events.append(event)
                    if isinstance(event, CloseConnection):
                        if ws.state is ConnectionState.REMOTE_CLOSING:  # not a reply to ours
                            await stream.send_all(ws.send(event.response()))
                        return
        except trio.BrokenResourceError:
            pass
        finally:
            self.done.set()
            await stream.aclose()

    @staticmethod
    def _feed(ws: WSConnection, data: bytes | bytearray) -> list[Event]:
        ws.receive_data(bytes(data))
        return list(ws.events())

    def texts(self) -> list[str]:
        return [str(e.data) for e in self.events if isinstance(e, TextMessage)]

    def close_code(self) -> int | None:
        codes = [int(e.code) for e in self.events if isinstance(e, CloseConnection)]
        return codes[0] if codes else None


async def _open(peer: _Peer, nursery: trio.Nursery) -> str:
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, peer.handle, 0, host="127.0.0.1")
    )
    return f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}/x?y=1"


@asynccontextmanager
async def _connected(peer: _Peer, *, wait_peer: bool = True) -> AsyncIterator[UpstreamConnection]:
    """Serve *peer* on a free port and yield the default client's connection to it.

    On exit the connection is closed (close handshake), then - with *wait_peer* - the peer's
    script and event recording are waited for, then the listener stops.
    """
    async with trio.open_nursery() as nursery:
        url = await _open(peer, nursery)
        async with (
            open_websocket_connector() as connect,
            connect(url, headers=[], connect_timeout=5.0) as conn,
        ):
            yield conn
        if wait_peer:
            await peer.done.wait()
        nursery.cancel_scope.cancel()


async def _drain(conn: object) -> tuple[list[str | bytes], UpstreamClosed]:
    got: list[str | bytes] = []
    while True:
        try:
            got.append(await conn.get_message())  # type: ignore[attr-defined]  # protocol object
        except UpstreamClosed as exc:
            return got, exc


async def _trickle(stream: trio.abc.Stream, data: bytes, chunk: int) -> None:
    for i in range(0, len(data), chunk):
        await stream.send_all(data[i : i + chunk])
        await trio.lowlevel.checkpoint()  # let the client read: frames arrive split across reads


@pytest.mark.parametrize("chunk", [1 << 20, 997, 7])
async def test_fragments_lengths_ping_and_close(chunk: int) -> None:
    big = "é" * 40_000  # 80,000 bytes: 64-bit length
    mid = "m" * 300  # 16-bit length

    async def script(stream: trio.abc.Stream, ws: WSConnection) -> None:
        data = b"".join(
            (
                ws.send(TextMessage(data="frag", message_finished=False)),
                ws.send(Ping(payload=b"p1")),  # a control frame between fragments
                ws.send(TextMessage(data="men", message_finished=False)),
                ws.send(TextMessage(data="ted", message_finished=True)),
                ws.send(Message(data=mid)),
                ws.send(Message(data=big)),
                ws.send(BytesMessage(data=b"\x00\xff")),
                ws.send(TextMessage(data="")),
                ws.send(CloseConnection(code=4000, reason="bye")),
            )
        )
        await _trickle(stream, data, chunk)

    peer = _Peer(script)
    with trio.fail_after(GUARD):
        async with _connected(peer) as conn:
            await conn.send_message("hello ü")
            got, closed = await _drain(conn)
    assert got == ["fragmented", mid, big, b"\x00\xff", ""]
    assert (closed.code, closed.reason) == (4000, "bye")
    assert peer.texts() == ["hello ü"]
    assert [e.payload for e in peer.events if isinstance(e, Pong)] == [b"p1"]
    assert peer.close_code() == 4000  # the close was echoed


async def test_cancelled_read_mid_frame_loses_nothing() -> None:
    frame = frame_header(5000) + b"x" * 5000
    go_on = trio.Event()

    async def script(stream: trio.abc.Stream, ws: WSConnection) -> None:
        await stream.send_all(frame[:2] + frame[2:100])  # header and a part of the payload
        await go_on.wait()
        await stream.send_all(frame[100:])

    peer = _Peer(script)
    with trio.fail_after(GUARD):
        async with _connected(peer) as conn:
            for _ in range(3):
                with trio.move_on_after(0.05) as scope:
                    await conn.get_message()
                assert scope.cancelled_caught
            go_on.set()
            assert await conn.get_message() == "x" * 5000
    assert peer.close_code() == 1000  # leaving the context sent a normal close


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (frame_header(3) + b"\xff\xfe\xfd", 1007),  # invalid UTF-8
        (frame_header(MAX_MESSAGE_SIZE + 1), 1009),  # refused from its header alone
        (mask_frame(b"hi"), 1002),  # servers must not mask
        (bytes((OP_CLOSE, 0)), 1002),  # a fragmented control frame
    ],
)
async def test_protocol_errors_close_with_their_code(bad: bytes, code: int) -> None:
    async def script(stream: trio.abc.Stream, ws: WSConnection) -> None:
        await stream.send_all(ws.send(Message(data="before")) + bad)

    peer = _Peer(script)
    with trio.fail_after(GUARD):
        async with _connected(peer) as conn:
            got, closed = await _drain(conn)
            with pytest.raises(UpstreamClosed):
                await conn.send_message("after")
    assert got == ["before"]
    assert closed.code == code
    assert peer.close_code() == code


async def test_eof_without_close_is_abnormal() -> None:
    async def script(stream: trio.abc.Stream, ws: WSConnection) -> None:
        await stream.send_all(ws.send(Message(data="one")))
        await stream.aclose()

    peer = _Peer(script)
    with trio.fail_after(GUARD):
        async with _connected(peer, wait_peer=False) as conn:
            got, closed = await _drain(conn)
    assert got == ["one"]
    assert closed.code == 1006


@pytest.mark.parametrize("size", [0, 1, 5, 125, 126, 65535, 65536, 70001])
def test_mask_frame_round_trips(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    server = WSConnection(ConnectionType.SERVER)
    client = WSConnection(ConnectionType.CLIENT)
    server.receive_data(client.send(Request(host="x", target="/")))
    assert [e for e in server.events() if isinstance(e, Request)]
    server.send(AcceptConnection())
    server.receive_data(mask_frame(payload, OP_BINARY))
    events = [e for e in server.events() if isinstance(e, BytesMessage)]
    assert b"".join(bytes(e.data) for e in events) == payload
    assert mask_frame(b"abc")[1] & 0x80  # the mask bit is set
    assert mask_frame(b"abc")[0] == 0x80 | OP_TEXT


async def _open_tls(peer: _Peer, nursery: trio.Nursery, server: ssl.SSLContext) -> str:
    listeners = await nursery.start(
        functools.partial(trio.serve_ssl_over_tcp, peer.handle, 0, server, host="127.0.0.1")
    )
    return f"wss://127.0.0.1:{listeners[0].transport_listener.socket.getsockname()[1]}/x"


def _tls_pair() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a trustme certificate for 127.0.0.1, and a client that trusts it."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


async def test_wss_round_trip_with_a_verified_certificate() -> None:
    """wss:// is what the vendor speaks: TLS handshake, hostname check, frames both ways."""

    async def script(stream: trio.abc.Stream, ws: WSConnection) -> None:
        await stream.send_all(ws.send(Message(data="over tls")) + ws.send(CloseConnection(1000)))

    server, client = _tls_pair()
    peer = _Peer(script)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            url = await _open_tls(peer, nursery, server)
            async with (
                open_websocket_connector(ssl_context=client) as connect,
                connect(url, headers=[], connect_timeout=10.0) as conn,
            ):
                await conn.send_message("hello")
                got, closed = await _drain(conn)
            await peer.done.wait()
            nursery.cancel_scope.cancel()
    assert got == ["over tls"]
    assert closed.code == 1000
    assert peer.texts() == ["hello"]


async def test_wss_refuses_an_untrusted_certificate() -> None:
    async def script(stream: trio.abc.Stream, ws: WSConnection) -> None:
        raise AssertionError("no WebSocket may open over an unverified TLS connection")

    server, _ = _tls_pair()
    peer = _Peer(script)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            url = await _open_tls(peer, nursery, server)
            # The default context: the system trust store, which does not know the test CA.
            async with open_websocket_connector() as connect:
                with pytest.raises(UpstreamUnavailable, match="connection failed"):
                    async with connect(url, headers=[], connect_timeout=10.0):
                        pass
            nursery.cancel_scope.cancel()
    assert peer.texts() == []
