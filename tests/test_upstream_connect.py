"""The default upstream connector (gateway.upstream.open_websocket_connector), against a
trio-websocket server.

Covers the error boundary (refused TCP, HTTP rejection, handshake timeout, close codes, all
translated to the gateway's own exceptions), that a rejection leaves other connections alone,
and that cancelling a connection's owner still completes the close handshake quickly. The
connector is the lean client (gateway/upstream/_lean.py) since it replaced trio-websocket on
the upstream side; these tests ran unchanged against both. Frame-level cases of the lean
client are in test_upstream_lean.py.

Rules: real sockets on 127.0.0.1 port 0, real clock, each test under ``trio.fail_after``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import pytest
import trio
import trio_websocket
from trio_websocket import WebSocketRequest

from gateway.upstream import (
    Connector,
    UpstreamClosed,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
    open_trio_websocket_connector,
    open_websocket_connector,
)

GUARD = 30.0


async def _serve(handler: object, nursery: trio.Nursery) -> int:
    server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
    port: int = server.port
    return port


@pytest.mark.parametrize("cancel_connector_too", [False, True])
async def test_close_handshake_completes_when_owner_is_cancelled(
    cancel_connector_too: bool,
) -> None:
    codes: list[int | None] = []
    closed = trio.Event()

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            codes.append(None if exc.reason is None else exc.reason.code)
            closed.set()

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            port = await _serve(handler, nursery)
            # A disconnect timeout longer than the guard: if the close handshake could not
            # complete (reader task cancelled with its owner), this test would time out.
            with trio.CancelScope() as outer:
                async with open_websocket_connector(disconnect_timeout=GUARD * 2) as connect:
                    with trio.CancelScope() as owner:
                        async with connect(
                            f"ws://127.0.0.1:{port}/x", headers=[], connect_timeout=5.0
                        ) as conn:
                            await conn.send_message("hello")
                            # Removal cancels only the owner; shutdown cancels everything.
                            (outer if cancel_connector_too else owner).cancel()
                            await trio.sleep_forever()
            await closed.wait()
            nursery.cancel_scope.cancel()
    assert codes == [1000]


async def test_rejection_is_translated_and_connector_survives() -> None:
    async def handler(request: WebSocketRequest) -> None:
        if request.path.startswith("/missing"):
            await request.reject(404, body=b'{"error":"fixture not found","status":404}')
            return
        ws = await request.accept()
        await ws.send_message("hi")
        await ws.aclose(4000, "bye")

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            port = await _serve(handler, nursery)
            async with open_websocket_connector() as connect:
                for _ in range(3):
                    try:
                        async with connect(
                            f"ws://127.0.0.1:{port}/missing", headers=[], connect_timeout=5.0
                        ):
                            raise AssertionError("should not connect")
                    except UpstreamRejected as exc:
                        assert exc.status == 404
                async with connect(
                    f"ws://127.0.0.1:{port}/ok", headers=[], connect_timeout=5.0
                ) as conn:
                    assert await conn.get_message() == "hi"
                    try:
                        await conn.get_message()
                        raise AssertionError("should be closed")
                    except UpstreamClosed as exc:
                        assert exc.code == 4000
            nursery.cancel_scope.cancel()


async def test_refused_port_is_unavailable() -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with trio.fail_after(GUARD):
        async with open_websocket_connector() as connect:
            try:
                async with connect(f"ws://127.0.0.1:{port}/", headers=[], connect_timeout=5.0):
                    raise AssertionError("should not connect")
            except UpstreamUnavailable as exc:
                assert str(exc).startswith("connection failed")


@pytest.mark.parametrize("opener", [open_websocket_connector, open_trio_websocket_connector])
async def test_one_base_class_catches_every_boundary_error(
    opener: Callable[[], AbstractAsyncContextManager[Connector]],
) -> None:
    """Both connectors raise only the gateway's error tree: a rejected handshake, a closed
    connection and a refused port are each caught by ``except UpstreamError``."""

    async def handler(request: WebSocketRequest) -> None:
        if request.path.startswith("/missing"):
            await request.reject(404)
            return
        ws = await request.accept()
        await ws.aclose(4000, "bye")

    refused = trio.socket.socket()
    await refused.bind(("127.0.0.1", 0))
    refused_port = refused.getsockname()[1]
    refused.close()  # nothing listens there now
    caught: list[type[UpstreamError]] = []
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            port = await _serve(handler, nursery)
            async with opener() as connect:
                for url in (
                    f"ws://127.0.0.1:{port}/missing",
                    f"ws://127.0.0.1:{port}/ok",
                    f"ws://127.0.0.1:{refused_port}/",
                ):
                    try:
                        async with connect(url, headers=[], connect_timeout=5.0) as conn:
                            await conn.get_message()
                    except UpstreamError as exc:
                        caught.append(type(exc))
            nursery.cancel_scope.cancel()
    assert caught == [UpstreamRejected, UpstreamClosed, UpstreamUnavailable]


@pytest.mark.parametrize("how", ["timeout", "cancel"])
async def test_unanswered_handshake_closes_its_socket(how: str) -> None:
    eof = trio.Event()

    async def silent(stream: trio.SocketStream) -> None:
        while await stream.receive_some():  # read the upgrade request, never answer it
            pass
        eof.set()  # the client closed the socket: nothing leaked

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, silent, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            async with open_websocket_connector() as connect:
                url = f"ws://127.0.0.1:{port}/"
                if how == "timeout":
                    try:
                        async with connect(url, headers=[], connect_timeout=0.3):
                            raise AssertionError("should not connect")
                    except UpstreamUnavailable as exc:
                        assert str(exc) == "handshake timed out"
                else:
                    with trio.move_on_after(0.3):
                        async with connect(url, headers=[], connect_timeout=GUARD * 2):
                            raise AssertionError("should not connect")
                await eof.wait()
            nursery.cancel_scope.cancel()
