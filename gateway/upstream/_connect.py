"""The connection boundary: an injectable connector, and an alternative one on trio-websocket.

The runner sees only :class:`UpstreamConnection` (``send_message``/``get_message``/``aclose``)
and one small error tree, in the style of trio-websocket's own::

    UpstreamError                      any failure of the upstream connection (the base)
    +-- UpstreamUnavailable            no connection: DNS, TCP, TLS, handshake failure or timeout
    +-- UpstreamRejected(status)       the server refused the WebSocket handshake (HTTP status)
    +-- UpstreamClosed(code, reason)   the open connection ended (close code, if any)

A connector raises the first two on entry, a connection raises :class:`UpstreamClosed` from
``send_message``/``get_message``. Each connector translates its library's exceptions (OSError,
``trio.TooSlowError``, TLS errors, trio-websocket's ``HandshakeError``/``ConnectionRejected``/
``ConnectionClosed``, the lean client's protocol violations) into this tree at the boundary, and
they go no further. Their messages are written from fixed texts, status and close codes and
errno-level texts only, never from anything that could carry the auth message.

Tests inject a connector over memory channels and run under ``MockClock``. The default connector
is the lean client in ``_lean.py``; the trio-websocket one here is kept as an alternative
(:func:`open_trio_websocket_connector`).

Why the trio-websocket connector hosts reader tasks in its own shielded nursery: a trio-websocket
connection needs its reader task alive to complete the close handshake. If readers lived inside
the fixture task, cancelling the fixture (removal, shutdown) would kill the reader first and every
close would end in a timeout. Readers therefore run in a nursery that the caller's cancellation
does not reach; each connection closes itself (bounded by ``disconnect_timeout``) and the nursery
is cancelled when the connector's context exits.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Final, Protocol

import trio
import trio_websocket

logger = logging.getLogger("gateway.upstream")

# Read promptly, but let bursts (a large backfill) queue instead of stalling pings.
MESSAGE_QUEUE_SIZE: Final = 256
# Bytes asked of the socket per read (trio-websocket's default is 4 KiB, less than one 3 KB
# tracking frame plus the next one's head): a connection that fell behind catches up with one
# read and one wsproto pass per many frames instead of per frame.
RECEIVE_BUFFER_SIZE: Final = 64 * 1024
DISCONNECT_TIMEOUT: Final = 2.0


class UpstreamError(Exception):
    """Base of the upstream connection errors; never raised itself."""


class UpstreamClosed(UpstreamError):
    """The upstream connection is closed. ``code`` is the WebSocket close code, if any."""

    def __init__(self, code: int | None, reason: str | None = None) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class UpstreamRejected(UpstreamError):
    """The server refused the WebSocket handshake with this HTTP status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class UpstreamUnavailable(UpstreamError):
    """No connection: DNS, TCP, TLS or handshake failure, or handshake timeout.

    The message is written here from the failure's type and errno-level text only.
    """


class UpstreamConnection(Protocol):
    async def send_message(self, message: str) -> None:
        """Send one text message. Raises :class:`UpstreamClosed`."""

    async def get_message(self) -> str | bytes:
        """The next message. Raises :class:`UpstreamClosed` once the connection is closed.

        Must be cancel-safe (a cancelled call loses no message): the runner's stall watchdog
        cancels it to re-arm and then calls it again.
        """

    async def aclose(self) -> None:
        """Close now (idempotent). Pending messages are discarded."""


class Connector(Protocol):
    def __call__(
        self, url: str, *, headers: Sequence[tuple[bytes, bytes]], connect_timeout: float
    ) -> AbstractAsyncContextManager[UpstreamConnection]:
        """Open a connection for the body of the context; close it (bounded) on exit.

        Raises :class:`UpstreamRejected` or :class:`UpstreamUnavailable` on entry.
        """


class _Connection:
    """A trio-websocket connection behind the :class:`UpstreamConnection` protocol."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws

    async def send_message(self, message: str) -> None:
        try:
            await self._ws.send_message(message)
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from None

    async def get_message(self) -> str | bytes:
        try:
            return await self._ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from None

    async def aclose(self) -> None:
        await self._ws.aclose()


def _closed(exc: trio_websocket.ConnectionClosed) -> UpstreamClosed:
    reason = exc.reason
    return UpstreamClosed(None if reason is None else reason.code, getattr(reason, "reason", None))


class _ReaderHost:
    """What :func:`trio_websocket.connect_websocket_url` needs of a nursery (``start_soon``).

    The reader task raises ``ConnectionRejected`` when the handshake is refused; in a shared
    nursery that would take every connection down. The guard keeps the error, and cancels the
    connect call that is waiting for a handshake which will never complete. The host also
    remembers the connection (the reader is its bound method), so a connect that fails or is
    cancelled half-way can still close its socket.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.error: BaseException | None = None
        self.connect_scope = trio.CancelScope()
        self._conn: trio_websocket.WebSocketConnection | None = None

    def start_soon(self, fn: Callable[[], Awaitable[object]], *args: object) -> None:
        conn = getattr(fn, "__self__", None)
        if isinstance(conn, trio_websocket.WebSocketConnection):
            self._conn = conn
        self._nursery.start_soon(self._guard, fn)

    async def _guard(self, fn: Callable[[], Awaitable[object]]) -> None:
        try:
            await fn()
        except Exception as exc:
            self.error = exc
            self.connect_scope.cancel()
            await self.abandon()

    async def abandon(self) -> None:
        """Close a connection that never reached the caller (idempotent, immediate).

        There is no open WebSocket to close politely, so the socket is closed at once.
        """
        if self._conn is not None:
            await trio.aclose_forcefully(self._conn)


def _unavailable(exc: BaseException) -> UpstreamUnavailable:
    if isinstance(exc, OSError) and exc.strerror:
        return UpstreamUnavailable(f"connection failed: {exc.strerror}")
    if isinstance(exc, trio_websocket.ConnectionTimeout | trio.TooSlowError):
        return UpstreamUnavailable("handshake timed out")
    return UpstreamUnavailable(f"connection failed: {type(exc).__name__}")


class WebSocketConnector:
    """A :class:`Connector` on trio-websocket; built by :func:`open_trio_websocket_connector`."""

    def __init__(self, readers: trio.Nursery, *, disconnect_timeout: float) -> None:
        self._readers = readers
        self._disconnect_timeout = disconnect_timeout

    @asynccontextmanager
    async def __call__(
        self, url: str, *, headers: Sequence[tuple[bytes, bytes]], connect_timeout: float
    ) -> AsyncIterator[UpstreamConnection]:
        host = _ReaderHost(self._readers)
        ws: trio_websocket.WebSocketConnection | None = None
        try:
            with host.connect_scope, trio.fail_after(connect_timeout):
                ws = await trio_websocket.connect_websocket_url(
                    host,  # type: ignore[arg-type]  # duck-typed nursery, see _ReaderHost
                    url,
                    extra_headers=list(headers),
                    message_queue_size=MESSAGE_QUEUE_SIZE,
                    receive_buffer_size=RECEIVE_BUFFER_SIZE,
                )
        except (OSError, trio.TooSlowError, trio_websocket.HandshakeError) as exc:
            await host.abandon()
            raise _unavailable(exc) from None
        except BaseException:  # cancelled while connecting (removal, shutdown)
            await host.abandon()
            raise
        if ws is None:  # the guard cancelled the connect: the reader task failed
            err = host.error
            if isinstance(err, trio_websocket.ConnectionRejected):
                raise UpstreamRejected(err.status_code) from None
            raise _unavailable(err if err is not None else Exception()) from None
        try:
            yield _Connection(ws)
        finally:
            # Shielded so that removal and shutdown still send a close frame and wait (briefly)
            # for the reply; on timeout aclose() closes the TCP stream, which ends the reader.
            with trio.CancelScope(shield=True), trio.move_on_after(self._disconnect_timeout):
                await ws.aclose()


async def _host_readers(
    *,
    task_status: trio.TaskStatus[tuple[trio.Nursery, trio.CancelScope]] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.CancelScope(shield=True) as scope:
        async with trio.open_nursery() as nursery:
            task_status.started((nursery, scope))
            await trio.sleep_forever()


@asynccontextmanager
async def open_trio_websocket_connector(
    *, disconnect_timeout: float = DISCONNECT_TIMEOUT
) -> AsyncIterator[WebSocketConnector]:
    """A :class:`WebSocketConnector` usable inside the ``async with`` body.

    On exit the reader nursery is cancelled: connections still open are torn down. Close them
    first (leave their own contexts) for a clean close handshake.
    """
    async with trio.open_nursery() as nursery:
        readers, scope = await nursery.start(_host_readers)
        try:
            yield WebSocketConnector(readers, disconnect_timeout=disconnect_timeout)
        finally:
            scope.cancel()
