"""The replays of one gateway: the ``[replay]`` limits, the counters, and the vendor link for
pass-through (None: a drop-in replay the gateway cannot serve is refused)."""

from __future__ import annotations

from gateway.config import ReplaySection
from gateway.replay._counters import (
    LimitReached,
    RefusalReason,
    ReplayCounters,
    ReplaySlot,
    ReplaySourceLabel,
)
from gateway.replay._passthrough import VendorLink


class Replays:
    """The replay limits (``[replay]``) and counters of one gateway.

    Local replays (served from what the gateway holds) take a slot with :meth:`local`, checked
    against ``max_local`` and, per connection, ``max_per_connection`` (the caller counts its
    own); vendor pass-through connections with :meth:`vendor`, checked against
    ``max_replays``. A refusal raises :class:`LimitReached` and is counted. The per-connection
    cap is per connection of ``/v1/stream``; a drop-in connection has one request.
    """

    def __init__(
        self, settings: ReplaySection | None = None, *, vendor: VendorLink | None = None
    ) -> None:
        self.settings = settings or ReplaySection()
        self.counters = ReplayCounters()
        #: Opens dedicated vendor connections for pass-through (None: never).
        self.vendor_link = vendor

    def refuse(self, reason: RefusalReason) -> None:
        """Count a refusal that was not a limit (``not_held``, ``vendor``)."""
        self.counters.refused[reason] += 1

    def local(self, source: ReplaySourceLabel, *, on_connection: int = 0) -> ReplaySlot:
        """A slot for a local replay; *on_connection*: the replays its connection runs now."""
        s = self.settings
        if on_connection >= s.max_per_connection:
            self.counters.refused["max_per_connection"] += 1
            raise LimitReached(
                "max_per_connection",
                f"too many replays on this connection (max_per_connection {s.max_per_connection})",
            )
        if self.counters.local_active >= s.max_local:
            self.counters.refused["max_local"] += 1
            raise LimitReached("max_local", f"too many replays running (max_local {s.max_local})")
        return ReplaySlot(self.counters, source)

    def vendor(self) -> ReplaySlot:
        """A slot for a replay passed through to the vendor on its own connection."""
        s = self.settings
        if self.counters.active["vendor"] >= s.max_replays:
            self.counters.refused["max_replays"] += 1
            raise LimitReached(
                "max_replays",
                f"too many replays passed through to the vendor (max_replays {s.max_replays})",
            )
        return ReplaySlot(self.counters, "vendor")
