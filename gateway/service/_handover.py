"""Planned handovers, make-before-break: the node's side (docs/cluster.md, "Planned handovers").

The rules and the frame bookkeeping are in :mod:`gateway.cluster` (``WarmBuffer``,
``WarmSink``, the handover values); this module runs them against Redis for one
:class:`ClusterNode`:

- *owner*: a fixture to hand over (a rebalance, or this instance stopping) gets an *offer*
  naming its successor. When the successor answers that it is in step, the owner stops its
  upstream, lets its queued frames reach Redis and hands the lease over (``TRANSFER``: fenced,
  only if it still holds it); it relays the fixture from then on. An offer not answered in
  :func:`~gateway.cluster.handover_timeout` falls back to a release (break-before-make).
- *successor*: an offer naming this instance opens a *warm* upstream connection (the same
  supervisor and connect limiter as any: it counts everywhere a connection counts) whose
  :class:`WarmSink` publishes nothing but keeps its frames. Once they continue the stream
  (``in_step``) it answers ``ready``; once the lease is its own it takes the fixture over
  (``ClusterNode._take_over``), appends and publishes the warm frames after the stream's last
  position, and goes on live on the same connection. An offer withdrawn closes the warm
  connection.

A hot standby's warm connection (``[cluster] standby``, :mod:`gateway.service._standby`) is
one of :attr:`HandoverDesk.warm` too (``WarmSink.standby``): an offer to this instance uses
it (no second connect), and it stays open when no offer names it.

While a handover is under way the node checks every :data:`~gateway.cluster.HANDOVER_POLL`
seconds instead of every round, so the lease changes hands within a few of those.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import attrs
import trio

from gateway.cluster import (
    RedisStore,
    WarmSink,
    handover_timeout,
    offer_value,
    offered_to,
    ready_token,
    ready_value,
    token_instance,
)

if TYPE_CHECKING:
    from gateway.service._cluster import ClusterNode

log = logging.getLogger("gateway.cluster")

#: Why an owner hands a fixture over (the log line's words).
REBALANCING: Final = "rebalancing"
STOPPING: Final = "instance stopping"


@attrs.define
class Offer:
    """An owner's offer of one fixture to *successor* (an instance name), until *deadline*
    (trio time)."""

    successor: str
    deadline: float
    why: str

    @property
    def value(self) -> str:
        return offer_value(self.successor)


class HandoverDesk:
    """See the module docstring: one per node, driven by its rounds and polls."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        #: Owner side: fixtures offered, by key.
        self.offers: dict[str, Offer] = {}
        #: Successor side: warm connections, by key.
        self.warm: dict[str, WarmSink] = {}
        #: Successor side: keys answered ``ready`` (waiting for the lease).
        self.ready: set[str] = set()
        #: Fixtures handed over make-before-break (owner side).
        self.made = 0
        #: Fixtures taken over from a warm connection (successor side).
        self.received = 0
        #: Offers that fell back to a release (the successor never got in step in time).
        self.fallbacks = 0
        #: Warm connections opened (successor side).
        self.warmed = 0
        #: Set while no offer is under way (a stopping instance waits for it).
        self.idle = trio.Event()
        self.idle.set()

    @property
    def pending(self) -> bool:
        """A handover is under way (a standby's warm connection alone is none)."""
        return bool(self.offers or self.ready or any(not s.standby for s in self.warm.values()))

    def offer(self, key: str, successor: str, why: str) -> None:
        if key not in self.offers:
            deadline = trio.current_time() + handover_timeout(self.node.config.lease_ttl)
            self.offers[key] = Offer(successor, deadline, why)
            if self.idle.is_set():
                self.idle = trio.Event()
            log.info("cluster: offering %s to %s (%s)", key, successor, why)

    def forget(self, key: str) -> None:
        """*key* is not followed any more, or not owned: no handover of it."""
        self.offers.pop(key, None)
        self.cool(key)

    def cool(self, key: str, why: str = "no longer needed") -> None:
        """Close *key*'s warm connection (if any, and not promoted)."""
        self.ready.discard(key)
        sink = self.warm.pop(key, None)
        if sink is not None and sink.target is None:
            self.node.stop_upstream(key)
            if sink.standby:
                self.node.standby_closed(key, why)

    def take_warm(self, key: str, stream: int | None) -> WarmSink | None:
        """The warm connection of *key* if it continues a stream ending at *stream* (the
        take-over promotes it); else it is closed and None (a fresh connection follows)."""
        self.ready.discard(key)
        sink = self.warm.pop(key, None)
        if sink is None:
            return None
        if sink.buffer.continues(stream):
            return sink
        log.info("cluster: %s: warm connection not in step with the stream: reconnecting", key)
        self.node.stop_upstream(key)
        if sink.standby:
            self.node.standby_closed(key, "not in step with the stream at the take-over")
        return None

    async def step(self, store: RedisStore, *, full: bool) -> None:
        """One check: answers to this instance's offers, and offers to it (*full*: every
        followed fixture it does not own; else only those with a warm connection)."""
        if self.offers:
            try:
                await self._owner_side(store)
            finally:
                if not self.offers:
                    self.idle.set()
        await self._successor_side(store, full=full)

    # -- owner -------------------------------------------------------------------------------

    async def _owner_side(self, store: RedisStore) -> None:
        node = self.node
        for key in [k for k in self.offers if not node.owns(k)]:
            del self.offers[key]  # lost, fenced or no longer followed meanwhile
        offers = {key: o.value for key, o in self.offers.items()}
        timeout = handover_timeout(node.config.lease_ttl)
        values = await store.offer(node.token, offers, timeout)
        now = trio.current_time()
        for key, value in values.items():
            offer = self.offers.get(key)
            if offer is None:
                continue
            token = ready_token(value)
            if token is not None and token_instance(token) == offer.successor:
                del self.offers[key]
                await self._give(store, key, offer, token)
            elif now >= offer.deadline:
                del self.offers[key]
                self.fallbacks += 1
                log.warning(
                    "cluster: %s: %s not in step within %.0f s: released (break-before-make)",
                    key,
                    offer.successor,
                    timeout,
                )
                await store.swap_handover([key], offer.value, None)
                await node.release_now(store, key, offer.why)

    async def _give(self, store: RedisStore, key: str, offer: Offer, successor: str) -> None:
        node = self.node
        await node.stop_owning(key, f"handed over to {offer.successor} ({offer.why})")
        if await store.transfer(node.token, key, successor):
            self.made += 1
            log.info("cluster: %s handed over to %s, make-before-break", key, offer.successor)
        else:
            # The lease is not ours any more, or the successor withdrew: released as before.
            await store.release(node.token, [key])
        node.table.released(key)

    # -- successor ---------------------------------------------------------------------------

    async def _successor_side(self, store: RedisStore, *, full: bool) -> None:
        node = self.node
        if node.draining:
            for key in list(self.warm):
                self.cool(key, "instance stopping")
            return
        # Between rounds only the handovers under way (a standby that answered an offer).
        keys = (
            node.relayed_keys()
            if full
            else sorted(k for k, s in self.warm.items() if not s.standby or k in self.ready)
        )
        if not keys:
            return
        values = await store.handovers(keys)
        check: list[str] = []
        for key, value in values.items():
            sink = self.warm.get(key)
            if offered_to(value) == node.instance:
                if sink is None:
                    self._warm_up(key)
                elif key not in self.ready and sink.in_step():
                    answer = ready_value(node.token)
                    if await store.swap_handover([key], value or "", answer):
                        self.ready.add(key)
                        log.info("cluster: %s: warm connection in step: ready", key)
            elif (
                ready_token(value) != node.token
                and sink is not None
                and (not sink.standby or key in self.ready)
            ):
                check.append(key)
        if check:
            # Handed to this instance (the key is gone with the transfer), or withdrawn.
            mine = await node.check_leases(store, check)
            for key in check:
                sink = self.warm.get(key)
                if sink is None:
                    continue  # closed meanwhile (no longer followed)
                if key in mine:
                    await node.take_over_now(store, key)
                elif sink.standby:
                    log.info("cluster: %s: offer withdrawn: standing by", key)
                    self.ready.discard(key)
                else:
                    log.info("cluster: %s: offer withdrawn: warm connection closed", key)
                    self.cool(key)

    def _warm_up(self, key: str) -> None:
        node = self.node
        sink = self.warm[key] = WarmSink(lambda: node.relayed_position(key))
        if not node.start_warm(key, sink):
            del self.warm[key]
        else:
            self.warmed += 1
            log.info("cluster: %s: offered to this instance: warm connection opening", key)
