"""What the gateway's packages share about one followed fixture: its state, counters and sink.

A leaf module (it imports nothing of the gateway): the contract between the upstream supervisor,
which writes these, and the hub, data plane and control plane, which read them. No I/O.
"""

from __future__ import annotations

import enum
import time
from typing import Any, Protocol

import attrs


class FixtureState(enum.StrEnum):
    CONNECTING = "connecting"
    LIVE = "live"
    BACKOFF = "backoff"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    STOPPED = "stopped"


class FrameSink(Protocol):
    """Where one fixture's accepted frames go (in production: its hub topic).

    Both methods are synchronous and must not block: the upstream task calls them from its
    receive loop, and anything slow here would stall the upstream connection's pings.
    """

    def publish(self, raw: str, position: int | None) -> None:
        """One accepted data frame: the original upstream text, in order, exactly once.

        *position* is the vendor's number for the frame as the upstream classifier read it
        (tracking ``ix``, fastpath ``fixtureSeqNum``), or None for a frame the vendor does not
        number (fastpath status packets such as ``ConnectionStateChanged``). The classifier's
        verdict is final: nothing downstream parses the frame again to decide it.
        """

    def set_status(self, state: FixtureState, detail: str) -> None:
        """The upstream state changed (called on every change; the sink deduplicates)."""


@attrs.define
class UpstreamCounters:
    """Monotonic counts of one fixture's upstream; every field is an ``int``.

    The API's ``upstream`` object, the per-feed totals and the Prometheus metrics are all built
    from this class's fields (:func:`counter_names`), so a counter added here reaches all three.
    """

    connects: int = 0
    reconnects: int = 0
    frames: int = 0
    heartbeats: int = 0
    duplicates_dropped: int = 0
    gaps: int = 0
    out_of_order: int = 0
    malformed: int = 0
    # Unexpected exceptions in this fixture's upstream task (each one restarts it with backoff).
    crashes: int = 0


@attrs.define
class FixtureStatus:
    """Live view of one fixture's upstream. Mutated only by its own upstream task.

    ``last_error`` is written by code that strips secrets; it is safe to show anywhere.
    ``state_since`` and ``last_message_at`` are wall-clock UNIX times (for people and the API).
    """

    feed: str
    fixture: str
    state: FixtureState = FixtureState.CONNECTING
    state_since: float = attrs.field(factory=time.time)
    detail: str = ""
    counters: UpstreamCounters = attrs.field(factory=UpstreamCounters)
    last_error: str | None = None
    last_message_at: float | None = None

    def snapshot(self) -> dict[str, Any]:
        """Plain data for the API (``upstream`` object of ``GET /v1/fixtures/{feed}/{id}``)."""
        out: dict[str, Any] = attrs.asdict(self.counters)
        out["last_error"] = self.last_error
        out["last_message_at"] = self.last_message_at
        return out


def counter_names() -> tuple[str, ...]:
    """The names of :class:`UpstreamCounters`' fields, in declaration order."""
    return tuple(f.name for f in attrs.fields(UpstreamCounters))
