"""Several gateways as one, on Redis Streams: leases, fenced appends, relays (docs/cluster.md).

Everything public is re-exported here; the implementation lives in private one-concept modules.
"""

from gateway.cluster._appender import (
    APPEND_INTERVAL,
    BATCH_BYTES,
    BATCH_FRAMES,
    Appender,
    AppendStore,
)
from gateway.cluster._archive import StreamArchive, StreamCursor
from gateway.cluster._lease import (
    DEFAULT_HANDOVERS,
    HANDBACK_ROUNDS,
    MAX_TICK,
    RETAKE_ROUNDS,
    LeasePlan,
    LeaseTable,
    holder_token,
    tick_interval,
    token_instance,
    validity,
)
from gateway.cluster._liveness import BEAT_KEY, SILENT_ROUNDS, Liveness
from gateway.cluster._relay import (
    CATCH_UP_CHUNK,
    HOLD_BACKLOG,
    HOLD_MAX,
    READ_BLOCK,
    READ_INTERVAL,
    ReadStore,
    Relay,
    RelaySink,
)
from gateway.cluster._rendezvous import rank, weight
from gateway.cluster._store import (
    READ_COUNT,
    AppendGroup,
    Behind,
    ClusterError,
    Entry,
    Keys,
    Meta,
    RedisStore,
    RedisUnavailable,
    Takeover,
    open_store,
)

__all__ = [
    "APPEND_INTERVAL",
    "BATCH_BYTES",
    "BATCH_FRAMES",
    "BEAT_KEY",
    "CATCH_UP_CHUNK",
    "DEFAULT_HANDOVERS",
    "HANDBACK_ROUNDS",
    "HOLD_BACKLOG",
    "HOLD_MAX",
    "MAX_TICK",
    "READ_BLOCK",
    "READ_COUNT",
    "READ_INTERVAL",
    "RETAKE_ROUNDS",
    "SILENT_ROUNDS",
    "AppendGroup",
    "AppendStore",
    "Appender",
    "Behind",
    "ClusterError",
    "Entry",
    "Keys",
    "LeasePlan",
    "LeaseTable",
    "Liveness",
    "Meta",
    "ReadStore",
    "RedisStore",
    "RedisUnavailable",
    "Relay",
    "RelaySink",
    "StreamArchive",
    "StreamCursor",
    "Takeover",
    "holder_token",
    "open_store",
    "rank",
    "tick_interval",
    "token_instance",
    "validity",
    "weight",
]
