"""The upstream side: one supervised connection per (feed, fixture) to the vendor's feeds.

Everything public is re-exported here; the implementation lives in private one-concept modules.
"""

from gateway.upstream._authgate import AuthGate
from gateway.upstream._backoff import Backoff
from gateway.upstream._classify import (
    Kind,
    Message,
    classify_fastpath,
    classify_reference,
    classify_tracking,
    parser_reusable,
)
from gateway.upstream._connect import (
    DISCONNECT_TIMEOUT,
    MESSAGE_QUEUE_SIZE,
    Connector,
    UpstreamClosed,
    UpstreamConnection,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
    WebSocketConnector,
    open_trio_websocket_connector,
)
from gateway.upstream._dataage import DATA_AGE_BUCKETS, DATA_AGE_SAMPLE_EVERY, DataAge
from gateway.upstream._lean import (
    MAX_MESSAGE_SIZE,
    LeanConnection,
    LeanConnector,
    open_websocket_connector,
)
from gateway.upstream._limiter import PROMOTE_AFTER, ConnectLimiter, Priority
from gateway.upstream._resume import (
    ALL_FRAMES,
    BACKFILL_MARGIN,
    BACKFILL_SAFETY,
    BACKFILL_WIDEN,
    FALLBACK_RATE,
    MAX_WIDENINGS,
    FastpathResume,
    TrackingResume,
    Verdict,
)
from gateway.upstream._runner import (
    FASTPATH_ACCEPT,
    MAX_MALFORMED_RUN,
    FixtureRunner,
    SessionNext,
    SessionState,
    TokenReader,
    read_token_off_loop,
)
from gateway.upstream._supervisor import TOKEN_POLL_INTERVAL, FixtureHandle, Supervisor

__all__ = [
    "ALL_FRAMES",
    "BACKFILL_MARGIN",
    "BACKFILL_SAFETY",
    "BACKFILL_WIDEN",
    "DATA_AGE_BUCKETS",
    "DATA_AGE_SAMPLE_EVERY",
    "DISCONNECT_TIMEOUT",
    "FALLBACK_RATE",
    "FASTPATH_ACCEPT",
    "MAX_MALFORMED_RUN",
    "MAX_MESSAGE_SIZE",
    "MAX_WIDENINGS",
    "MESSAGE_QUEUE_SIZE",
    "PROMOTE_AFTER",
    "TOKEN_POLL_INTERVAL",
    "AuthGate",
    "Backoff",
    "ConnectLimiter",
    "Connector",
    "DataAge",
    "FastpathResume",
    "FixtureHandle",
    "FixtureRunner",
    "Kind",
    "LeanConnection",
    "LeanConnector",
    "Message",
    "Priority",
    "SessionNext",
    "SessionState",
    "Supervisor",
    "TokenReader",
    "TrackingResume",
    "UpstreamClosed",
    "UpstreamConnection",
    "UpstreamError",
    "UpstreamRejected",
    "UpstreamUnavailable",
    "Verdict",
    "WebSocketConnector",
    "classify_fastpath",
    "classify_reference",
    "classify_tracking",
    "open_trio_websocket_connector",
    "open_websocket_connector",
    "parser_reusable",
    "read_token_off_loop",
]
