"""A subscriber connection over TLS (``wss://``): every write goes through ``send_all``.

The plaintext :class:`~gateway.dataplane._connection.Connection` writes shared frame bytes
straight to the socket's file descriptor (the eager write, and the writer's own non-blocking
loop). Under TLS those bytes must be encrypted for each subscriber, so this subclass replaces
exactly the write side and nothing else:

- :meth:`send_data` and :meth:`_send_raw` only queue (the same byte budget, slow policies,
  drops and gap messages: all of that is the :class:`SendQueue`'s) and wake the writer;
- the writer takes the whole queue per wake-up as one buffer and hands it to
  ``SSLStream.send_all``; the reader reads through the same ``SSLStream`` (one sender and one
  receiver at a time is what trio's SSLStream supports).

The plaintext hot path is not touched: a plaintext connection never executes a line of this.
Batching matters more here than in plaintext: one TLS record per batch instead of per frame.
"""

from __future__ import annotations

import socket
from typing import Any

import trio

from gateway.dataplane._connection import Connection
from gateway.dataplane._sendqueue import DeliverySink, SendItem


class TlsConnection(Connection):
    """:class:`Connection` whose bytes go through *tls*, a ``trio.SSLStream`` over *stream*."""

    WRITES_THROUGH_TLS = True

    def __init__(self, *, tls: trio.SSLStream[trio.SocketStream] | None = None, **kw: Any) -> None:
        if tls is None:
            raise TypeError("TlsConnection needs tls")
        super().__init__(tls=tls, **kw)
        self._tls = tls

    def send_data(
        self, data: bytes, seq: int, published: float, sink: DeliverySink | None = None
    ) -> None:
        if self._closing:
            return
        if self._sq.push(SendItem(data, seq, published, sink)):
            self._too_slow()
        self._wake.set()

    def _send_raw(self, data: bytes) -> None:
        if self._sq.push(SendItem(data, None)):
            self._too_slow()
        self._wake.set()

    async def _writer(self) -> None:
        tls = self._tls
        q = self._sq
        latency = self._latency
        delay = self.write_delay
        next_batch = 0.0
        while True:
            # Backfill is pulled as the queue drains, as in the plaintext writer.
            if self._backfills and not self._closing and q.unsent < self.fill_target:
                self._refill()
            if not q.items:
                if self._closing:
                    break
                if self._can_pull():
                    await trio.lowlevel.checkpoint()
                    continue
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            if delay:
                # write_delay: at most one batch per `delay`, as in DelayedConnection.
                if not self._closing and (wait := next_batch - trio.current_time()) > 0:
                    await trio.sleep(wait)
                    continue
                next_batch = trio.current_time() + delay
            buf, frames, sampled = q.take_batch()
            try:
                while q.inflight > 0:
                    end = q.batch_end
                    start = end - q.inflight
                    # A whole-bytes slice is the object itself: no copy in the usual case.
                    await tls.send_all(buf[start:end])
                    self.writer_writes += 1
                    # A close may have trimmed the batch meanwhile (q.batch_end shrank): those
                    # bytes went out anyway, whole frames, so the stream is still sound.
                    q.wrote(min(end - start, q.inflight))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._broken()
                return
            q.batch_done()
            self.frames_sent += frames
            if sampled:
                latency.sample(sampled)
        # Everything, close frame included, is with the kernel: tell the peer we are done.
        # (No TLS close_notify: the WebSocket close handshake already ended the conversation.)
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._flushed.set()
