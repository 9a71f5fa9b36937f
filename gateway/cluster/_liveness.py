"""Which live instances have gone silent: listed in Redis, but not heard from for rounds.

An instance killed without its goodbye (kill -9, power) stays in the live set until its
heartbeat expires, and owns its leases until they run out: for that long the others would list
it and show its fixtures in the state it last wrote (``live``) while nothing arrives. Each
instance's heartbeat carries a counter that it increases every round (``beat`` in its info);
an instance whose counter has not moved for :data:`SILENT_ROUNDS` rounds of the observer's is
*silent*: the others show its fixtures as taken over soon (``connecting``) and list it as
silent, with how long, until it is heard again or drops out of the live set.

No I/O and no clock of its own: every method takes ``now`` (the trio clock).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

#: Rounds without a new heartbeat after which an instance counts as silent (a round of its
#: own may be late by up to one of ours, and one heartbeat may be lost with a failed request).
SILENT_ROUNDS: Final = 3
#: The key of the heartbeat info that carries the round counter.
BEAT_KEY: Final = "beat"


class Liveness:
    """See the module docstring."""

    def __init__(self, me: str, tick: float) -> None:
        self.me = me
        self.limit = SILENT_ROUNDS * tick
        self._beats: dict[str, Any] = {}
        #: When each instance's counter last moved (or it was first listed).
        self._heard: dict[str, float] = {}

    def observed(self, live: Mapping[str, Mapping[str, Any]], now: float) -> None:
        """The live set as the last heartbeat returned it (name -> info)."""
        for name, info in live.items():
            beat = info.get(BEAT_KEY)
            if name not in self._heard or beat != self._beats.get(name):
                self._beats[name] = beat
                self._heard[name] = now
        for name in list(self._heard):
            if name not in live:
                del self._heard[name]
                self._beats.pop(name, None)

    def silent_for(self, name: str, now: float) -> float | None:
        """Seconds since *name* was last heard, if that is longer than the limit; else None
        (this instance is never silent to itself)."""
        if name == self.me:
            return None
        heard = self._heard.get(name)
        if heard is None or now - heard < self.limit:
            return None
        return now - heard
