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
and closes with 4008, counted through the ``monitor``; ``drop-oldest`` drops the oldest queued
data frames and the subscription sends a ``gap`` message before its next frame. Control
messages are never dropped, but they count: a backlog of them past the budget is closed with
4008 under either policy.

Backfill is never copied into the queue at once: a :class:`BackfillSource` (see
:mod:`gateway.dataplane._backfill`) is asked for more each time the writer has drained the
queue below :attr:`Connection.fill_target`.

Hostile peers: the reader yields to the scheduler every :data:`EVENTS_PER_TURN` client frames,
and a peer sending more than ``max_client_frames_per_second`` (after a burst of
``client_frame_burst``) is closed with 1008. Only a pong that answers our outstanding ping
(same random payload) counts for the ping timeout.

Closing never waits forever: :meth:`Connection.close` puts a deadline of ``close_timeout`` on
the whole connection; after it the socket is aborted (RST) whatever the peer does.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any, Final, Protocol

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
from gateway.hub import Frame, LatencyHistogram, Topic
from gateway.wire import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_INVALID_DATA,
    CLOSE_POLICY_VIOLATION,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    CLOSE_TOO_SLOW,
    encode_frame,
)

#: Bytes asked of the kernel per read.
RECEIVE_CHUNK: Final = 65536
#: Client frames handled before the reader yields to the scheduler: one read of 64 KiB can
#: hold 10,000 empty frames, and handling them in one go would stall every other subscriber.
EVENTS_PER_TURN: Final = 32
#: Most bytes of backfill queued at once (less with a small ``queue_bytes``: half of it).
BACKFILL_CHUNK: Final = 256 * 1024
#: Close reasons for the protocol violations wsproto finds (its own texts are not for peers).
_VIOLATION_REASONS: Final = {
    CLOSE_PROTOCOL_ERROR: "protocol error",
    CLOSE_INVALID_DATA: "invalid UTF-8",
}
#: A :class:`WriteTicker`'s wake-up also writes the batches falling due within this share of
#: the delay: they were opened within that much of each other (and lose at most that much of
#: their window) and share one wake-up of the ticker instead of one each.
COALESCE: Final = 0.125
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


class ConnectionMonitor(Protocol):
    """Counts (and logs, rate-limited) what a peer made its connection do: the registry.

    Each method is called once per connection at most, just before the close frame is queued.
    """

    def count_slow_disconnect(self, conn: Connection) -> None:
        """Too slow: its queue passed its budget (closed with 4008)."""
        ...

    def count_rate_limited(self, conn: Connection) -> None:
        """Sent frames faster than ``max_client_frames_per_second`` (closed with 1008)."""
        ...

    def count_ping_timeout(self, conn: Connection) -> None:
        """No pong to our ping within ``ping_timeout`` (closed with 1011)."""
        ...


class BackfillSource(Protocol):
    """A backfill the connection pulls from as it drains (:mod:`gateway.dataplane._backfill`)."""

    #: True while it has nothing to send until it calls :meth:`Connection.backfill_ready`
    #: (frames being read from disk): the writer then sleeps instead of pulling again.
    waiting: bool

    def pull(self, target: int) -> bool:
        """Send more (at least one frame, unless waiting) until ``queued_bytes`` reaches
        *target*, or a few hundred frames; True when finished (the connection forgets it)."""
        ...


class Tickable(Protocol):
    """What a :class:`WriteTicker` writes when its batch is due: a delayed connection or a
    group."""

    def flush_tick(self) -> None: ...


class SharedBatch(Protocol):
    """The batch group a :class:`DelayedConnection` writes with (see
    :mod:`gateway.dataplane._batchgroup`): its subscriptions hand each frame to the group,
    once per frame (``last`` is the frame added last), instead of queueing it."""

    last: Frame | None

    def add(self, frame: Frame, topic: Topic) -> None: ...

    def leave(self, conn: DelayedConnection) -> None: ...


class Connection:
    """A WebSocket subscriber after the handshake. Created and run by the server.

    Public counters are read by the registry: ``frames_sent``, :attr:`frames_dropped`,
    ``frames_conflated``, :attr:`queued_bytes`. The *monitor* (the registry) counts slow
    disconnects (4008, both policies), rate-limit closes (1008) and ping timeouts (1011).

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
        monitor: ConnectionMonitor,
        latency: LatencyHistogram,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        tls: trio.SSLStream[trio.SocketStream] | None = None,
        write_delay: float = 0.0,
        deflate: bool = False,
    ) -> None:
        self.id = ident
        self.peer = peer
        self.endpoint = endpoint
        self.connected_at = time.time()
        self.settings = settings
        self.frames_sent = 0
        #: Bytes written to the socket: frames, replies, the close frame (WebSocket framing
        #: included, before TLS); a queued batch counts when its write completes.
        self.bytes_sent = 0
        #: Backfill frames that fell out of the history before they could be sent (gaps).
        self.frames_skipped = 0
        #: Frames of ``max_rate`` subscriptions replaced by a newer one before they went out.
        self.frames_conflated = 0
        self.slow_disconnected = False
        self.rate_limited = False
        self.handler: Handler | None = None
        if tls is not None and not self.WRITES_THROUGH_TLS:
            raise TypeError(f"{type(self).__name__} cannot write through TLS")
        self._stream = stream
        # What the reader reads: the socket, or the TLS stream over it (see _tlsconn).
        self._rx: trio.abc.ReceiveStream = stream if tls is None else tls
        self._sock = stream.socket
        #: The socket's file descriptor: the eager path, the writer, the ticker and a batch
        #: group write to it directly.
        self.fd = stream.socket.fileno()
        self._ws = ws
        self._monitor = monitor
        self._latency = latency
        self._close_timeout = close_timeout
        self._sq = SendQueue(settings.queue_bytes, policy)
        #: Backfill is queued up to this many bytes at a time (see BackfillSource).
        self.fill_target = min(settings.queue_bytes // 2, BACKFILL_CHUNK)
        self._backfills: list[BackfillSource] = []
        self._wake = trio.Event()
        self._pong = trio.Event()
        self._ping_payload = b""
        self._closing = False
        self._dead = False
        #: wsproto's parser stopped at a protocol violation: it parses nothing more (not even
        #: the peer's close frame), so what the peer sends after it is read and dropped instead
        #: of piling up in wsproto's buffer until ``close_timeout``.
        self._unparsed = False
        self._flushed = trio.Event()
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        #: Seconds the writer holds frames to write them together (:class:`DelayedConnection`);
        #: 0: none (the writer writes as soon as it is woken).
        self.write_delay = write_delay
        #: Write system calls the writer task made (the eager writes are not counted: the hot
        #: path stays as it is). For a :class:`DelayedConnection`, every write of a frame.
        self.writer_writes = 0
        #: A batch started by a :class:`WriteTicker` that the writer must finish.
        self._partial: tuple[bytes, int, float] | None = None
        #: permessage-deflate was negotiated: data frames go compressed (shared encoding).
        self.deflate = deflate
        #: The batch group this connection is written with (only a :class:`DelayedConnection`
        #: joins one): its subscriptions hand frames to the group instead of :meth:`send_data`.
        self.group: SharedBatch | None = None

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.peer} {self.endpoint}>"

    # -- views -----------------------------------------------------------------------------

    @property
    def policy(self) -> SlowPolicy:
        return self._sq.policy

    @property
    def frames_dropped(self) -> int:
        """Data frames dropped under ``drop-oldest`` (backfill frames skipped included)."""
        return self._sq.dropped + self.frames_skipped

    @property
    def latency(self) -> LatencyHistogram:
        """Where this connection's deliveries are sampled (the hub's histogram)."""
        return self._latency

    @property
    def budget(self) -> int:
        """Bytes this connection may hold unsent (``queue_bytes``)."""
        return self._sq.budget

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
        (backfill). ``sink`` is told when the frame is dropped (drop-oldest policy).
        """
        if self._closing:
            return
        q = self._sq
        # The hot path: inline on purpose, no Python call on it but the latency sampler.
        if not q.items and not q.writing:
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                self._broken()
                return
            if n == len(data):
                self.frames_sent += 1
                self.bytes_sent += n
                if published:
                    self._latency.sample(published)
                return
            if n:
                # A started frame must be finished: its tail can never be dropped.
                self.bytes_sent += n  # the head; the tail counts with its batch
                item = SendItem(data[n:], seq, published, None, True)
            else:
                item = SendItem(data, seq, published, sink)
        else:
            item = SendItem(data, seq, published, sink)
        if q.push(item):
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
                n = os.write(self.fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                self._broken()
                return
            self.bytes_sent += n
            if n == len(data):
                return
            item = SendItem(data[n:], None, 0.0, None, True) if n else SendItem(data, None)
        else:
            item = SendItem(data, None)
        if q.push(item):
            self._too_slow()
        self._wake.set()

    def too_slow(self) -> None:
        """Close as too slow (4008), discarding what is queued; counted once."""
        self._too_slow()

    def _too_slow(self) -> None:
        if self._closing:
            return
        self.slow_disconnected = True
        self._monitor.count_slow_disconnect(self)
        self.close(CLOSE_TOO_SLOW, "subscriber too slow", discard=True)

    # -- backfill ----------------------------------------------------------------------------

    def add_backfill(self, source: BackfillSource) -> None:
        """Start pulling from *source*: what fits now at once, the rest as the socket drains."""
        if self._closing:
            return
        self._backfills.append(source)
        self._refill()
        self._wake.set()

    def remove_backfill(self, source: BackfillSource) -> None:
        if source in self._backfills:
            self._backfills.remove(source)

    def _can_pull(self) -> bool:
        """A backfill has frames to pull now (not all of them waiting for a disk read)."""
        return any(not source.waiting for source in self._backfills)

    def backfill_ready(self) -> None:
        """A waiting backfill has frames again: pull from it when the queue allows."""
        self._wake.set()

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> bool:
        """Run *fn* in this connection's nursery (cancelled when the connection ends); False
        when it is closing or not serving."""
        if self._nursery is None or self.closing:
            return False
        self._nursery.start_soon(fn, *args)
        return True

    def _refill(self) -> None:
        target = self.fill_target
        for source in tuple(self._backfills):
            if self._closing or self._sq.unsent >= target:
                return
            if source.pull(target):
                self.remove_backfill(source)

    async def _writer(self) -> None:
        """Drain the queue into the socket until closed; then half-close and signal flushed."""
        q = self._sq
        while await self._await_work():
            partial = self._partial
            if partial is not None:
                # A batch a WriteTicker started and the kernel did not take whole.
                self._partial = None
                if not await self._write_out(*partial):
                    return
                self._drained()
                continue
            if await self._hold():
                continue
            if not await self._write_out(*q.take_batch()):
                return
            self._drained()
        # Everything, close frame included, is with the kernel: tell the peer we are done.
        # (Under TLS no close_notify: the WebSocket close handshake already ended it.)
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._flushed.set()

    async def _await_work(self) -> bool:
        """Wait for something to write (pulling backfill as the queue drains); False once the
        connection is closing and everything queued is written."""
        q = self._sq
        while self._partial is None:
            if self._backfills and not self._closing and q.unsent < self.fill_target:
                self._refill()
            if q.items:
                return True
            if self._closing:
                return False
            if self._can_pull():
                # The kernel took all of the backfill pulled: let others run, pull more.
                await trio.lowlevel.checkpoint()
                continue
            await self._wake.wait()
            self._wake = trio.Event()
        return True

    async def _hold(self) -> bool:
        """True to let the queue fill a while longer before the next batch (TLS write_delay)."""
        return False

    def _drained(self) -> None:
        """The writer wrote a batch out whole (a hook for :class:`DelayedConnection`)."""

    async def _write_out(self, buf: bytes, frames: int, sampled: float) -> bool:
        """Finish the in-flight batch *buf* (taken from the queue); False if the peer is gone."""
        if not await self._send_batch(buf):
            return False
        self._sq.batch_done()
        self.frames_sent += frames
        self.bytes_sent += len(buf)
        if sampled:
            self._latency.sample(sampled)
        return True

    async def _send_batch(self, buf: bytes) -> bool:
        """Write the in-flight batch *buf* to the socket; False if the peer is gone."""
        q = self._sq
        fd = self.fd
        view = memoryview(buf)
        try:
            # q.batch_end shrinks when a close trims the batch while we wait.
            while q.inflight:
                end = q.batch_end
                try:
                    n = os.write(fd, view[end - q.inflight : end])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self._sock)
                    continue
                self.writer_writes += 1
                q.wrote(n)
        except OSError:
            self._broken()
            return False
        finally:
            view.release()
        return True

    def _broken(self) -> None:
        # The peer is gone (reset, broken pipe): nothing more can be written.
        self._dead = True
        self._closing = True
        self._sq.clear()
        self._flushed.set()
        self._scope.cancel()

    def leave_group(self) -> None:
        """Write alone from now on (only a :class:`DelayedConnection` is ever in a group)."""

    def close(self, code: int, reason: str, *, discard: bool = False) -> None:
        """Start closing: queue a close frame after what is queued (or instead: *discard*).

        Returns at once. The connection ends when the peer answers or at the latest
        ``close_timeout`` seconds from now (then the socket is aborted).
        """
        if self._closing:
            return
        # Closing first: nothing queued from here on can end in a second verdict or close.
        self._closing = True
        self._backfills.clear()
        if discard:
            self._sq.discard()
        frame = self._ws_send(CloseConnection(code=code, reason=reason))
        if frame:
            self._send_close(frame)
        self._scope.deadline = min(self._scope.deadline, trio.current_time() + self._close_timeout)
        self._wake.set()

    def _send_close(self, frame: bytes) -> None:
        # After whatever must be finished, whatever the budget: the close frame is the last.
        q = self._sq
        if self._dead:
            return
        tail = False
        if not q.items and not q.writing:
            try:
                n = os.write(self.fd, frame)
            except BlockingIOError:
                n = 0
            except OSError:
                self._broken()
                return
            self.bytes_sent += n
            if n == len(frame):
                return
            if n:
                frame = frame[n:]
                tail = True
        q.push_close(SendItem(frame, None, 0.0, None, tail))

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
                    self._nursery = nursery
                    nursery.start_soon(self._writer)
                    nursery.start_soon(self._pinger)
                    handler.start(nursery)
                    await self._reader(handler)
                    await self._flushed.wait()
                    nursery.cancel_scope.cancel()
            aborted = self._scope.cancelled_caught and not self._dead
        finally:
            self._nursery = None
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
        settings = self.settings
        max_bytes = settings.max_message_bytes
        # A token bucket of client frames: refilled at `rate` per second up to `burst`.
        rate = settings.max_client_frames_per_second
        burst = float(settings.client_frame_burst)
        tokens = burst
        last = trio.current_time()
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
                self.leave_group()
                self._dead = True
                self._closing = True
                self._flushed.set()
                return
            if self._unparsed:
                continue
            now = trio.current_time()
            tokens = min(burst, tokens + (now - last) * rate)
            last = now
            # bytes(): TLS reads are typed bytes | bytearray; for bytes it is the same object.
            ws.receive_data(bytes(data))
            handled = 0
            for event in ws.events():
                tokens -= 1.0
                if tokens < 0.0:
                    # Stop reading: what this peer sends from now on is not even parsed.
                    self._rate_limit()
                    return
                handled += 1
                if handled == EVENTS_PER_TURN:
                    handled = 0
                    await trio.lowlevel.checkpoint()
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
                        self.close(CLOSE_TOO_BIG, self._too_big_reason())
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

    def _too_big_reason(self) -> str:
        """The close reason of a message over ``max_message_bytes`` (1009), compressed or not."""
        return f"message larger than {self.settings.max_message_bytes} bytes"

    def _rate_limit(self) -> None:
        if self._closing:
            return
        self.rate_limited = True
        self._monitor.count_rate_limited(self)
        rate = self.settings.max_client_frames_per_second
        self.close(CLOSE_POLICY_VIOLATION, f"too many messages: over {rate:g} per second")

    def _on_control(self, event: Event) -> None:
        if isinstance(event, Ping):
            if not self._closing:
                self._send_raw(self._ws_send(event.response()))
        elif isinstance(event, Pong):
            # Only the answer to our outstanding ping: unsolicited pongs prove nothing.
            if self._ping_payload and event.payload == self._ping_payload:
                self._pong.set()
        elif isinstance(event, CloseConnection):
            if self._ws.state is ConnectionState.REMOTE_CLOSING:
                # The peer closes: answer with the same code, then the reader ends.
                frame = self._ws_send(event.response())
                if not self._closing:
                    # Out of any batch group first: nothing may follow the close frame.
                    self.leave_group()
                    self._closing = True
                    self._backfills.clear()
                    if frame:
                        self._send_close(frame)
                self._scope.deadline = min(
                    self._scope.deadline, trio.current_time() + self._close_timeout
                )
                self._wake.set()
            elif self._ws.state is ConnectionState.OPEN:
                # wsproto found a protocol violation (1002, or 1007 for invalid UTF-8, or 1009
                # from the inflate limit of SharedDeflate) and reports it as a close; its
                # reason is a Python exception text: not for peers.
                self._unparsed = True
                if event.code == CLOSE_TOO_BIG:
                    reason = self._too_big_reason()
                else:
                    reason = _VIOLATION_REASONS.get(event.code, "protocol error")
                self.close(event.code, reason)

    async def _pinger(self) -> None:
        interval = self.settings.ping_interval
        timeout = self.settings.ping_timeout
        while True:
            await trio.sleep(interval)
            if self._closing:
                return
            # Random: a peer cannot answer a ping it has not read.
            payload = os.urandom(8)
            self._ping_payload = payload
            self._pong = trio.Event()
            ping = self._ws_send(Ping(payload=payload))
            if not ping:
                return
            self._send_raw(ping)
            with trio.move_on_after(timeout):
                await self._pong.wait()
                continue
            if self.closing:  # closed meanwhile (slow, drained): not a ping timeout
                return
            self._monitor.count_ping_timeout(self)
            self.close(CLOSE_INTERNAL_ERROR, "ping timeout", discard=True)
            return

    async def run_heartbeats(self, interval: float, make: Callable[[], bytes]) -> None:
        """Send ``make()`` every *interval* seconds until the connection closes."""
        while not self._closing:
            await trio.sleep(interval)
            self.send_control(make())


class WriteTicker:
    """Writes the queues of every :class:`DelayedConnection` of one ``write_delay``, and its
    batch groups, each when its batch is due: one task for all of them.

    A batch opens with its first frame (or control message) and is written ``interval``
    later with whatever came meanwhile: no frame waits longer than the delay (plus the
    timer's lateness, under a millisecond), and a batch holds every frame of its window, one
    more on average than a clock ticking every ``interval`` would give it (at 400 frames a
    second and 5 ms, 2.75 frames a write instead of 2.15: docs/performance.md). The same rule
    as Centrifugo's ``write_delay``. All batches of a ticker wait the same time, so they fall
    due in the order they opened: a deque, no heap.

    A wake-up of this task writes every batch due by then and those due within
    :data:`COALESCE` of the interval after (batches opened close together share one
    wake-up), each subscriber's whole queue with one ``os.write`` from here: no task of the
    subscriber's is woken (in trio a wake-up costs about as much as the system call saved).
    ``ticks`` counts the wake-ups that wrote. ``groups`` holds the batch groups of this delay
    by their key (:mod:`gateway.dataplane._batchgroup`).
    """

    def __init__(self, interval: float) -> None:
        if not interval > 0:
            raise ValueError("a WriteTicker needs an interval > 0")
        self.interval = interval
        self.ticks = 0
        self.groups: dict[Hashable, SharedBatch] = {}
        self._due: deque[tuple[float, Tickable]] = deque()
        self._wake = trio.Event()

    def schedule(self, item: Tickable) -> None:
        """Write *item* ``interval`` from now (called once per batch, at its first frame, by
        the connection or group)."""
        due = self._due
        if not due:
            self._wake.set()
        due.append((trio.current_time() + self.interval, item))

    async def run(self) -> None:
        """Write batches as they fall due until cancelled (the server runs one per delay in
        use)."""
        due = self._due
        early = self.interval * COALESCE
        while True:
            if not due:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            await trio.sleep_until(due[0][0])
            # Batches scheduled by the writes below fall due a whole interval later.
            horizon = trio.current_time() + early
            self.ticks += 1
            while due and due[0][0] <= horizon:
                due.popleft()[1].flush_tick()


class DelayedConnection(Connection):
    """A plaintext :class:`Connection` with a ``write_delay``: no eager write.

    Every frame and control message is queued (same budget and slow policies); the first one
    queued opens a batch on its :class:`WriteTicker`, which writes the whole queue with one
    system call ``write_delay`` later. Fewer system calls per delivery for up to
    ``write_delay`` of added latency. The writer task only finishes a batch the kernel did not
    take whole, streams backfill and writes the close (closing is never delayed). The plain
    :class:`Connection` (``write_delay`` 0) is untouched by this.

    Each time its queue is written out whole, :attr:`on_idle` (set by the endpoint's handler)
    may put it in a batch group: then nothing is queued here, the group writes the same bytes
    to all its members (:meth:`write_shared`), until anything only this connection must see
    (a control message, a close, a write the kernel did not take whole) makes it
    :meth:`leave_group` and write alone again, in order.
    """

    def __init__(self, *, ticker: WriteTicker, **kw: Any) -> None:
        super().__init__(write_delay=ticker.interval, **kw)
        self.ticker = ticker
        self._scheduled = False
        #: Called when the queue was written out whole and nothing else is pending: the
        #: handler may then put this connection in a batch group.
        self.on_idle: Callable[[], None] | None = None

    def send_data(
        self, data: bytes, seq: int, published: float, sink: DeliverySink | None = None
    ) -> None:
        if self._closing:
            return
        q = self._sq
        if q.push(SendItem(data, seq, published, sink)):
            self._too_slow()
            return
        if not self._scheduled and not q.writing:
            self._scheduled = True
            self.ticker.schedule(self)

    def _send_raw(self, data: bytes) -> None:
        if self._dead:
            return
        if self.group is not None:
            # A message for this connection alone: after the group's pending frames.
            self.group.leave(self)
        q = self._sq
        if q.push(SendItem(data, None)):
            self._too_slow()
            return
        if not self._scheduled and not q.writing:
            self._scheduled = True
            self.ticker.schedule(self)

    def leave_group(self) -> None:
        """Write alone from now on: the group's frames not yet written to this connection are
        queued here first (:meth:`take_pending`)."""
        if self.group is not None:
            self.group.leave(self)

    def take_pending(self, pending: list[tuple[Frame, bytes, DeliverySink | None]]) -> None:
        """Leaving a group: queue the frames the group has not written to this connection yet
        (each as its bytes, with the subscription that hears about a drop), as if they had
        been queued here one by one: the budget and slow policy apply."""
        q = self._sq
        for frame, data, sink in pending:
            if q.push(SendItem(data, frame.seq, frame.published, sink)):
                self._too_slow()
                return
        if q.items and not self._scheduled and not q.writing:
            self._scheduled = True
            self.ticker.schedule(self)

    def write_shared(self, data: bytes, parts: list[bytes], frames: int, sampled: float) -> bool:
        """Write *data* (the joined *parts*, *frames* data frames, the first published at
        *sampled*) for the group; True if the kernel took it whole. The group does the same
        inline for most members (:meth:`shared_short` and :meth:`shared_failed` then)."""
        try:
            n = os.write(self.fd, data)
        except BlockingIOError:
            n = 0
        except OSError:
            self.shared_failed()
            return False
        self.writer_writes += 1
        if n == len(data):
            self.frames_sent += frames
            self.bytes_sent += n
            if sampled:
                self._latency.sample(sampled)
            return True
        self.shared_short(data, parts, frames, sampled, n)
        return False

    def shared_failed(self) -> None:
        """A group's write failed: the peer is gone."""
        self._broken()

    def shared_short(
        self, data: bytes, parts: list[bytes], frames: int, sampled: float, n: int
    ) -> None:
        """The kernel took only *n* bytes of a group's *data*: leave the group; the writer
        finishes the rest as the socket drains."""
        self.leave_group()
        self._sq.adopt_batch(data, parts, n)
        self._partial = (data, frames, sampled)
        self._wake.set()

    def close(self, code: int, reason: str, *, discard: bool = False) -> None:
        self.leave_group()
        super().close(code, reason, discard=discard)

    def _broken(self) -> None:
        self.leave_group()
        super()._broken()

    def flush_tick(self) -> None:
        """The ticker's turn: write the whole queue with one ``os.write``."""
        self._scheduled = False
        q = self._sq
        if self._closing or q.writing or not q.items:
            # Closing (the writer drains at once), or the writer is mid-batch (it takes
            # what was queued meanwhile when done).
            return
        buf, frames, sampled = q.take_batch()
        try:
            n = os.write(self.fd, buf)
        except BlockingIOError:
            n = 0
        except OSError:
            self._broken()
            return
        self.writer_writes += 1
        q.wrote(n)
        if q.inflight:
            # The kernel did not take it all: the writer finishes it as the socket drains.
            self._partial = (buf, frames, sampled)
            self._wake.set()
            return
        q.batch_done()
        self.frames_sent += frames
        self.bytes_sent += len(buf)
        if sampled:
            self._latency.sample(sampled)
        if self._backfills:
            self._wake.set()
        else:
            self._drained()

    def _drained(self) -> None:
        # Everything written, nothing else to do: the handler may put this in a batch group.
        if (
            self.on_idle is not None
            and self._sq.idle
            and not self._backfills
            and self._partial is None
            and not self._closing
        ):
            self.on_idle()
