"""One subscriber connection after the handshake: its write queue, writer, reader and pinger.

The write path is the performance-critical part of the gateway (measurements in
``docs/performance.md``):

- Frame bytes are shared (built once by the hub). Delivering one is, when the subscriber has
  nothing queued and no write in flight, one non-blocking ``os.write`` on the socket's file
  descriptor straight from the publisher ("eager write"; trio keeps sockets non-blocking). Only
  what the kernel did not take is queued, and the writer task is woken.
- Otherwise the bytes are appended to a byte-budgeted queue. The writer task drains the whole
  queue per wake-up into one buffer and writes it (batching comes for free under load).
- The writer does its own non-blocking writes (``os.write`` + ``trio.lowlevel.wait_writable``)
  instead of ``send_all``, so it always knows how many bytes reached the kernel: a connection
  that is cut short can still finish the frame it was in the middle of and send a clean close
  frame.

Slow subscribers: when queued plus in-flight bytes pass ``queue_bytes``, the ``disconnect``
policy discards the queue and closes with 4008; ``drop-oldest`` drops the oldest queued data
frames until under budget and the subscription sends a ``gap`` message before its next frame.
Control messages are never dropped.

Closing never waits forever: :meth:`Connection.close` puts a deadline of ``close_timeout`` on
the whole connection; after it the socket is aborted (RST) whatever the peer does.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final, Protocol

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
from gateway.hub import LatencyHistogram, Topic
from gateway.wire import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_TOO_BIG,
    CLOSE_TOO_SLOW,
    encode_frame,
)

if TYPE_CHECKING:
    from gateway.dataplane._registry import SubscriberRegistry

log = logging.getLogger("gateway.dataplane")

#: Bytes asked of the kernel per read.
RECEIVE_CHUNK: Final = 65536
#: Longest a closing connection may take (flush, close handshake) before it is aborted.
DEFAULT_CLOSE_TIMEOUT: Final = 5.0

# Queue item "kind" (second field): > 0 a droppable data frame (its seq); _CONTROL never
# dropped; the unsent tail of a frame partly written eagerly is _DATA_TAIL or _CONTROL_TAIL: it
# must be finished whatever happens, or the stream would be corrupt.
_CONTROL: Final = 0
_DATA_TAIL: Final = -1
_CONTROL_TAIL: Final = -2

_LINGER_ABORT: Final = struct.pack("ii", 1, 0)


class DeliverySink(Protocol):
    """A subscription whose frames may be dropped (drop-oldest): it hears about each drop."""

    def dropped(self, seq: int) -> None: ...

    def take_gap(self, seq: int) -> bytes | None:
        """The gap message to write before this subscription's frame *seq*, if one is due."""
        ...


_Item = tuple[bytes, int, float, DeliverySink | None]


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

    Public counters are read by the registry: ``frames_sent``, ``frames_dropped``,
    :attr:`queued_bytes`.
    """

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
        registry: SubscriberRegistry,
        latency: LatencyHistogram,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        self.id = ident
        self.peer = peer
        self.endpoint = endpoint
        self.connected_at = time.time()
        self.settings = settings
        self.policy: SlowPolicy = policy
        self.frames_sent = 0
        self.frames_dropped = 0
        self.slow_disconnected = False
        self.handler: Handler | None = None
        self._stream = stream
        self._sock = stream.socket
        self._fd = stream.socket.fileno()
        self._ws = ws
        self._registry = registry
        self._latency = latency
        self._close_timeout = close_timeout
        self._budget = settings.queue_bytes
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued = 0
        # Bytes the writer holds that the kernel has not taken yet.
        self._inflight = 0
        # Backfill bytes still queued: they do not count against the budget.
        self._allowance = 0
        self._writing = False
        self._batch_parts: list[bytes] = []
        self._batch_end = 0
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
    def queued_bytes(self) -> int:
        """Bytes accepted for this subscriber that the kernel has not taken yet."""
        return self._queued + self._inflight

    @property
    def idle(self) -> bool:
        """Nothing queued and no write in flight: the next bytes may be written eagerly."""
        return not self._queue and not self._writing

    @property
    def closing(self) -> bool:
        return self._closing or self._dead

    # -- the write path --------------------------------------------------------------------

    def send_data(
        self, data: bytes, seq: int, published: float, sink: DeliverySink | None = None
    ) -> None:
        """Deliver one pre-encoded data frame (``seq`` > 0). Never blocks, never raises.

        ``published`` (``perf_counter``) feeds the latency histogram; 0 means "do not sample"
        (backfill). ``sink`` is told when the frame is dropped (drop-oldest policy).
        """
        if self._closing:
            return
        if not self._queue and not self._writing:
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
                self._enqueue((data[n:], _DATA_TAIL, published, None), backfill=not published)
                return
        self._enqueue((data, seq, published, sink), backfill=not published)

    def send_control(self, payload: bytes) -> None:
        """Queue one text message built for this subscriber alone (never dropped)."""
        if not self._closing:
            self._send_raw(encode_frame(payload))

    def _send_raw(self, data: bytes) -> None:
        if not self._queue and not self._writing and not self._dead:
            try:
                n = os.write(self._fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                self._broken()
                return
            if n == len(data):
                return
            if n:
                self._enqueue((data[n:], _CONTROL_TAIL, 0.0, None), backfill=False)
                return
        self._enqueue((data, _CONTROL, 0.0, None), backfill=False)

    def _enqueue(self, item: _Item, *, backfill: bool) -> None:
        self._queue.append(item)
        size = len(item[0])
        self._queued += size
        if backfill:
            self._allowance += size
        elif self._queued + self._inflight > self._budget + self._allowance:
            self._over_budget()
        self._wake.set()

    def _over_budget(self) -> None:
        if self.policy == "disconnect":
            self._registry.slow_disconnects += 1
            self.slow_disconnected = True
            if self.handler is not None:
                for topic in self.handler.topics():
                    topic.slow_disconnects += 1
            log.info("subscriber %s (%s) too slow: disconnecting", self.id, self.peer)
            self.close(CLOSE_TOO_SLOW, "subscriber too slow", discard=True)
            return
        q = self._queue
        kept: list[_Item] = []
        limit = self._budget + self._allowance
        while q and self._queued + self._inflight > limit:
            item = q.popleft()
            data, kind, _, sink = item
            if kind > 0 and sink is not None:
                self._queued -= len(data)
                self.frames_dropped += 1
                sink.dropped(kind)
            else:
                kept.append(item)
        if kept:
            q.extendleft(reversed(kept))

    async def _writer(self) -> None:
        """Drain the queue into the socket until closed; then half-close and signal flushed."""
        sock = self._sock
        fd = self._fd
        drop_oldest = self.policy == "drop-oldest"
        latency = self._latency
        while True:
            if not self._queue:
                if self._closing:
                    break
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            items = self._queue
            self._queue = collections.deque()
            parts: list[bytes] = []
            sent = 0
            sampled = 0.0
            for data, kind, published, sink in items:
                if kind > 0 or kind == _DATA_TAIL:
                    if kind > 0 and drop_oldest and sink is not None:
                        g = sink.take_gap(kind)
                        if g is not None:
                            parts.append(encode_frame(g))
                    sent += 1
                    if published and not sampled:
                        sampled = published
                parts.append(data)
            buf = parts[0] if len(parts) == 1 else b"".join(parts)
            self._queued = 0
            self._inflight = len(buf)
            self._batch_parts = parts
            self._batch_end = len(buf)
            self._writing = True
            view = memoryview(buf)
            off = 0
            try:
                while off < self._batch_end:
                    try:
                        n = os.write(fd, view[off : self._batch_end])
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(sock)
                        continue
                    off += n
                    self._inflight = self._batch_end - off
                    if self._allowance:
                        self._allowance = max(0, self._allowance - n)
            except OSError:
                self._broken()
                return
            finally:
                view.release()
            self._writing = False
            self._inflight = 0
            self._batch_parts = []
            self.frames_sent += sent
            if sampled:
                latency.sample(sampled)
        # Everything, close frame included, is with the kernel: tell the peer we are done.
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._flushed.set()

    def _trim_inflight(self) -> None:
        """Cut the writer's batch after the frame it is in the middle of (close comes next)."""
        if not self._writing:
            return
        written = self._batch_end - self._inflight
        end = 0
        for part in self._batch_parts:
            end += len(part)
            if end > written:
                break
        if end < self._batch_end:
            self._batch_end = end
            self._inflight = end - written

    def _broken(self) -> None:
        # The peer is gone (reset, broken pipe): nothing more can be written.
        self._dead = True
        self._closing = True
        self._queue.clear()
        self._queued = 0
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
            q = self._queue
            tail = q[0] if q and q[0][1] < 0 else None
            q.clear()
            self._queued = 0
            if tail is not None:
                q.append(tail)
                self._queued = len(tail[0])
            self._allowance = 0
            self._trim_inflight()
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
                data = await self._stream.receive_some(RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                # The peer went away without (finishing) the close handshake.
                self._dead = True
                self._closing = True
                self._flushed.set()
                return
            ws.receive_data(data)
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
