"""What the gateway's packages share about one followed fixture: its state, counters and sink.

A leaf module (it imports nothing of the gateway): the contract between the upstream supervisor,
which writes these, and the hub, data plane and control plane, which read them. No I/O.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from typing import Any, Final, Protocol

import attrs


class FixtureState(enum.StrEnum):
    CONNECTING = "connecting"
    LIVE = "live"
    BACKOFF = "backoff"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    STOPPED = "stopped"
    #: A cluster relay cannot read the fixture's stream (Redis unreachable): no frames now.
    DEGRADED = "degraded"


class FrameSink(Protocol):
    """Where one fixture's accepted frames go (in production: its hub topic).

    Both methods are synchronous and must not block: the upstream task calls them from its
    receive loop, and anything slow here would stall the upstream connection's pings.
    """

    def publish(self, raw: str, position: int | None) -> None:
        """One accepted data frame: the original upstream text, in order, exactly once.

        *position* is the vendor's number for the frame, from the ``ix`` or ``fixtureSeqNum``
        the upstream classifier read: tracking ``ix``; fastpath the event's position in the
        match, the connection's ``startPosition`` plus its ``fixtureSeqNum`` (the number of
        events up to and including it: what a later ``startPosition`` skips). None for a frame
        the vendor does not number (fastpath status packets such as
        ``ConnectionStateChanged``). The classifier's verdict is final: nothing downstream
        parses the frame again to decide it.
        """

    def set_status(self, state: FixtureState, detail: str) -> None:
        """The upstream state changed (called on every change; the sink deduplicates)."""


@attrs.frozen
class ResumePoint:
    """Where a fixture's upstream goes on instead of starting over: the last frame kept of it
    (the recorder's, after a restart).

    *position* is that frame's :meth:`FrameSink.publish` position (tracking ``ix``: backfill
    from there; fastpath: the ``startPosition`` that skips up to it), *received_at* the UNIX
    time it was received (a tracking backfill must reach back over the time since).
    """

    position: int
    received_at: float


@attrs.frozen
class CounterSpec:
    """How one upstream counter is published: its Prometheus family and help text."""

    name: str
    metric: str
    help: str


_SPEC: Final = "gateway.counter"


def _counter(metric: str, help: str) -> Any:
    # The metric name and help live on the field itself, so the counter, its API key and its
    # Prometheus family are one definition.
    return attrs.field(default=0, metadata={_SPEC: (metric, help)})


@attrs.define
class UpstreamCounters:
    """Monotonic counts of one fixture's upstream; every field is an ``int``.

    The API's ``upstream`` object, the per-feed and process totals and the Prometheus metrics
    are all built from this class's fields (:func:`counter_specs`), so a counter added here
    reaches all of them. Example::

        >>> total = UpstreamCounters(frames=3) + UpstreamCounters(frames=2, gaps=1)
        >>> (total.frames, total.gaps)
        (5, 1)
    """

    connects: int = _counter("dde_upstream_connects_total", "Upstream connections opened.")
    reconnects: int = _counter("dde_upstream_reconnects_total", "Upstream reconnections.")
    frames: int = _counter("dde_frames_received_total", "Upstream data frames accepted.")
    heartbeats: int = _counter("dde_upstream_heartbeats_total", "Upstream heartbeats received.")
    received_bytes: int = _counter(
        "dde_upstream_received_bytes_total",
        "Bytes of the upstream messages received (UTF-8 payloads: data, heartbeats, replies).",
    )
    duplicates_dropped: int = _counter(
        "dde_upstream_duplicates_dropped_total", "Duplicate upstream frames dropped."
    )
    gaps: int = _counter("dde_upstream_gaps_total", "Upstream sequence gaps detected.")
    out_of_order: int = _counter(
        "dde_upstream_out_of_order_total", "Fastpath events that arrived out of order."
    )
    malformed: int = _counter(
        "dde_upstream_malformed_total", "Malformed upstream frames counted and skipped."
    )
    crashes: int = _counter(
        "dde_upstream_crashes_total",
        "Unexpected errors in a fixture's upstream task (each restarts it after a backoff).",
    )
    refused: int = _counter(
        "dde_upstream_refused_total",
        "Upstream attempts the vendor refused the token for (while refused, one probe a "
        "unauthorized_probe_interval).",
    )

    def __add__(self, other: UpstreamCounters) -> UpstreamCounters:
        return UpstreamCounters(**{n: getattr(self, n) + getattr(other, n) for n in _COUNTER_NAMES})

    def as_dict(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in _COUNTER_NAMES}


def counter_specs() -> tuple[CounterSpec, ...]:
    """Every :class:`UpstreamCounters` field with its metric, in declaration order."""
    return _COUNTER_SPECS


def counter_names() -> tuple[str, ...]:
    """The names of :class:`UpstreamCounters`' fields, in declaration order."""
    return _COUNTER_NAMES


def sum_counters(counters: Iterable[UpstreamCounters]) -> UpstreamCounters:
    """The field-by-field sum of *counters* (all zero for none)."""
    total = UpstreamCounters()
    for c in counters:
        total = total + c
    return total


_COUNTER_SPECS: Final = tuple(
    CounterSpec(f.name, *f.metadata[_SPEC]) for f in attrs.fields(UpstreamCounters)
)
_COUNTER_NAMES: Final = tuple(spec.name for spec in _COUNTER_SPECS)


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
        """Plain data for the API (``upstream`` object of ``GET /v1/fixtures/{feed}/{id}``).

        Its keys are :func:`snapshot_keys`: every counter, then ``last_error`` and
        ``last_message_at``.
        """
        out: dict[str, Any] = self.counters.as_dict()
        out["last_error"] = self.last_error
        out["last_message_at"] = self.last_message_at
        return out


def snapshot_keys() -> tuple[str, ...]:
    """The keys of :meth:`FixtureStatus.snapshot`, in order."""
    return (*_COUNTER_NAMES, "last_error", "last_message_at")
