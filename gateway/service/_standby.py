"""Hot standby (``[cluster] standby = true``): the node's side (docs/cluster.md, "Hot standby").

Who stands by for a fixture is :func:`gateway.cluster.standby_for` (rendezvous, the owner
left out); this module applies it every round for one :class:`ClusterNode`:

- a fixture another instance owns, for which this instance is the standby and has no warm
  connection yet, gets one: the planned handovers' :class:`~gateway.cluster.WarmSink` (marked
  ``standby``), through the same supervisor and connect limiter as any connection, behind the
  connects that carry frames to subscribers now (the limiter's backlog: a standby's first
  attempt waits for every take-over and reconnect), the watched fixtures first. It resumes
  after the last vendor position the relay has seen, publishes nothing and keeps what the
  stream does not have yet (bounded: ``WARM_MAX`` beyond the stream);
- a warm standby connection of a fixture whose standby is now another instance (an instance
  joined, left or went silent, or the owner changed) is closed;
- when the lease of a fixture it stands by for is free and its owner is gone (not heard, or
  stopping), the lease table gets the key as ``first``: taken at once, without the rank's and
  retake's waits; the take-over promotes the warm connection (``ClusterNode._take_over``):
  it appends exactly the frames the stream lacks and goes on live, no reconnect;
- an offer of a planned handover to this instance uses the standby's connection
  (``gateway.service._handover``).

A lease that is free stands for a failover under way: a standby keeps its connection then
(it is about to take the lease), and no new one is opened for it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from gateway.cluster import WarmSink, standby_for

if TYPE_CHECKING:
    from gateway.service._cluster import ClusterNode

log = logging.getLogger("gateway.cluster")


class StandbyDesk:
    """See the module docstring: one per node, driven by its rounds."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        #: The owner each standby connection stands by for (by key), as last seen.
        self.owners: dict[str, str] = {}
        #: Standby connections opened, promoted (take-overs without a reconnect), and closed
        #: without a promotion (the standby moved elsewhere, the fixture went, a stop).
        self.started = 0
        self.promoted = 0
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        return self.node.config.standby

    def standing_by(self) -> list[str]:
        """The fixtures this instance holds a standby connection for (not yet promoted)."""
        return sorted(
            key for key, sink in self.node.desk.warm.items() if sink.standby and sink.target is None
        )

    def in_step(self) -> int:
        """Standby connections in step with the stream: ready to take over (a connection
        still waiting for its connect slot, or behind the stream, is not)."""
        return sum(
            1
            for sink in self.node.desk.warm.values()
            if sink.standby and sink.target is None and sink.in_step()
        )

    def candidates(self) -> set[str]:
        """The instances that may stand by: live, heard and not stopping (this one unless it
        is stopping)."""
        node = self.node
        names = {n for n in node.staying() if node.silent_for(n) is None}
        if node.draining:
            names.discard(node.instance)
        else:
            names.add(node.instance)
        return names

    def chosen(self, key: str, candidates: set[str]) -> str | None:
        """The instance that stands by for *key* as this instance sees it (None: none)."""
        node = self.node
        owner = node.instance if node.owns(key) else node.table.holder(key)
        if owner is None:
            return None
        return standby_for(key, owner, candidates)

    def of(self, key: str) -> str | None:
        """Who stands by for *key* as this instance sees it (None: standby off, or none)."""
        return self.chosen(key, self.candidates()) if self.enabled else None

    def by_instance(self) -> dict[str, int]:
        """Followed fixtures each instance stands by for, as this instance sees it."""
        out: dict[str, int] = {}
        if not self.enabled:
            return out
        candidates = self.candidates()
        for fixture in self.node.followed():
            name = self.chosen(f"{fixture.feed}/{fixture.id}", candidates)
            if name is not None:
                out[name] = out.get(name, 0) + 1
        return out

    def first(self, candidates: set[str]) -> set[str]:
        """Keys whose lease this instance takes at once when it is free: it stands by for
        them and the owner it stood by for is gone (not heard, or stopping)."""
        if not self.enabled:
            return set()
        return {key for key in self.standing_by() if self.owners.get(key) not in candidates}

    def urgent(self) -> set[str]:
        """Keys this instance stands by for whose owner is gone: their leases are asked for
        every poll (taken the moment they run out)."""
        if not self.enabled or not self.owners:
            return set()
        return self.first(self.candidates())

    def step(self) -> None:
        """One round: open the standby connections this instance should hold, close the
        ones it should not."""
        node = self.node
        if not self.enabled or node.draining:
            return  # a stopping instance's warm connections are closed by the handover desk
        candidates = self.candidates()
        desk = node.desk
        for key in node.relayed_keys():
            owner = node.table.holder(key)
            sink = desk.warm.get(key)
            if owner is None:
                continue  # free: a failover under way (a standby keeps its connection)
            want = standby_for(key, owner, candidates) == node.instance
            if sink is None:
                if want:
                    self._open(key, owner)
            elif sink.standby and sink.target is None:
                if want:
                    self.owners[key] = owner
                    # Forget what the stream got since the last frame came (a quiet fixture).
                    sink.buffer.trim(sink.stream_position())
                elif key not in desk.ready:
                    now = standby_for(key, owner, candidates) or "nobody"
                    desk.cool(key, f"{now} stands by now")

    def _open(self, key: str, owner: str) -> None:
        node = self.node
        desk = node.desk
        sink = desk.warm[key] = WarmSink(lambda: node.relayed_position(key), standby=True)
        if not node.start_warm(key, sink, standby=True):
            del desk.warm[key]
            return
        self.owners[key] = owner
        self.started += 1
        log.info("cluster: %s: standing by for %s: warm connection opening", key, owner)

    def closed(self, key: str, why: str) -> None:
        """The handover desk closed *key*'s standby connection."""
        self.owners.pop(key, None)
        self.dropped += 1
        log.info("cluster: %s: standby dropped (%s): warm connection closed", key, why)

    def promoted_now(self, key: str) -> str | None:
        """*key*'s standby connection was promoted (a take-over without a reconnect); the
        owner it stood by for."""
        self.promoted += 1
        return self.owners.pop(key, None)
