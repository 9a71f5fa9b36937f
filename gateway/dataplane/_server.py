"""The data-plane server: a raw trio TCP listener with wsproto for handshakes and client frames.

Why not a WebSocket server library: fan-out cost is dominated by how frames reach the socket
(see ``docs/performance.md``: 2 us per delivery here against 50 us with trio-websocket
``send_message``). wsproto still does the parts that need care: the HTTP upgrade and parsing
client frames (masking, fragmentation, UTF-8, close codes).

With ``[gateway] tls_cert_file``/``tls_key_file`` every accepted socket is wrapped in a
``trio.SSLStream`` (handshake within ``handshake_timeout``) and served by a
:class:`~gateway.dataplane._tlsconn.TlsConnection`: the eager ``os.write`` cannot be used under
TLS, so every write goes through the writer task and ``send_all``. Plaintext connections are
untouched. Subscriber authentication: :mod:`gateway.dataplane._access`.
"""

from __future__ import annotations

import logging
import re
import ssl
import urllib.parse
import zlib
from collections.abc import Callable
from typing import Any, Final

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits
from wsproto.utilities import RemoteProtocolError

from gateway.config import (
    MAX_WRITE_DELAY_MS,
    Config,
    FeedConfig,
    ListenAddress,
    load_server_tls,
    load_subscriber_tokens,
)
from gateway.dataplane._access import STREAM_PROTOCOL, SubscriberAuth, offered_tokens
from gateway.dataplane._connection import (
    RECEIVE_CHUNK,
    Connection,
    DelayedConnection,
    Handler,
    WriteTicker,
)
from gateway.dataplane._dropin import DropinHandler
from gateway.dataplane._multiplex import MultiplexHandler
from gateway.dataplane._registry import SubscriberRegistry
from gateway.dataplane._tlsconn import TlsConnection
from gateway.hub import Hub
from gateway.listen import open_listen_sockets
from gateway.logs import log_context
from gateway.replay import Replays

log = logging.getLogger("gateway.dataplane")

STREAM_PATH: Final = "/v1/stream"

_HandlerFactory = Callable[[Connection], Handler]
_Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]

_UNAUTHORIZED_HEADERS: Final = [(b"www-authenticate", b'Bearer realm="dde-gateway"')]


class _Reject(Exception):
    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: bytes = b"text/plain",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or []


class _Route:
    """Where an upgrade request goes: endpoint name, handler factory, slow policy override
    ("" for the configured one), the subprotocol to answer and the token line used (logs)."""

    __slots__ = ("endpoint", "factory", "grant_line", "policy", "subprotocol", "write_delay")

    def __init__(
        self,
        endpoint: str,
        factory: _HandlerFactory,
        policy: str = "",
        subprotocol: str | None = None,
        grant_line: int = 0,
        *,
        write_delay: int | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.policy = policy
        self.subprotocol = subprotocol
        self.grant_line = grant_line
        #: The connection's ``write_delay`` in ms (``?write_delay=``); None: the configured one.
        self.write_delay = write_delay


class _Router:
    """Maps an upgrade request to its endpoint's :class:`_Route`, or raises :class:`_Reject`.

    ``/v1/stream`` is authenticated here (HTTP 401); drop-in endpoints authenticate in their
    first message (vendor protocol), with the same :class:`SubscriberAuth`: until then nothing
    depends on the fixture in a fastpath path (any id is upgraded alike).
    """

    def __init__(
        self, config: Config, hub: Hub, auth: SubscriberAuth, replays: Replays | None = None
    ) -> None:
        self.hub = hub
        self.auth = auth
        self.replays = replays if replays is not None else Replays(config.replay)
        self.exact: dict[str, FeedConfig] = {}
        self.templates: list[tuple[re.Pattern[str], FeedConfig]] = []
        for feed in config.feeds.values():
            path = feed.dropin_path
            if "{fixture}" in path:
                pattern = "^" + re.escape(path).replace(re.escape("{fixture}"), "([^/]+)") + "$"
                self.templates.append((re.compile(pattern), feed))
            else:
                self.exact[path] = feed

    def route(self, request: Request, peer: str) -> _Route:
        split = urllib.parse.urlsplit(request.target)
        path = split.path
        hub = self.hub
        auth = self.auth
        replays = self.replays
        if path == STREAM_PATH:
            route = self._stream(request, peer)
            route.write_delay = _write_delay(split.query)
            return route
        feed = self.exact.get(path)
        if feed is not None:
            return _Route(
                path,
                lambda conn: DropinHandler(conn, hub, feed, auth=auth, replays=replays),
                "disconnect",
            )
        for pattern, tfeed in self.templates:
            m = pattern.match(path)
            if m is None:
                continue
            fixture = urllib.parse.unquote(m[1])
            start = _start_position(split.query)
            # Whether the fixture is followed is not told before the authentication message
            # (DropinHandler): an unknown fixture is refused after it, with the vendor's body,
            # so a client without a token cannot enumerate the fixtures the gateway follows.

            def factory(
                conn: Connection, f: FeedConfig = tfeed, fx: str = fixture, sp: int = start
            ) -> Handler:
                return DropinHandler(
                    conn, hub, f, auth=auth, fixture=fx, start_position=sp, replays=replays
                )

            return _Route(tfeed.dropin_path, factory, "disconnect")
        raise _Reject(404, b"not found\n")

    def _stream(self, request: Request, peer: str) -> _Route:
        offered = offered_tokens(request.extra_headers, request.subprotocols)
        ok, grant = self.auth.check_stream(offered, peer)
        if not ok:
            raise _Reject(
                401, b"a valid subscriber token is required\n", headers=_UNAUTHORIZED_HEADERS
            )
        hub = self.hub
        replays = self.replays
        feeds = None if grant is None else grant.feeds
        # Answer dde.v1 when offered (browsers insist on an answer when they offered any);
        # never a dde.bearer.<token> protocol: the token must not travel back.
        subprotocol = STREAM_PROTOCOL if STREAM_PROTOCOL in request.subprotocols else None
        return _Route(
            STREAM_PATH,
            lambda conn: MultiplexHandler(conn, hub, feeds, replays),
            subprotocol=subprotocol,
            grant_line=0 if grant is None else grant.line,
        )


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


_SERVER_BITS: Final = re.compile(r"server_max_window_bits\s*=\s*\"?(\d+)")


#: The empty stored block RFC 7692 has the sender leave off the end of every message.
_DEFLATE_TAIL: Final = b"\x00\x00\xff\xff"


class SharedDeflate(PerMessageDeflate):
    """permessage-deflate as the gateway speaks it (``[subscribers] compression = "deflate"``).

    Always with ``server_no_context_takeover`` and ``client_no_context_takeover``: each
    message is compressed on its own, so one compressed frame (``Frame.deflate_ws``) serves
    every such subscriber. An offer that limits the server's window below 15 bits is declined
    (the shared bytes use the full window); the first acceptable offer wins. The gateway's own
    control messages go uncompressed.

    The client's compressed messages are inflated here with the message limit enforced on the
    inflated size: each ``decompress`` call may produce at most the room left under
    *max_message_bytes* plus one byte, so no message is ever inflated past its limit (a
    compression bomb costs at most ``max_message_bytes + 1`` bytes and the work to produce
    them); one byte more and wsproto reports close 1009, which the connection sends with the
    same reason as for an uncompressed message over the limit. (wsproto's own
    ``PerMessageDeflate`` inflates each chunk whole before anything can look at its size.)
    """

    def __init__(self, max_message_bytes: int) -> None:
        super().__init__(client_no_context_takeover=True, server_no_context_takeover=True)
        self._answer: str | None = None
        self.max_message_bytes = max_message_bytes
        #: Inflated bytes of the client's current message so far.
        self._inflated = 0

    def accept(self, offer: str) -> bool | str | None:
        if self._answer is not None:
            return self._answer
        m = _SERVER_BITS.search(offer)
        if m is not None and int(m[1]) < 15:
            return None
        answer = super().accept(offer)
        if isinstance(answer, str):
            self._answer = answer
        return answer

    def frame_inbound_header(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        payload_length: int,
    ) -> CloseReason | RsvBits:
        if self._inbound_compressed is None:
            self._inflated = 0  # a new message starts
        return super().frame_inbound_header(proto, opcode, rsv, payload_length)

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        return self._inflate(data)

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if not (fin and self._inbound_is_compressible and self._inbound_compressed):
            return super().frame_inbound_complete(proto, fin)
        # All input was consumed (else the message was already too big): no flush() needed,
        # and none is made, since flush() inflates without a bound.
        result = self._inflate(_DEFLATE_TAIL)
        if self.client_no_context_takeover:
            self._decompressor = None
        self._inbound_compressed = None
        self._inflated = 0
        return result

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        decompressor = self._decompressor
        assert decompressor is not None, "set by frame_inbound_header for a compressed message"
        room = self.max_message_bytes - self._inflated
        try:
            # max_length >= 1 (0 would mean "no limit").
            out = decompressor.decompress(data, room + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        if len(out) > room:
            return CloseReason.MESSAGE_TOO_BIG
        self._inflated += len(out)
        return out


def _write_delay(query: str) -> int | None:
    """``?write_delay=MS`` of ``/v1/stream``: None when absent; 400 unless an integer 0-1000."""
    values = urllib.parse.parse_qs(query).get("write_delay")
    if not values:
        return None
    value = values[-1]
    ms = int(value) if value.isascii() and value.isdigit() else -1
    if not 0 <= ms <= MAX_WRITE_DELAY_MS:
        raise _Reject(400, b"write_delay must be a whole number of milliseconds, 0 to 1000\n")
    return ms


async def _read_request(stream: _Stream, ws: WSConnection) -> Request | None:
    while True:
        data = await stream.receive_some(RECEIVE_CHUNK)
        if not data:
            return None
        try:
            ws.receive_data(bytes(data))
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
    def __init__(
        self,
        config: Config,
        hub: Hub,
        registry: SubscriberRegistry,
        auth: SubscriberAuth,
        tls: ssl.SSLContext | None,
        *,
        replays: Replays | None = None,
    ) -> None:
        self.config = config
        self.settings = config.subscribers
        self.hub = hub
        self.registry = registry
        self.tls = tls
        self.router = _Router(config, hub, auth, replays)
        #: One WriteTicker per write_delay in use (ms), running in ``nursery``.
        self.tickers: dict[int, WriteTicker] = {}
        self.nursery: trio.Nursery | None = None

    def _ticker(self, delay_ms: int) -> WriteTicker:
        ticker = self.tickers.get(delay_ms)
        if ticker is None:
            assert self.nursery is not None, "the server's nursery runs the tickers"
            ticker = self.tickers[delay_ms] = WriteTicker(delay_ms / 1000.0)
            self.nursery.start_soon(ticker.run)
        return ticker

    async def handle(self, stream: trio.SocketStream) -> None:
        """One accepted TCP connection: handshake, then the endpoint protocol until it ends.

        Every failure of this peer ends this connection only, quietly (logged at debug).
        """
        # Every line about this connection names its peer; once accepted, its id too.
        with log_context(peer=_peer(stream)):
            try:
                await self._handle(stream)
            except* (
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                trio.TooSlowError,
                OSError,
            ):
                log.debug("subscriber connection failed", exc_info=True)
            except* Exception:
                # A bug must cost one connection, never the listener.
                log.exception("subscriber connection failed unexpectedly")
            finally:
                stream.socket.close()

    async def _handle(self, stream: trio.SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        peer = _peer(stream)
        tls: trio.SSLStream[trio.SocketStream] | None = None
        io: _Stream = stream
        with trio.fail_after(self.settings.handshake_timeout):
            if self.tls is not None:
                # A failed TLS handshake (a plaintext client, say) raises BrokenResourceError:
                # this connection ends quietly, nothing else notices.
                io = tls = trio.SSLStream(stream, self.tls, server_side=True)
                await tls.do_handshake()
            request = await _read_request(io, ws)
            if request is None:
                return
            try:
                route = self.router.route(request, peer)
                if self.registry.draining or len(self.registry) >= self.settings.max_connections:
                    why = "draining" if self.registry.draining else "max_connections reached"
                    self.registry.count_rejected(_peer(stream), why)
                    raise _Reject(503, b"subscriber limit reached or shutting down\n")
            except _Reject as rej:
                headers = [
                    (b"content-type", rej.content_type),
                    (b"connection", b"close"),
                    *rej.headers,
                ]
                data = ws.send(
                    RejectConnection(status_code=rej.status, headers=headers, has_body=True)
                ) + ws.send(RejectData(data=rej.body, body_finished=True))
                await io.send_all(data)
                return
            deflate = None
            if self.settings.compression == "deflate" and route.endpoint == STREAM_PATH:
                deflate = SharedDeflate(self.settings.max_message_bytes)
            accept = AcceptConnection(
                subprotocol=route.subprotocol, extensions=[deflate] if deflate else []
            )
            await io.send_all(ws.send(accept))
        endpoint = route.endpoint
        delay_ms = self.settings.write_delay if route.write_delay is None else route.write_delay
        cls: type[Connection] = Connection
        extra: dict[str, Any] = {}
        if tls is not None:
            cls = TlsConnection
            if delay_ms:
                extra["write_delay"] = delay_ms / 1000.0
        elif delay_ms:
            cls = DelayedConnection
            extra["ticker"] = self._ticker(delay_ms)
        compressed = deflate is not None and deflate.enabled()
        conn = cls(
            ident=self.registry.new_id(),
            peer=peer,
            endpoint=endpoint,
            stream=stream,
            ws=ws,
            settings=self.settings,
            policy="disconnect" if route.policy == "disconnect" else self.settings.slow_policy,
            monitor=self.registry,
            latency=self.hub.fanout_latency,
            tls=tls,
            deflate=compressed,
            **extra,
        )
        self.registry.add(conn)
        # Every line of this connection's task (and the tasks it starts) names it.
        with log_context(subscriber=conn.id):
            log.debug(
                "subscriber %s connected from %s to %s%s%s",
                conn.id,
                conn.peer,
                endpoint,
                " over TLS" if tls is not None else "",
                f" (token of line {route.grant_line})" if route.grant_line else "",
            )
            try:
                await conn.serve(route.factory(conn))
            finally:
                self.registry.remove(conn)
                log.debug("subscriber %s disconnected", conn.id)


async def run(
    config: Config,
    hub: Hub,
    registry: SubscriberRegistry,
    *,
    auth: SubscriberAuth | None = None,
    tls: ssl.SSLContext | None = None,
    replays: Replays | None = None,
    task_status: trio.TaskStatus[ListenAddress] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve subscribers on ``config.gateway.stream_listen`` until cancelled.

    *auth*: the subscriber tokens and failure counters (the service keeps one to swap tokens
    on reload); without it one is made from ``[subscribers] tokens_file``. *tls*: the server
    context; without it one is made from ``[gateway] tls_cert_file``/``tls_key_file`` when
    set. *replays*: the gateway's replay limits, counters and vendor link (without it: the
    ``[replay]`` limits, own counters, no pass-through). *auth* and *tls* may raise
    :class:`~gateway.config.ConfigError` before anything is bound.

    The listening sockets come from :func:`gateway.listen.open_listen_sockets`
    (``SO_REUSEPORT`` with ``[gateway] reuse_port``); one that cannot be opened (address in
    use) raises :class:`~gateway.listen.ListenError` before ``started()``.
    Reports the address actually bound (port 0 picks a free one) through ``task_status``.
    Cancellation closes every connection at once; call ``registry.drain()`` first for a
    graceful close (1001).
    """
    if auth is None:
        auth = SubscriberAuth(load_subscriber_tokens(config))
    if tls is None:
        tls = load_server_tls(config)
    addr = config.gateway.stream_listen
    reuse_port = config.gateway.reuse_port
    sockets = await open_listen_sockets(
        addr.host, addr.port, name="stream_listen", reuse_port=reuse_port
    )
    try:
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
        bound = ListenAddress(addr.host, sockets[0].getsockname()[1])
        server = _Server(config, hub, registry, auth, tls, replays=replays)
        scheme = "ws" if tls is None else "wss"
        log.info(
            "data plane listening on %s://%s%s%s",
            scheme,
            bound,
            STREAM_PATH,
            " (SO_REUSEPORT)" if reuse_port else "",
        )
        async with trio.open_nursery() as nursery:
            server.nursery = nursery
            task_status.started(bound)
            await trio.serve_listeners(server.handle, listeners, handler_nursery=nursery)
    finally:
        # serve_listeners closes them when it ends; this covers a cancellation before it ran.
        for sock in sockets:
            sock.close()
