"""The replay counters of one gateway: how many run (by source), how many were refused and
why, frames sent. Defined once here; the control plane reads them for the
``dde_replay*`` metrics (:data:`REPLAY_METRICS`).
"""

from __future__ import annotations

from collections import Counter
from typing import Final, Literal

import attrs

#: Where a running replay's frames come from: the gateway's own (see ``SourceKind``) or a
#: dedicated vendor connection (``vendor``: a drop-in replay passed through).
ReplaySourceLabel = Literal["recording", "memory", "stream", "vendor"]
REPLAY_SOURCES: Final[tuple[ReplaySourceLabel, ...]] = ("recording", "memory", "stream", "vendor")

#: Why a replay was refused (the ``reason`` label of ``dde_replays_refused_total``).
RefusalReason = Literal["max_replays", "max_local", "max_per_connection", "not_held", "vendor"]
REFUSAL_REASONS: Final[tuple[RefusalReason, ...]] = (
    "max_replays",
    "max_local",
    "max_per_connection",
    "not_held",
    "vendor",
)

#: (metric name, kind, help): the replay metric families, named once.
REPLAY_METRICS: Final[dict[str, tuple[str, str, str]]] = {
    "active": (
        "dde_replays_active",
        "gauge",
        "Replays running now, by where their frames come from.",
    ),
    "total": ("dde_replays_total", "counter", "Replays started, by where their frames come from."),
    "frames": ("dde_replay_frames_total", "counter", "Frames sent by replays."),
    "refused": ("dde_replays_refused_total", "counter", "Replay requests refused, by reason."),
    "slow": (
        "dde_replays_slow_consumer_total",
        "counter",
        "Replays ended because their client did not read them.",
    ),
}


@attrs.define
class ReplayCounters:
    """Plain counters (the data path pays nothing for metrics)."""

    active: Counter[str] = attrs.field(factory=Counter)
    total: Counter[str] = attrs.field(factory=Counter)
    refused: Counter[str] = attrs.field(factory=Counter)
    frames: int = 0
    slow_consumers: int = 0

    @property
    def local_active(self) -> int:
        return sum(n for source, n in self.active.items() if source != "vendor")


class LimitReached(Exception):
    """A replay cap is reached: the message is for the client (it names the limit)."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ReplaySlot:
    """One running replay, counted in ``active`` until :meth:`release` (idempotent)."""

    __slots__ = ("_counters", "source")

    def __init__(self, counters: ReplayCounters, source: ReplaySourceLabel) -> None:
        self._counters: ReplayCounters | None = counters
        self.source = source
        counters.active[source] += 1
        counters.total[source] += 1

    def release(self) -> None:
        counters, self._counters = self._counters, None
        if counters is not None:
            counters.active[self.source] -= 1
