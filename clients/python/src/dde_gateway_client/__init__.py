"""The DDE gateway's client (``/v1/stream``, protocol ``dde.v1``): every frame once, in order,
or an explicit :class:`Loss` event; never a silent skip.

- :class:`Client` (trio, ``trio-websocket``; ``pip install 'dde-gateway-client[trio]'``) and
  :class:`AsyncioClient` (asyncio, ``websockets``; the ``asyncio`` extra): imported on first use,
  so either works without the other's library;
- :class:`Core`: the sans-I/O state machine both adapters drive (for a third adapter);
- the events (:class:`Frame`, :class:`Loss`, ...), each with ``to_json()``.

Docs: docs/clients.md and docs/clients-python.md in the gateway's repository.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from ._backoff import DEFAULT_MAX_DELAY, DEFAULT_MIN_DELAY, DEFAULT_RESET_AFTER, Backoff
from ._core import (
    CLOSE_SLOW_CONSUMER,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_MISSES,
    DEFAULT_MAX_QUEUE,
    PROTOCOL,
    Core,
    Counters,
    ProtocolError,
    split_frame,
)
from ._events import (
    ConnectionState,
    Error,
    Event,
    Frame,
    Loss,
    LossReason,
    ReplayEnd,
    ReplayFrame,
    ReplayLoop,
    ReplayStarted,
    StateChanged,
    Status,
    Subscribed,
    Unsubscribed,
)
from ._options import ConnectOptions, TokenIn

if TYPE_CHECKING:
    from ._asyncio import AsyncioClient, AsyncioSubscription
    from ._trio import Client, Subscription

try:
    __version__ = version("dde-gateway-client")
except PackageNotFoundError:  # pragma: no cover - a source tree without install
    __version__ = "0.0.0+unknown"

#: The protocol versions (WebSocket subprotocols) this client speaks.
PROTOCOLS = (PROTOCOL,)


def __getattr__(name: str) -> Any:
    if name in ("Client", "Subscription"):
        from . import _trio  # noqa: PLC0415 - only when used: trio is an extra

        return getattr(_trio, name)
    if name in ("AsyncioClient", "AsyncioSubscription"):
        from . import _asyncio  # noqa: PLC0415 - websockets is an extra

        return getattr(_asyncio, name)
    raise AttributeError(f"module 'dde_gateway_client' has no attribute {name!r}")


__all__ = [
    "CLOSE_SLOW_CONSUMER",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HEARTBEAT_MISSES",
    "DEFAULT_MAX_DELAY",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_MIN_DELAY",
    "DEFAULT_RESET_AFTER",
    "PROTOCOL",
    "PROTOCOLS",
    "AsyncioClient",
    "AsyncioSubscription",
    "Backoff",
    "Client",
    "ConnectOptions",
    "ConnectionState",
    "Core",
    "Counters",
    "Error",
    "Event",
    "Frame",
    "Loss",
    "LossReason",
    "ProtocolError",
    "ReplayEnd",
    "ReplayFrame",
    "ReplayLoop",
    "ReplayStarted",
    "StateChanged",
    "Status",
    "Subscribed",
    "Subscription",
    "TokenIn",
    "Unsubscribed",
    "__version__",
    "split_frame",
]
