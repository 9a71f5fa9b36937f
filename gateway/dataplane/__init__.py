"""The data plane: our own WebSocket server that fans pre-encoded frames out to subscribers.

Two endpoints (docs/protocol.md): ``/v1/stream`` (multiplexed, many fixtures per connection,
seq/epoch resume) and the vendor drop-in at each feed's ``dropin_path``. :func:`run` serves
them; :class:`SubscriberRegistry` lists subscribers, keeps totals and drains on shutdown;
:class:`SendQueue` is one connection's byte-budgeted queue (no I/O, usable on its own);
:class:`SubscriberAuth` holds the subscriber tokens in force and counts failed attempts;
:class:`Conflator` is the latest-wins rate limit of ``max_rate`` subscriptions;
:class:`BatchGroup` writes one buffer per batch to the delayed subscribers that share topics.
"""

from gateway.dataplane._access import (
    AUTH_ENDPOINTS,
    BEARER_PROTOCOL_PREFIX,
    STREAM_PROTOCOL,
    SubscriberAuth,
    offered_tokens,
)
from gateway.dataplane._batchgroup import BatchGroup, join_group
from gateway.dataplane._conflate import MAX_RATE, MIN_RATE, Conflator
from gateway.dataplane._connection import (
    BACKFILL_CHUNK,
    DEFAULT_CLOSE_TIMEOUT,
    EVENTS_PER_TURN,
    Connection,
    ConnectionMonitor,
    DelayedConnection,
    WriteTicker,
)
from gateway.dataplane._lameduck import close_spread
from gateway.dataplane._registry import (
    RegistryStats,
    SubscriberRegistry,
    SubscriberView,
    disconnect_reason,
    view_facts,
)
from gateway.dataplane._sendqueue import DeliverySink, SendItem, SendQueue
from gateway.dataplane._server import STREAM_PATH, run
from gateway.dataplane._subquery import (
    QUERY_STEP,
    SLOW_QUEUE_SHARE,
    SORT_KEYS,
    CursorGone,
    Facts,
    Page,
    SubscriberQuery,
    run_query,
    subscriber_order,
)

__all__ = [
    "AUTH_ENDPOINTS",
    "BACKFILL_CHUNK",
    "BEARER_PROTOCOL_PREFIX",
    "DEFAULT_CLOSE_TIMEOUT",
    "EVENTS_PER_TURN",
    "MAX_RATE",
    "MIN_RATE",
    "QUERY_STEP",
    "SLOW_QUEUE_SHARE",
    "SORT_KEYS",
    "STREAM_PATH",
    "STREAM_PROTOCOL",
    "BatchGroup",
    "Conflator",
    "Connection",
    "ConnectionMonitor",
    "CursorGone",
    "DelayedConnection",
    "DeliverySink",
    "Facts",
    "Page",
    "RegistryStats",
    "SendItem",
    "SendQueue",
    "SubscriberAuth",
    "SubscriberQuery",
    "SubscriberRegistry",
    "SubscriberView",
    "WriteTicker",
    "close_spread",
    "disconnect_reason",
    "join_group",
    "offered_tokens",
    "run",
    "run_query",
    "subscriber_order",
    "view_facts",
]
