"""The default connector: a lean WebSocket client read in the caller's task.

Why not trio-websocket here: at 5,000 frames/s its reader task (wsproto frame parsing, one task
switch and one memory-channel hand-off per message) was the largest upstream cost. This client
uses wsproto only for the HTTP upgrade; server frames are decoded here, in the task that calls
:meth:`LeanConnection.get_message`, straight from one receive buffer. Upstream servers never mask
their frames, so decoding is a header parse and one UTF-8 decode per message.

Protocol handled: FIN/continuation reassembly, text and binary messages, 7/16/64-bit lengths,
ping (answered with a pong), pong (ignored), and the close handshake. Violations end the
connection with a close frame of the matching code: 1002 (protocol), 1007 (invalid UTF-8),
1009 (message over :data:`MAX_MESSAGE_SIZE`); the caller then sees :class:`UpstreamClosed`.
"""

from __future__ import annotations

import collections
import os
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Final

import trio
from wsproto import ConnectionType
from wsproto.events import AcceptConnection, RejectConnection, Request
from wsproto.handshake import H11Handshake
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from gateway.upstream._connect import (
    DISCONNECT_TIMEOUT,
    RECEIVE_BUFFER_SIZE,
    UpstreamClosed,
    UpstreamConnection,
    UpstreamRejected,
    UpstreamUnavailable,
)
from gateway.wire import (
    CLOSE_ABNORMAL,
    CLOSE_INVALID_DATA,
    CLOSE_NO_STATUS,
    CLOSE_NORMAL,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    FIN,
    MAX_CONTROL_PAYLOAD,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RSV_BITS,
    close_payload,
    mask_frame,
    read_close,
    read_header,
)

#: Largest message accepted (after reassembly); a larger one is closed with 1009.
MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
#: Largest HTTP response head accepted during the upgrade.
MAX_HANDSHAKE_HEAD: Final = 64 * 1024


class _ProtocolFailure(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class LeanConnection:
    """An open upstream WebSocket behind the :class:`UpstreamConnection` protocol.

    Owns its stream: :meth:`aclose` closes it. Not for concurrent ``get_message`` calls (one
    reader, the fixture's task); ``send_message`` may run alongside.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        buffered: bytes,
        *,
        disconnect_timeout: float,
        read_buffer: memoryview | None = None,
    ) -> None:
        self._stream = stream
        # Plain TCP with a *read_buffer*: reads go into that reusable buffer (see _read).
        self._socket = (
            stream.socket
            if read_buffer is not None and isinstance(stream, trio.SocketStream)
            else None
        )
        self._read_buffer = read_buffer
        self._buf = bytearray()
        self._disconnect_timeout = disconnect_timeout
        self._messages: collections.deque[str | bytes] = collections.deque()
        self._parts: list[bytes] = []
        self._parts_size = 0
        self._parts_opcode = 0
        self._replies: list[bytes] = []  # control frames to send (pongs), in order
        # Set once the peer's close (or EOF, or our protocol error) ends reading.
        self._closed: UpstreamClosed | None = None
        self._close_sent = False
        self._close_received = False
        self._broken = False  # a write was interrupted or failed: nothing more can be sent
        self._failed = False  # the peer broke the protocol: further bytes are discarded
        self._send_lock = trio.Lock()
        self._socket_closed = False
        # Frames that arrived with the handshake response are decoded now, not after a read.
        self._ingest(buffered)

    async def send_message(self, message: str) -> None:
        if self._close_sent or self._broken:
            raise self._closed or UpstreamClosed(None)
        await self._send(mask_frame(message.encode()))

    async def get_message(self) -> str | bytes:
        # Cancel-safe: parsed messages wait in the deque and a partial frame stays in the buffer;
        # the only await that can be cancelled is the socket read (or a shielded write).
        while True:
            if self._messages:
                return self._messages.popleft()
            if self._replies:
                replies, self._replies = self._replies, []
                for frame in replies:
                    await self._send(frame)
                continue
            if self._closed is not None:
                await self._reply_close()  # echo the peer's close, or report our error code
                raise self._closed
            await self._read()

    async def aclose(self) -> None:
        """Close handshake bounded by the disconnect timeout, then close the socket.

        Sends a 1000 close (or echoes the peer's, or sends our error code) unless one was sent
        already, reads (and discards) until the peer's
        close or EOF, then closes the socket. Shielded: it completes under cancellation too.
        """
        if self._socket_closed:
            return
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self._disconnect_timeout):
                try:
                    if self._closed is not None:
                        await self._reply_close()  # the peer's close or our error, not yet sent
                    elif not self._close_sent and not self._broken:
                        self._close_sent = True
                        await self._send(mask_frame(close_payload(CLOSE_NORMAL), OP_CLOSE))
                    while not self._close_received and not self._broken:
                        await self._read()
                        self._messages.clear()  # the caller is gone: nothing more is delivered
                        self._replies.clear()
                except UpstreamClosed:
                    pass  # the write failed: nothing left to do but close the socket
            if self._closed is None:
                self._closed = UpstreamClosed(CLOSE_NORMAL)
            self._socket_closed = True
            await trio.aclose_forcefully(self._stream)

    async def _reply_close(self) -> None:
        assert self._closed is not None
        if self._close_sent or self._broken:
            return
        self._close_sent = True
        code = self._closed.code
        await self._send(mask_frame(close_payload(code or CLOSE_NO_STATUS), OP_CLOSE))

    async def _send(self, frame: bytes) -> None:
        # A cancelled write could leave half a frame on the wire, so writes are shielded and
        # bounded instead; one that does not finish in time breaks the connection.
        if self._broken:
            raise self._closed or UpstreamClosed(CLOSE_ABNORMAL)
        async with self._send_lock:
            with trio.CancelScope(shield=True), trio.move_on_after(self._disconnect_timeout):
                try:
                    await self._stream.send_all(frame)
                    return
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            self._broken = True
            if self._closed is None:
                self._closed = UpstreamClosed(CLOSE_ABNORMAL)
            raise self._closed

    async def _read(self) -> None:
        data: bytes | bytearray | memoryview
        if self._socket is not None:
            data = await self._read_into()
        else:
            try:
                data = await self._stream.receive_some(RECEIVE_BUFFER_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
        if not data:
            self._broken = True
            self._close_received = True
            if self._closed is None:
                self._closed = UpstreamClosed(CLOSE_ABNORMAL)
            return
        self._ingest(data)

    async def _read_into(self) -> memoryview:
        """Wait until the socket is readable, then read into the shared buffer (b"" on EOF).

        Why not ``receive_some``: it allocates a fresh 64 KiB object per read, which glibc
        returns to the kernel and takes back on the next read; at 5,000 frames/s the page faults
        (the kernel zeroing those pages) were 29 % of the gateway's CPU. The buffer is shared by
        every connection of the connector: its bytes are copied out (:meth:`_ingest`) before
        the next await, and one trio run is single-threaded.
        """
        assert self._socket is not None and self._read_buffer is not None
        sock = self._socket
        view = self._read_buffer
        while True:
            try:
                await trio.lowlevel.wait_readable(sock)
                n = os.readv(sock.fileno(), (view,))
            except BlockingIOError:
                continue  # readable was spurious (another reader, or the kernel changed its mind)
            except (trio.ClosedResourceError, OSError):
                n = 0
            return view[:n]

    def _ingest(self, data: bytes | bytearray | memoryview) -> None:
        if self._failed or self._close_received:
            return  # after a protocol error or the peer's close, only EOF matters
        self._buf += data
        try:
            self._decode()
        except _ProtocolFailure as exc:
            self._failed = True
            self._closed = UpstreamClosed(exc.code)
            self._buf.clear()

    def _decode(self) -> None:
        """Decode every complete frame in the buffer; keep a partial one for the next read."""
        buf = self._buf
        end = len(buf)
        pos = 0
        try:
            while not self._close_received:
                header = read_header(buf, pos)
                if header is None:
                    break
                b0, mask_at, head, length = header
                if mask_at or b0 & RSV_BITS:  # servers never mask; no extension negotiated
                    raise _ProtocolFailure(CLOSE_PROTOCOL_ERROR)
                opcode = b0 & 0x0F
                if opcode >= OP_CLOSE:
                    # Control frames are short and never fragmented.
                    if length > MAX_CONTROL_PAYLOAD or not b0 & FIN:
                        raise _ProtocolFailure(CLOSE_PROTOCOL_ERROR)
                elif self._parts_size + length > MAX_MESSAGE_SIZE:
                    raise _ProtocolFailure(CLOSE_TOO_BIG)
                if end - head < length:
                    break
                pos = head + length
                self._frame(b0 & FIN != 0, opcode, buf[head:pos])
        finally:
            del buf[:pos]

    def _frame(self, fin: bool, opcode: int, payload: bytearray) -> None:
        if opcode in (OP_TEXT, OP_BINARY):
            if self._parts_opcode:
                raise _ProtocolFailure(CLOSE_PROTOCOL_ERROR)  # new message inside a fragmented one
            if fin:
                self._messages.append(_message(opcode, payload))
                return
            self._parts_opcode = opcode
            self._parts = [bytes(payload)]
            self._parts_size = len(payload)
        elif opcode == OP_CONTINUATION:
            if not self._parts_opcode:
                raise _ProtocolFailure(CLOSE_PROTOCOL_ERROR)
            self._parts.append(bytes(payload))
            self._parts_size += len(payload)
            if fin:
                whole = b"".join(self._parts)
                self._messages.append(_message(self._parts_opcode, whole))
                self._parts, self._parts_size, self._parts_opcode = [], 0, 0
        elif opcode == OP_PING:
            self._replies.append(mask_frame(bytes(payload), OP_PONG))
        elif opcode == OP_PONG:
            pass
        elif opcode == OP_CLOSE:
            self._close_received = True
            self._closed = _peer_close(payload)
        else:
            raise _ProtocolFailure(CLOSE_PROTOCOL_ERROR)


def _message(opcode: int, payload: bytes | bytearray) -> str | bytes:
    if opcode == OP_BINARY:
        return bytes(payload)
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise _ProtocolFailure(CLOSE_INVALID_DATA) from None


def _peer_close(payload: bytearray) -> UpstreamClosed:
    if not payload:
        return UpstreamClosed(CLOSE_NO_STATUS)
    try:
        code, reason = read_close(payload)
    except UnicodeDecodeError:
        raise _ProtocolFailure(CLOSE_INVALID_DATA) from None
    except ValueError:
        raise _ProtocolFailure(CLOSE_PROTOCOL_ERROR) from None
    return UpstreamClosed(code, reason)


def _target(url: str) -> tuple[bool, str, int, str]:
    """(tls, host, port, request target) of a ws:// or wss:// URL; ValueError otherwise."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("not a ws:// or wss:// URL")
    tls = parts.scheme == "wss"
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return tls, parts.hostname, port, target


async def _handshake(
    stream: trio.abc.Stream, host: str, target: str, headers: Sequence[tuple[bytes, bytes]]
) -> bytes:
    """Upgrade *stream*; return the bytes that followed the response head (frames already sent).

    Only the response head is given to wsproto, so no frame byte ends up in its buffers.
    """
    hs = H11Handshake(ConnectionType.CLIENT)
    await stream.send_all(hs.send(Request(host=host, target=target, extra_headers=list(headers))))
    buf = bytearray()
    while (cut := buf.find(b"\r\n\r\n")) < 0:
        if len(buf) > MAX_HANDSHAKE_HEAD:
            raise UpstreamUnavailable("handshake failed: response head too large")
        data = await stream.receive_some(RECEIVE_BUFFER_SIZE)
        if not data:
            raise UpstreamUnavailable("handshake failed: connection closed")
        buf += data
    cut += 4
    try:
        hs.receive_data(bytes(buf[:cut]))
        for event in hs.events():
            if isinstance(event, AcceptConnection):
                return bytes(buf[cut:])
            if isinstance(event, RejectConnection):
                raise UpstreamRejected(event.status_code)
    except (RemoteProtocolError, LocalProtocolError):
        pass
    raise UpstreamUnavailable("handshake failed: invalid response")


def _unavailable(exc: BaseException) -> UpstreamUnavailable:
    if isinstance(exc, OSError) and exc.strerror:
        return UpstreamUnavailable(f"connection failed: {exc.strerror}")
    if isinstance(exc, trio.TooSlowError):
        return UpstreamUnavailable("handshake timed out")
    return UpstreamUnavailable(f"connection failed: {type(exc).__name__}")


class LeanConnector:
    """The default :class:`Connector`. Build it with :func:`open_websocket_connector`."""

    def __init__(
        self,
        *,
        disconnect_timeout: float = DISCONNECT_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._disconnect_timeout = disconnect_timeout
        # None: the system's trust store (ssl.create_default_context), made on first wss:// use.
        self._ssl: ssl.SSLContext | None = ssl_context
        # One read buffer for every plain-TCP connection of this connector (see _read_into).
        self._read_buffer = memoryview(bytearray(RECEIVE_BUFFER_SIZE))

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    @asynccontextmanager
    async def __call__(
        self, url: str, *, headers: Sequence[tuple[bytes, bytes]], connect_timeout: float
    ) -> AsyncIterator[UpstreamConnection]:
        try:
            tls, host, port, target = _target(url)
        except ValueError:
            raise UpstreamUnavailable("connection failed: invalid URL") from None
        stream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(connect_timeout):
                stream = await trio.open_tcp_stream(host, port)
                if tls:
                    stream = trio.SSLStream(stream, self._ssl_context(), server_hostname=host)
                    await stream.do_handshake()
                buffered = await _handshake(stream, host, target, headers)
        except (UpstreamRejected, UpstreamUnavailable):
            await _abandon(stream)
            raise
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as exc:
            await _abandon(stream)
            raise _unavailable(exc) from None
        except BaseException:  # cancelled while connecting (removal, shutdown)
            await _abandon(stream)
            raise
        conn = LeanConnection(
            stream,
            buffered,
            disconnect_timeout=self._disconnect_timeout,
            read_buffer=self._read_buffer,
        )
        try:
            yield conn
        finally:
            await conn.aclose()


async def _abandon(stream: trio.abc.Stream | None) -> None:
    # No open WebSocket to close politely: close the socket at once.
    if stream is not None:
        await trio.aclose_forcefully(stream)


@asynccontextmanager
async def open_websocket_connector(
    *,
    disconnect_timeout: float = DISCONNECT_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[LeanConnector]:
    """The default connector (:class:`LeanConnector`) for the ``async with`` body.

    It holds no tasks or sockets of its own: each connection is closed (close handshake bounded
    by *disconnect_timeout*) when its own context exits. ``wss://`` URLs verify the server with
    *ssl_context* (default: the system's trust store and hostname checking).
    """
    yield LeanConnector(disconnect_timeout=disconnect_timeout, ssl_context=ssl_context)
