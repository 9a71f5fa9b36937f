"""One subscriber connection after the handshake: the I/O around its send queue.

:class:`Connection` does the socket work - the eager write, the writer task, the reader, the
pinger, close and abort; what to queue, drop or keep is decided by its
:class:`~gateway.dataplane._sendqueue.SendQueue` (no I/O there). The write path is the
performance-critical part of the gateway (measurements in docs/performance.md):

- Frame bytes are shared (built once by the hub). Delivering one is, when the subscriber has
  nothing queued and no write in flight, one non-blocking ``os.write`` on the socket's file
  descriptor straight from the publisher ("eager write"; trio keeps sockets non-blocking). Only
  what the kernel did not take is queued (as a tail that must be finished), and the writer
  task is woken. This path calls nothing but ``os.write`` and the latency sampler.
- Otherwise the bytes are pushed to the byte-budgeted queue. The writer task takes the whole
  queue per wake-up as one buffer and writes it (batching comes for free under load).
- The writer does its own non-blocking writes (``os.write`` + ``trio.lowlevel.wait_writable``)
  instead of ``send_all``, so it always knows how many bytes reached the kernel: a connection
  that is cut short can still finish the frame it was in the middle of and send a clean close
  frame.

Slow subscribers (the queue's rules): over budget, the ``disconnect`` policy discards the queue
and closes with 4008, counted through the ``on_slow`` callback; ``drop-oldest`` drops the
oldest queued data frames and the subscription sends a ``gap`` message before its next frame.
Control messages are never dropped.

Closing never waits forever: :meth:`Connection.close` puts a deadline of ``close_timeout`` on
the whole connection; after it the socket is aborted (RST) whatever the peer does.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Final, Protocol

import trio
from wsproto import WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

from gateway.config import SlowPolicy, SubscribersSection
from gateway.dataplane._sendqueue import DeliverySink, SendItem, SendQueue
from gateway.hub import LatencyHistogram, Topic
from gateway.wire import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_TOO_BIG,
    CLOSE_TOO_SLOW,
    encode_frame,
)

log = logging.getLogger("gateway.dataplane")

#: Bytes asked of the kernel per read.
RECEIVE_CHUNK: Final = 65536
#: Longest a closing connection may take (flush, close handshake) before it is aborted.
DEFAULT_CLOSE_TIMEOUT: Final = 5.0

_LINGER_ABORT: Final = struct.pack("ii", 1, 0)


class Handler(Protocol):
    """The endpoint protocol spoken on a connection (multiplexed or vendor drop-in).

    All methods are synchronous; :meth:`start` may start background tasks in *nursery*.
    """

    def start(self, nursery: trio.Nursery) -> None: ...

    def on_text(self, text: str) -> None: ...

    def on_binary(self) -> None: ...

    def topics(self) -> Iterable[Topic]: ...

    def subscription_names(self) -> list[str]: ...

    def finish(self) -> None:
        """The connection is gone: detach from every topic."""
        ...


class Connection:
    """A WebSocket subscriber after the handshake. Created and run by the server.

    Public counters are read by the registry: ``frames_sent``, :attr:`frames_dropped`,
    :attr:`queued_bytes`. ``on_slow(conn)`` is called when the queue finds the connection too
    slow (``disconnect`` policy), just before it is closed with 4008; the registry passes its
    ``count_slow_disconnect``.

    *tls* (a ``trio.SSLStream`` over *stream*) is for
    :class:`~gateway.dataplane._tlsconn.TlsConnection` only: this class writes to the socket's
    file descriptor and would go around it.
    """

    #: Whether the write path goes through ``tls`` (the subclass for TLS says yes).
    WRITES_THROUGH_TLS: bool = False

    def __init__(
        self,
        *,
        ident: str,
        peer: str,
        endpoint: str,
        stream: trio.SocketStream,
        ws: WSConnection,
        settings: SubscribersSection,
        policy: SlowPolicy,
        on_slow: Callable[[Connection], None],
        latency: LatencyHistogram,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        tls: trio.SSLStream[trio.SocketStream] | None = None,
    ) -> None:
        self.id = ident
        self.peer = peer
        self.endpoint = endpoint
        self.connected_at = time.time()
        self.settings = settings
        self.frames_sent = 0
        self.slow_disconnected = False
        self.handler: Handler | None = None
        if tls is not None and not self.WRITES_THROUGH_TLS:
            raise TypeError(f"{type(self).__name__} cannot write through TLS")
        self._stream = stream
        # What the reader reads: the socket, or the TLS stream over it (see _tlsconn).
        self._rx: trio.abc.ReceiveStream = stream if tls is None else tls
        self._sock = stream.socket
        self._fd = stream.socket.fileno()
        self._ws = ws
        self._on_slow = on_slow
        self._latency = latency
        self._close_timeout = close_timeout
        self._sq = SendQueue(settings.queue_bytes, policy)
        self._wake = trio.Event()
        self._pong = trio.Event()
        self._closing = False
        self._dead = False
        self._flushed = trio.Event()
        self._scope = trio.CancelScope()

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.peer} {self.endpoint}>"

    # -- views -----------------------------------------------------------------------------

    @property
    def policy(self) -> SlowPolicy:
        return self._sq.policy

    @property
    def frames_dropped(self) -> int:
        """Data frames dropped under ``drop-oldest``."""
        return self._sq.dropped

    @property
    def queued_bytes(self) -> int:
        """Bytes accepted for this subscriber that the kernel has not taken yet."""
        return self._sq.unsent

    @property
    def idle(self) -> bool:
        """Nothing queued and no write in flight: the next bytes may be written eagerly."""
        return self._sq.idle

    @property
    def closing(self) -> bool:
        return self._closing or self._dead

    # -- the write path --------------------------------------------------------------------

    def send_data(
        self, data: bytes, seq: int, published: float, sink: DeliverySink | None = None
    ) -> None:
        """Deliver one pre-encoded data frame (``seq`` > 0). Never blocks, never raises.

        ``published`` (``perf_counter``) feeds the latency histogram; 0 means "do not sample"
        (backfill, which the budget does not count). ``sink`` is told when the frame is
        dropped (drop-oldest policy).
        """
        if self._closing:
            return
        q = self._sq
        # The hot path: inline on purpose, no Python call on it but the latency sampler.
        if not q.items and not q.writing:
            try:
                n = os.write(self._fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                self._broken()
                return
            if n == len(data):
                self.frames_sent += 1
                if published:
                    self._latency.sample(published)
                return
            if n:
                # A started frame must be finished: its tail can never be dropped.
                item = SendItem(data[n:], seq, published, None, True)
            else:
                item = SendItem(data, seq, published, sink)
        else:
            item = SendItem(data, seq, published, sink)
        if q.push(item, not published):
            self._too_slow()
        self._wake.set()

    def send_control(self, payload: bytes) -> None:
        """Queue one text message built for this subscriber alone (never dropped)."""
        if not self._closing:
            self._send_raw(encode_frame(payload))

    def _send_raw(self, data: bytes) -> None:
        q = self._sq
        if not q.items and not q.writing and not self._dead:
            try:
                n = os.write(self._fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                self._broken()
                return
            if n == len(data):
                return
            item = SendItem(data[n:], None, 0.0, None, True) if n else SendItem(data, None)
        else:
            item = SendItem(data, None)
        if q.push(item, False):
            self._too_slow()
        self._wake.set()

    def _too_slow(self) -> None:
        self.slow_disconnected = True
        self._on_slow(self)
        log.info("subscriber %s (%s) too slow: disconnecting", self.id, self.peer)
        self.close(CLOSE_TOO_SLOW, "subscriber too slow", discard=True)

    async def _writer(self) -> None:
        """Drain the queue into the socket until closed; then half-close and signal flushed."""
        sock = self._sock
        fd = self._fd
        q = self._sq
        latency = self._latency
        while True:
            if not q.items:
                if self._closing:
                    break
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            buf, frames, sampled = q.take_batch()
            view = memoryview(buf)
            try:
                # q.batch_end shrinks when a close trims the batch while we wait.
                while q.inflight:
                    end = q.batch_end
                    try:
                        n = os.write(fd, view[end - q.inflight : end])
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(sock)
                        continue
                    q.wrote(n)
            except OSError:
                self._broken()
                return
            finally:
                view.release()
            q.batch_done()
            self.frames_sent += frames
            if sampled:
                latency.sample(sampled)
        # Everything, close frame included, is with the kernel: tell the peer we are done.
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._flushed.set()

    def _broken(self) -> None:
        # The peer is gone (reset, broken pipe): nothing more can be written.
        self._dead = True
        self._closing = True
        self._sq.clear()
        self._flushed.set()
        self._scope.cancel()

    def close(self, code: int, reason: str, *, discard: bool = False) -> None:
        """Start closing: queue a close frame after what is queued (or instead: *discard*).

        Returns at once. The connection ends when the peer answers or at the latest
        ``close_timeout`` seconds from now (then the socket is aborted).
        """
        if self._closing:
            return
        if discard:
            self._sq.discard()
        frame = self._ws_send(CloseConnection(code=code, reason=reason))
        if frame:
            self._send_raw(frame)
        self._closing = True
        self._scope.deadline = min(self._scope.deadline, trio.current_time() + self._close_timeout)
        self._wake.set()

    def _ws_send(self, event: Event) -> bytes:
        # wsproto refuses events the connection state forbids (ping after close): skip them.
        try:
            return bytes(self._ws.send(event))
        except LocalProtocolError:
            return b""

    # -- the whole connection --------------------------------------------------------------

    async def serve(self, handler: Handler) -> None:
        """Run the connection until it closes; always detaches the handler and closes the socket.

        Errors of the peer (reset, protocol violations) end this connection only.
        """
        self.handler = handler
        aborted = False
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    nursery.start_soon(self._pinger)
                    handler.start(nursery)
                    await self._reader(handler)
                    await self._flushed.wait()
                    nursery.cancel_scope.cancel()
            aborted = self._scope.cancelled_caught and not self._dead
        finally:
            handler.finish()
            if aborted or self.queued_bytes:
                # A jammed peer: reset instead of leaving the kernel to retry for minutes.
                try:
                    self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
                except OSError:
                    pass
            self._stream.socket.close()
            self._closing = True

    async def _reader(self, handler: Handler) -> None:
        max_bytes = self.settings.max_message_bytes
        parts: list[str] = []
        size = 0
        binary = False
        ws = self._ws
        while True:
            try:
                data = await self._rx.receive_some(RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                # The peer went away without (finishing) the close handshake.
                self._dead = True
                self._closing = True
                self._flushed.set()
                return
            # bytes(): TLS reads are typed bytes | bytearray; for bytes it is the same object.
            ws.receive_data(bytes(data))
            for event in ws.events():
                if isinstance(event, TextMessage | BytesMessage):
                    if self._closing:
                        continue
                    if isinstance(event, TextMessage):
                        size += len(event.data.encode())
                        parts.append(event.data)
                    else:
                        size += len(event.data)
                        binary = True
                    if size > max_bytes:
                        self.close(CLOSE_TOO_BIG, f"message larger than {max_bytes} bytes")
                        continue
                    if event.message_finished:
                        if binary:
                            handler.on_binary()
                        else:
                            handler.on_text("".join(parts))
                        parts.clear()
                        size = 0
                        binary = False
                else:
                    self._on_control(event)
            if ws.state is ConnectionState.CLOSED:
                return

    def _on_control(self, event: Event) -> None:
        if isinstance(event, Ping):
            if not self._closing:
                self._send_raw(self._ws_send(event.response()))
        elif isinstance(event, Pong):
            self._pong.set()
        elif isinstance(event, CloseConnection):
            # The peer closes (or broke the protocol: wsproto reports that as a close with
            # 1002/1007): answer with the same code, then the reader ends.
            if self._ws.state is ConnectionState.REMOTE_CLOSING:
                frame = self._ws_send(event.response())
                if not self._closing and frame:
                    self._send_raw(frame)
                self._closing = True
                self._scope.deadline = min(
                    self._scope.deadline, trio.current_time() + self._close_timeout
                )
                self._wake.set()
            elif self._ws.state is ConnectionState.OPEN:
                self.close(event.code, event.reason or "")

    async def _pinger(self) -> None:
        interval = self.settings.ping_interval
        timeout = self.settings.ping_timeout
        n = 0
        while True:
            await trio.sleep(interval)
            if self._closing:
                return
            n += 1
            self._pong = trio.Event()
            ping = self._ws_send(Ping(payload=str(n).encode()))
            if not ping:
                return
            self._send_raw(ping)
            with trio.move_on_after(timeout):
                await self._pong.wait()
                continue
            log.info("subscriber %s (%s): no pong within %ss, closing", self.id, self.peer, timeout)
            self.close(CLOSE_INTERNAL_ERROR, "ping timeout", discard=True)
            return

    async def run_heartbeats(self, interval: float, make: Callable[[], bytes]) -> None:
        """Send ``make()`` every *interval* seconds until the connection closes."""
        while not self._closing:
            await trio.sleep(interval)
            self.send_control(make())
