"""The data-plane server: a raw trio TCP listener with wsproto for handshakes and client frames.

Why not a WebSocket server library: fan-out cost is dominated by how frames reach the socket
(see ``docs/performance.md``: 2 us per delivery here against 50 us with trio-websocket
``send_message``). wsproto still does the parts that need care: the HTTP upgrade and parsing
client frames (masking, fragmentation, UTF-8, close codes).
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from collections.abc import Callable
from typing import Final

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.utilities import RemoteProtocolError

from gateway.config import Config, FeedConfig, ListenAddress
from gateway.dataplane import _messages as msg
from gateway.dataplane._connection import RECEIVE_CHUNK, Connection, Handler
from gateway.dataplane._dropin import DropinHandler
from gateway.dataplane._multiplex import MultiplexHandler
from gateway.dataplane._registry import SubscriberRegistry
from gateway.hub import Hub, valid_fixture_id

log = logging.getLogger("gateway.dataplane")

STREAM_PATH: Final = "/v1/stream"

_HandlerFactory = Callable[[Connection], Handler]


class _Reject(Exception):
    def __init__(self, status: int, body: bytes, content_type: bytes = b"text/plain") -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type


class _Router:
    """Maps a request target to the handler factory of its endpoint, or raises :class:`_Reject`."""

    def __init__(self, config: Config, hub: Hub) -> None:
        self.hub = hub
        self.exact: dict[str, FeedConfig] = {}
        self.templates: list[tuple[re.Pattern[str], FeedConfig]] = []
        for feed in config.feeds.values():
            path = feed.dropin_path
            if "{fixture}" in path:
                pattern = "^" + re.escape(path).replace(re.escape("{fixture}"), "([^/]+)") + "$"
                self.templates.append((re.compile(pattern), feed))
            else:
                self.exact[path] = feed

    def route(self, target: str) -> tuple[str, _HandlerFactory, str]:
        """(endpoint name, handler factory, slow policy override or "") for *target*."""
        split = urllib.parse.urlsplit(target)
        path = split.path
        hub = self.hub
        if path == STREAM_PATH:
            return STREAM_PATH, lambda conn: MultiplexHandler(conn, hub), ""
        feed = self.exact.get(path)
        if feed is not None:
            return path, lambda conn: DropinHandler(conn, hub, feed), "disconnect"
        for pattern, tfeed in self.templates:
            m = pattern.match(path)
            if m is None:
                continue
            fixture = urllib.parse.unquote(m[1])
            start = _start_position(split.query)
            if not self._known(tfeed, fixture):
                raise _Reject(404, msg.VENDOR_FIXTURE_NOT_FOUND, b"application/json")

            def factory(
                conn: Connection, f: FeedConfig = tfeed, fx: str = fixture, sp: int = start
            ) -> Handler:
                return DropinHandler(conn, hub, f, fixture=fx, start_position=sp)

            return tfeed.dropin_path, factory, "disconnect"
        raise _Reject(404, b"not found\n")

    def _known(self, feed: FeedConfig, fixture: str) -> bool:
        if self.hub.get(feed.name, fixture) is not None:
            return True
        d = self.hub.directory
        if d is not None and d.is_followed(feed.name, fixture):
            return True
        # Followed on demand after authentication, if its id may go into an upstream URL.
        return feed.on_demand and valid_fixture_id(fixture)


def _start_position(query: str) -> int:
    values = urllib.parse.parse_qs(query).get("startPosition")
    if not values:
        return 0
    try:
        n = int(values[-1])
    except ValueError:
        n = -1
    if n < 0:
        raise _Reject(400, b"startPosition must be an integer >= 0\n")
    return n


async def _read_request(stream: trio.SocketStream, ws: WSConnection) -> Request | None:
    while True:
        data = await stream.receive_some(RECEIVE_CHUNK)
        if not data:
            return None
        try:
            ws.receive_data(data)
        except RemoteProtocolError as exc:
            await stream.send_all(ws.send(exc.event_hint or RejectConnection(status_code=400)))
            return None
        for event in ws.events():
            if isinstance(event, Request):
                return event


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except (OSError, ValueError):
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Server:
    def __init__(self, config: Config, hub: Hub, registry: SubscriberRegistry) -> None:
        self.config = config
        self.settings = config.subscribers
        self.hub = hub
        self.registry = registry
        self.router = _Router(config, hub)

    async def handle(self, stream: trio.SocketStream) -> None:
        """One accepted TCP connection: handshake, then the endpoint protocol until it ends.

        Every failure of this peer ends this connection only, quietly (logged at debug).
        """
        try:
            await self._handle(stream)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            log.debug("subscriber connection failed", exc_info=True)
        except* Exception:
            # A bug must cost one connection, never the listener.
            log.exception("subscriber connection failed unexpectedly")
        finally:
            stream.socket.close()

    async def _handle(self, stream: trio.SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        with trio.fail_after(self.settings.handshake_timeout):
            request = await _read_request(stream, ws)
            if request is None:
                return
            try:
                endpoint, factory, policy = self.router.route(request.target)
                if self.registry.draining or len(self.registry) >= self.settings.max_connections:
                    why = "draining" if self.registry.draining else "max_connections reached"
                    self.registry.count_rejected(_peer(stream), why)
                    raise _Reject(503, b"subscriber limit reached or shutting down\n")
            except _Reject as rej:
                headers = [(b"content-type", rej.content_type), (b"connection", b"close")]
                data = ws.send(
                    RejectConnection(status_code=rej.status, headers=headers, has_body=True)
                ) + ws.send(RejectData(data=rej.body, body_finished=True))
                await stream.send_all(data)
                return
            await stream.send_all(ws.send(AcceptConnection()))
        conn = Connection(
            ident=self.registry.new_id(),
            peer=_peer(stream),
            endpoint=endpoint,
            stream=stream,
            ws=ws,
            settings=self.settings,
            policy="disconnect" if policy == "disconnect" else self.settings.slow_policy,
            monitor=self.registry,
            latency=self.hub.fanout_latency,
        )
        self.registry.add(conn)
        log.debug("subscriber %s connected from %s to %s", conn.id, conn.peer, endpoint)
        try:
            await conn.serve(factory(conn))
        finally:
            self.registry.remove(conn)
            log.debug("subscriber %s disconnected", conn.id)


async def run(
    config: Config,
    hub: Hub,
    registry: SubscriberRegistry,
    *,
    task_status: trio.TaskStatus[ListenAddress] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve subscribers on ``config.gateway.stream_listen`` until cancelled.

    Reports the address actually bound (port 0 picks a free one) through ``task_status``.
    Cancellation closes every connection at once; call ``registry.drain()`` first for a
    graceful close (1001).
    """
    addr = config.gateway.stream_listen
    listeners = await trio.open_tcp_listeners(addr.port, host=addr.host)
    sockname = listeners[0].socket.getsockname()
    bound = ListenAddress(addr.host, sockname[1])
    server = _Server(config, hub, registry)
    log.info("data plane listening on ws://%s%s", bound, STREAM_PATH)
    async with trio.open_nursery() as nursery:
        task_status.started(bound)
        await trio.serve_listeners(server.handle, listeners, handler_nursery=nursery)
