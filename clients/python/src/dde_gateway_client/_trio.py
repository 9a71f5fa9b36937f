"""The trio adapter (``trio-websocket``): the core's connections, timers and queues on trio.

```python
async with Client(["ws://gw-a:8765/v1/stream", "ws://gw-b:8765/v1/stream"], token=t) as c:
    async for event in c.subscribe("tracking", "F1", backfill=0):
        ...
```
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import trio
import trio_websocket

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


class Subscription:
    """The events of one or more subscriptions (and the connection's state changes), in
    order. Iterating ends when they have all ended (unsubscribed, stopped, refused) or the
    client is closed."""

    def __init__(self, client: Client, stream: int) -> None:
        self._client = client
        self.id = stream

    def __aiter__(self) -> Subscription:
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
        """Stop: unsubscribe everything this holds and forget its queued events."""
        self._client.core.close_stream(self.id)
        self._client._notify()


class Client:
    """A gateway client on trio. Use as ``async with``; the connection runs in a task of its
    own until the block ends (or :meth:`close`, or a refused token)."""

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
        #: Called with every message as it arrives, after the core read it, except frames it
        #: dropped as duplicates (``watch --raw``: what the gateway sent, each frame once).
        self.on_message = on_message
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    def __repr__(self) -> str:
        return f"Client(urls={self.core.urls!r}, state={self.state!r})"

    @property
    def state(self) -> ConnectionState:
        return self.core.state

    @property
    def counters(self) -> Counters:
        """Frames delivered, duplicates dropped, losses, connects, disconnects."""
        return self.core.counters

    async def __aenter__(self) -> Client:
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        self._nursery.start_soon(self._run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self.close()
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        return await self._nursery_manager.__aexit__(exc_type, exc, tb)

    def subscribe(
        self, feed: str, fixture: str, *, backfill: int | None = 0, max_rate: float | None = None
    ) -> Subscription:
        """Subscribe to one topic: its events (``backfill``: 0 live only, n the last n first,
        None or -1 everything the gateway holds; ``max_rate``: latest-wins frames a second)."""
        return self.subscribe_many([(feed, fixture)], backfill=backfill, max_rate=max_rate)

    def subscribe_many(
        self,
        topics: Iterable[tuple[str, str]],
        *,
        backfill: int | None = 0,
        max_rate: float | None = None,
    ) -> Subscription:
        """Subscribe to several topics: one merged stream of their events, in arrival order."""
        stream = self.core.open_stream()
        try:
            for feed, fixture in topics:
                self.core.subscribe(stream, feed, fixture, backfill=backfill, max_rate=max_rate)
        except BaseException:
            self.core.close_stream(stream)
            raise
        self._notify()
        return Subscription(self, stream)

    def replay(
        self,
        feed: str,
        fixture: str,
        *,
        rate: int,
        looped: bool = False,
        start: dict[str, Any] | None = None,
    ) -> Subscription:
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
    ) -> Subscription:
        """Replay several topics: one merged stream of their replay events."""
        stream = self.core.open_stream()
        try:
            for feed, fixture in topics:
                self.core.replay(stream, feed, fixture, rate=rate, looped=looped, start=start)
        except BaseException:
            self.core.close_stream(stream)
            raise
        self._notify()
        return Subscription(self, stream)

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
        """Terminal: stop connecting; every subscription's iteration ends after a ``closed``
        state event."""
        self.core.close()
        self._notify()

    # -- the connection task -------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _run(self) -> None:
        core = self.core
        opts = self.options
        headers = [(k.encode(), v.encode()) for k, v in opts.headers()]
        while not core.is_closed():
            url = core.connecting()
            self._notify()
            reason = "connection lost"
            status: int | None = None
            try:
                async with trio_websocket.open_websocket_url(
                    url,
                    opts.ssl_for(url),
                    subprotocols=opts.subprotocols(),
                    extra_headers=headers,
                    max_message_size=opts.max_message_bytes,
                    connect_timeout=opts.connect_timeout,
                    disconnect_timeout=opts.close_timeout,
                ) as ws:
                    core.opened(trio.current_time())
                    self._notify()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._write, ws)
                        reason = await self._read(ws)
                        nursery.cancel_scope.cancel()
            # trio wraps what its nurseries raise in groups (strict_exception_groups).
            except* trio_websocket.ConnectionRejected as group:
                status = _first(group).status_code
            except* trio_websocket.ConnectionClosed as group:
                reason = _closed_reason(_first(group))
            except* (OSError, trio_websocket.HandshakeError) as group:
                reason = f"cannot connect: {_plain(_first(group))}"
            if core.is_closed():
                return
            if status is not None:
                delay = core.refused(status, trio.current_time())
            else:
                delay = core.lost(reason, trio.current_time())
            self._notify()
            if delay is None:
                return
            await trio.sleep(delay)

    async def _read(self, ws: trio_websocket.WebSocketConnection) -> str:
        """Read until the connection ends: why it did."""
        core = self.core
        while True:
            while not core.wants_read:  # the application is behind: backpressure
                await self._changed.wait()
            if core.is_closed():
                return "closed"
            text: str | bytes | None = None
            with trio.move_on_after(core.dead_after):
                try:
                    text = await ws.get_message()
                except trio_websocket.ConnectionClosed as exc:
                    return _closed_reason(exc)
            if text is None:
                return f"no message for {core.dead_after:g} s (heartbeat watchdog)"
            try:
                used = core.received(text)
            except ProtocolError as exc:
                return f"protocol error: {exc}"
            if used and self.on_message is not None and isinstance(text, str):
                self.on_message(text)
            self._notify()

    async def _write(self, ws: trio_websocket.WebSocketConnection) -> None:
        try:
            while True:
                for text in self.core.take_outgoing():
                    await ws.send_message(text)
                await self._changed.wait()
        except trio_websocket.ConnectionClosed:
            return  # the reader sees it too, and says why


def _closed_reason(exc: trio_websocket.ConnectionClosed) -> str:
    reason = exc.reason
    if reason is None:
        return "closed 1006"
    return f"closed {reason.code} {reason.reason or ''}".strip()


def _first(group: BaseExceptionGroup[Any]) -> Any:
    """The first exception of *group* that is not itself a group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _plain(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]
