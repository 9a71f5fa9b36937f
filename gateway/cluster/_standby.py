"""Hot standby (``[cluster] standby = true``): which instance stands by for a fixture.

For every fixture one instance besides its owner keeps a *warm* vendor connection (the
planned handovers' :class:`~gateway.cluster.WarmSink`: it publishes and appends nothing and
keeps the frames the stream does not have yet, by vendor position). When the owner dies, the
standby takes the lease first (:class:`~gateway.cluster.LeaseTable` gives it no wait: see
``first`` in its ``plan``), appends from its buffer what the stream lacks and goes on live on
the same connection: no reconnect on the failure path.

Who stands by is rendezvous hashing again, so every instance computes the same answer from
the same view, with no coordination: the instance ranked first for the fixture among the
*candidates* (live, heard - not silent - and not stopping), the owner left out. In steady
state the owner is the first-ranked instance, so the standby is the second-ranked one; when
an instance joins, leaves or dies, only the fixtures whose first two ranks it touched change
standby.

No I/O, no clock: the node (``gateway.service``) applies it every round.

Example::

    >>> standby_for("tracking/f1", "gw-a", {"gw-a"}) is None   # nobody else to stand by
    True
    >>> standby_for("tracking/f1", "gw-a", {"gw-a", "gw-b"})
    'gw-b'
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.cluster._rendezvous import rank


def standby_for(key: str, owner: str | None, candidates: Iterable[str]) -> str | None:
    """The instance that stands by for fixture *key* owned by *owner* (an instance name;
    None: the lease is free), among *candidates* (live, heard, not stopping); None when
    there is no other candidate."""
    others = [name for name in candidates if name != owner]
    if not others:
        return None
    return rank(key, others)[0]
