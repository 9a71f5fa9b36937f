"""A subscriber connection over TLS (``wss://``): every write goes through ``send_all``.

The plaintext :class:`~gateway.dataplane._connection.Connection` writes shared frame bytes
straight to the socket's file descriptor (the eager write, and the writer's own non-blocking
loop). Under TLS those bytes must be encrypted for each subscriber, so this subclass replaces
exactly the write side and nothing else:

- :meth:`send_data` and :meth:`_send_raw` only queue (the same byte budget, slow policies,
  drops and gap messages: all of that is the :class:`SendQueue`'s) and wake the writer;
- the writer (the base class's loop: backfill pulls, batches, close) hands each batch to
  ``SSLStream.send_all`` (:meth:`_send_batch`), and with a ``write_delay`` holds each batch
  that long after its first message (:meth:`_hold`); the reader reads through the same
  ``SSLStream`` (one sender and one receiver at a time is what trio's SSLStream supports).

The plaintext hot path is not touched: a plaintext connection never executes a line of this.
Batching matters more here than in plaintext: one TLS record per batch instead of per frame.
"""

from __future__ import annotations

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
        #: trio time the open batch's first message was queued (write_delay).
        self._opened = 0.0

    def send_data(
        self, data: bytes, seq: int, published: float, sink: DeliverySink | None = None
    ) -> None:
        if not self._closing:
            self._queue(SendItem(data, seq, published, sink))

    def _send_raw(self, data: bytes) -> None:
        self._queue(SendItem(data, None))

    def _queue(self, item: SendItem) -> None:
        q = self._sq
        if self.write_delay and not q.items:
            self._opened = trio.current_time()  # it opens a batch
        if q.push(item):
            self._too_slow()
        self._wake.set()

    async def _hold(self) -> bool:
        # write_delay: a batch opens with its first message and goes out ``delay`` later with
        # everything queued meanwhile (the rule of the plaintext connection's WriteTicker;
        # this one writes through its own SSLStream). Closing is never held.
        delay = self.write_delay
        if not delay or self._closing:
            return False
        due = self._opened + delay
        if trio.current_time() >= due:
            return False
        await trio.sleep_until(due)
        return True

    async def _send_batch(self, buf: bytes) -> bool:
        q = self._sq
        try:
            while q.inflight > 0:
                end = q.batch_end
                start = end - q.inflight
                # A whole-bytes slice is the object itself: no copy in the usual case.
                await self._tls.send_all(buf[start:end])
                self.writer_writes += 1
                # A close may have trimmed the batch meanwhile (q.batch_end shrank): those
                # bytes went out anyway, whole frames, so the stream is still sound.
                q.wrote(min(end - start, q.inflight))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._broken()
            return False
        return True
