"""Replays: a fixture's frames again, from a start, at a pace, private to one client.

Used by the data plane's two endpoints (docs/protocol.md): the vendor drop-in's Replay Fixture
Request and the ``/v1/stream`` ``replay`` op. One concept per private module:

- :class:`Start` (``_start``): where a replay begins: the first frame, a seq, a match time
  (phase + ``mt``) or a vendor time (``ut``);
- a source (``_source``): :func:`open_source` gives a :class:`HeldSource` over what the
  gateway holds of a topic (its archive: the recorder's segments, in a cluster the instance's
  recording or the Redis stream; then the memory history), read in chunks, or
  :class:`NotHeld` when that does not reach the start;
- :class:`Pacer` (``_pacer``, I/O-free): N frames a second, evenly;
- :func:`run_replay` (``_run``): paces a source's frames into an async ``send`` with the
  replay's own byte budget and slow-consumer rule;
- :class:`Replays` (``_replays``): the ``[replay]`` limits, the counters (``_counters``) and
  the vendor link of one gateway;
- the vendor pass-through (``_passthrough``): a drop-in replay the gateway cannot serve, on a
  dedicated vendor connection.

Imports the hub, cluster, upstream, model and config; the data plane uses it, never the other
way.
"""

from gateway.replay._counters import (
    REFUSAL_REASONS,
    REPLAY_METRICS,
    REPLAY_SOURCES,
    LimitReached,
    RefusalReason,
    ReplayCounters,
    ReplaySlot,
    ReplaySourceLabel,
)
from gateway.replay._pacer import CATCH_UP, MAX_RATE, MIN_RATE, Pacer, valid_rate
from gateway.replay._passthrough import (
    PassThroughEnd,
    PassThroughError,
    ReplayRequest,
    VendorLink,
)
from gateway.replay._replays import Replays
from gateway.replay._run import (
    EndReason,
    OnLoop,
    ReplayBacklog,
    ReplayLimits,
    ReplayResult,
    SendFrame,
    run_replay,
)
from gateway.replay._source import (
    DEFAULT_CHUNK_BYTES,
    FIRST_TRACKING_POSITION,
    MAX_BATCH_FRAMES,
    REPLAY_READERS,
    SOURCE_KINDS,
    HeldSource,
    NotHeld,
    ReadStats,
    ReplayFrame,
    ReplaySource,
    SourceKind,
    SourceLost,
    open_source,
)
from gateway.replay._start import Start

__all__ = [
    "CATCH_UP",
    "DEFAULT_CHUNK_BYTES",
    "FIRST_TRACKING_POSITION",
    "MAX_BATCH_FRAMES",
    "MAX_RATE",
    "MIN_RATE",
    "REFUSAL_REASONS",
    "REPLAY_METRICS",
    "REPLAY_READERS",
    "REPLAY_SOURCES",
    "SOURCE_KINDS",
    "EndReason",
    "HeldSource",
    "LimitReached",
    "NotHeld",
    "OnLoop",
    "Pacer",
    "PassThroughEnd",
    "PassThroughError",
    "ReadStats",
    "RefusalReason",
    "ReplayBacklog",
    "ReplayCounters",
    "ReplayFrame",
    "ReplayLimits",
    "ReplayRequest",
    "ReplayResult",
    "ReplaySlot",
    "ReplaySource",
    "ReplaySourceLabel",
    "Replays",
    "SendFrame",
    "SourceKind",
    "SourceLost",
    "Start",
    "VendorLink",
    "open_source",
    "run_replay",
    "valid_rate",
]
