"""The asyncio adapter (``websockets``): the core's connections, timers and queues on asyncio.

```python
async with AsyncioClient("ws://127.0.0.1:8765/v1/stream", token=t) as c:
    async for event in c.subscribe("tracking", "F1", backfill=0):
        ...
```
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from ._backoff import Backoff
from ._core import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_MISSES,
    DEFAULT_MAX_QUEUE,
    Core,
    Counters,
    ProtocolError,
)
from ._events import ConnectionState, Event
from ._options import DEFAULT_CONNECT_TIMEOUT, ConnectOptions, TokenIn


class AsyncioSubscription:
    """As :class:`dde_gateway_client.Subscription`, on asyncio."""

    def __init__(self, client: AsyncioClient, stream: int) -> None:
        self._client = client
        self.id = stream

    def __aiter__(self) -> AsyncioSubscription:
        return self

    async def __anext__(self) -> Event:
        core = self._client.core
        while True:
            event = core.pop(self.id)
            if event is not None:
                self._client._notify()
                return event
            if core.stream_done(self.id):
                core.close_stream(self.id)  # forget it (nothing is left to unsubscribe)
                raise StopAsyncIteration
            await self._client._changed.wait()

    def close(self) -> None:
        self._client.core.close_stream(self.id)
        self._client._notify()


class AsyncioClient:
    """A gateway client on asyncio; the same options and semantics as the trio ``Client``."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        token: str | None = None,
        token_in: TokenIn = "header",
        ssl_context: ssl.SSLContext | None = None,
        ca_file: str | Path | None = None,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        heartbeat_misses: int = DEFAULT_HEARTBEAT_MISSES,
        max_queue: int = DEFAULT_MAX_QUEUE,
        backoff: Backoff | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        on_message: Callable[[str], None] | None = None,
    ) -> None:
        self.core = Core(
            [urls] if isinstance(urls, str) else urls,
            backoff=backoff,
            heartbeat_interval=heartbeat_interval,
            heartbeat_misses=heartbeat_misses,
            max_queue=max_queue,
        )
        self.options = ConnectOptions.build(
            token=token,
            token_in=token_in,
            ssl_context=ssl_context,
            ca_file=ca_file,
            connect_timeout=connect_timeout,
        )
        self.on_message = on_message
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"AsyncioClient(urls={self.core.urls!r}, state={self.state!r})"

    @property
    def state(self) -> ConnectionState:
        return self.core.state

    @property
    def counters(self) -> Counters:
        return self.core.counters

    async def __aenter__(self) -> AsyncioClient:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def subscribe(
        self, feed: str, fixture: str, *, backfill: int | None = 0, max_rate: float | None = None
    ) -> AsyncioSubscription:
        return self.subscribe_many([(feed, fixture)], backfill=backfill, max_rate=max_rate)

    def subscribe_many(
        self,
        topics: Iterable[tuple[str, str]],
        *,
        backfill: int | None = 0,
        max_rate: float | None = None,
    ) -> AsyncioSubscription:
        stream = self.core.open_stream()
        try:
            for feed, fixture in topics:
                self.core.subscribe(stream, feed, fixture, backfill=backfill, max_rate=max_rate)
        except BaseException:
            self.core.close_stream(stream)
            raise
        self._notify()
        return AsyncioSubscription(self, stream)

    def replay(
        self,
        feed: str,
        fixture: str,
        *,
        rate: int,
        looped: bool = False,
        start: dict[str, Any] | None = None,
    ) -> AsyncioSubscription:
        """Replay what the gateway holds of a topic at *rate* frames a second (op ``replay``):
        ``replay_started``, ``replay_frame``..., ``replay_loop``, ``replay_end`` events."""
        return self.replay_many([(feed, fixture)], rate=rate, looped=looped, start=start)

    def replay_many(
        self,
        topics: Iterable[tuple[str, str]],
        *,
        rate: int,
        looped: bool = False,
        start: dict[str, Any] | None = None,
    ) -> AsyncioSubscription:
        """Replay several topics: one merged stream of their replay events."""
        stream = self.core.open_stream()
        try:
            for feed, fixture in topics:
                self.core.replay(stream, feed, fixture, rate=rate, looped=looped, start=start)
        except BaseException:
            self.core.close_stream(stream)
            raise
        self._notify()
        return AsyncioSubscription(self, stream)

    def unsubscribe(self, feed: str, fixture: str) -> None:
        """End one subscription: an ``unsubscribed`` event (reason ``unsubscribe``) ends its
        part of the stream."""
        self.core.unsubscribe(feed, fixture)
        self._notify()

    def stop_replay(self, feed: str, fixture: str) -> None:
        """End a replay early: a ``replay_end`` event (reason ``stopped``)."""
        self.core.stop_replay(feed, fixture)
        self._notify()

    def close(self) -> None:
        self.core.close()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _run(self) -> None:
        core = self.core
        opts = self.options
        loop = asyncio.get_running_loop()
        while not core.is_closed():
            url = core.connecting()
            self._notify()
            status: int | None = None
            reason = "connection lost"
            try:
                async with connect(
                    url,
                    ssl=opts.ssl_for(url),
                    subprotocols=[Subprotocol(p) for p in opts.subprotocols()],
                    additional_headers=opts.headers(),
                    open_timeout=opts.connect_timeout,
                    close_timeout=opts.close_timeout,
                    max_size=opts.max_message_bytes,
                    # The heartbeat watchdog judges the connection; the queue is the core's.
                    ping_interval=None,
                    max_queue=1,
                    proxy=None,
                ) as ws:
                    core.opened(loop.time())
                    self._notify()
                    writer = asyncio.create_task(self._write(ws))
                    try:
                        reason = await self._read(ws)
                    finally:
                        writer.cancel()
                        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                            await writer
            except InvalidStatus as exc:
                status = exc.response.status_code
                reason = f"HTTP {status}"
            except ConnectionClosed as exc:
                reason = _closed_reason(exc)
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                reason = f"cannot connect: {str(exc)[:200] or type(exc).__name__}"
            if core.is_closed():
                return
            delay: float | None
            if status is not None:
                delay = core.refused(status, loop.time())
            else:
                delay = core.lost(reason, loop.time())
            self._notify()
            if delay is None:
                return
            await asyncio.sleep(delay)

    async def _read(self, ws: ClientConnection) -> str:
        core = self.core
        while True:
            while not core.wants_read:
                await self._changed.wait()
            if core.is_closed():
                return "closed"
            try:
                async with asyncio.timeout(core.dead_after):
                    text = await ws.recv()
            except TimeoutError:
                return f"no message for {core.dead_after:g} s (heartbeat watchdog)"
            except ConnectionClosed as exc:
                return _closed_reason(exc)
            try:
                used = core.received(text)
            except ProtocolError as exc:
                return f"protocol error: {exc}"
            if used and self.on_message is not None and isinstance(text, str):
                self.on_message(text)
            self._notify()

    async def _write(self, ws: ClientConnection) -> None:
        while True:
            for text in self.core.take_outgoing():
                await ws.send(text)
            await self._changed.wait()


def _closed_reason(exc: ConnectionClosed) -> str:
    rcvd = exc.rcvd
    if rcvd is None:
        return "closed 1006"
    return f"closed {rcvd.code} {rcvd.reason}".strip()
