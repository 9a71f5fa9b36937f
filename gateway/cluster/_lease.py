"""This instance's leases: which fixtures it owns, until when, and what to ask Redis next.

No I/O and no clock of its own: every method takes ``now`` (the trio clock, so the rules are
tested under :class:`trio.testing.MockClock`), and the node (``gateway.service``) does the
Redis calls the :class:`LeasePlan` asks for and reports what Redis answered.

The rules (docs/cluster.md):

- A lease is a Redis key holding its owner's *token* (instance name and a random nonce per
  process), with a time to live of ``ttl``. The owner renews it every :func:`tick_interval`.
- Each renewal gives the key a time to live of ``ttl`` plus a round (:attr:`LeaseTable.expiry`,
  the renew margin): ``ttl`` past the next scheduled renewal, so an owner paused for less
  than ``ttl`` (SIGSTOP, a VM freeze, a long GC) never loses its lease in Redis.
- Locally a lease counts as held until ``sent + ttl - margin``, where *sent* is when the
  renewing request was sent: Redis started the key's time to live after that, so the local
  view ends first. A lease past that point is *expired*: its owner publishes nothing more
  and asks Redis at once; it goes on if Redis says the lease is still its own, else it stops
  the fixture's upstream (*fenced*). Unless Redis itself is unreachable (*degraded*: nobody
  else can take the lease from a Redis nobody reaches, and the local fan-out goes on).
- A free lease is tried first by the instance that rendezvous hashing ranks first among the
  live ones; the instance ranked *i* tries after it has seen the lease free for ``i`` ticks
  (the first may be dead but still listed, or may not follow that fixture). A lease whose last
  holder is still live waits :data:`RETAKE_ROUNDS` ticks more: it vanished (Redis lost it) and
  its holder, which asks for its leases with "acquire if free", takes it again first. The
  extra wait is added to the rank's, not taken as a floor, so the ranks keep their order.
- A lease is counted as free only for time in which Redis answered: when a round fails
  (Redis unreachable) the times leases were seen free are forgotten, and until Redis answers
  again nothing is taken (the first round back plans before its reply). Otherwise a lease
  seen free just before an outage (its holder had not taken it again yet) would count the
  whole outage as free time and be taken the moment Redis answers, from a holder that kept
  following it all along.
- A held, *movable* lease (a fixture every instance follows: the config's) whose first-ranked
  instance is another one, live for at least ``ttl``, is released so that one takes it: at most
  ``handovers`` per tick, so a joining instance takes its share gradually. The others see its
  last holder (this one) live and wait :data:`RETAKE_ROUNDS` more; the instance that released
  it waits :data:`HANDBACK_ROUNDS` more, so it comes after them instead of taking the lease
  straight back (and handing it over again next round, a vendor reconnect each time).

Example::

    table = LeaseTable("gw-a", ttl=10.0)
    plan = table.plan(now, followed={"tracking/f1"}, live={"gw-a"}, movable=set())
    # ... Redis: try plan.acquire, renew plan.renew, release plan.release; then for each key:
    table.observed({"tracking/f1": table.token}, sent=now)   # Redis answered: ours
    table.may_publish("tracking/f1", now + 1.0)      # True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Final

import attrs

from gateway.cluster._rendezvous import rank
from gateway.config import MAX_ROUND_INTERVAL, lease_expiry, lease_round_interval, lease_validity

#: Longest pause between two lease rounds; shorter for short TTLs (a quarter of it).
MAX_TICK: Final = MAX_ROUND_INTERVAL
#: Held leases released per tick for rebalancing (a joining instance's share moves gradually).
DEFAULT_HANDOVERS: Final = 5
#: Rounds added to its rank's wait before an instance takes a free lease whose last holder is
#: still live (after Redis lost its data the holder takes it again first: no needless vendor
#: reconnect).
RETAKE_ROUNDS: Final = 2
#: Rounds added to its rank's wait before an instance takes back a lease it handed over: more
#: than the others add (RETAKE_ROUNDS), with a round to spare for the phases of their rounds.
HANDBACK_ROUNDS: Final = RETAKE_ROUNDS + 1


def holder_token(instance: str, nonce: str) -> str:
    """The value a lease key holds: the instance name and a nonce new in every process, so a
    restarted instance never mistakes its previous life's lease for its own."""
    return f"{instance}/{nonce}"


def token_instance(token: str) -> str:
    """The instance name in a lease value (:func:`holder_token`)."""
    return token.rsplit("/", 1)[0]


# The two timing rules live with the config, which checks that ``redis_timeout`` fits
# between them (a Redis that stops answering must be noticed before a lease runs out locally).
tick_interval = lease_round_interval
validity = lease_validity


@attrs.frozen
class LeasePlan:
    """What to ask Redis in one round: keys to acquire or renew, and keys to give up."""

    acquire: frozenset[str]
    renew: frozenset[str]
    release: frozenset[str]


class LeaseTable:
    """See the module docstring. Keys are ``feed/fixture`` strings; instances are names."""

    def __init__(
        self, me: str, ttl: float, *, token: str | None = None, handovers: int = DEFAULT_HANDOVERS
    ) -> None:
        self.me = me
        #: What Redis stores as this instance's holder value (:func:`holder_token`).
        self.token = token if token is not None else me
        self.ttl = ttl
        self.tick = tick_interval(ttl)
        #: The time to live each renewal gives the lease in Redis (``ttl`` past the next one).
        self.expiry = lease_expiry(ttl)
        self.handovers = handovers
        #: Held leases: key -> the local time until which each counts as held.
        self._held: dict[str, float] = {}
        #: Who holds the leases we follow, as Redis last said: a token (None: free).
        self._holders: dict[str, str | None] = {}
        self._free_since: dict[str, float] = {}
        self._last_holder: dict[str, str] = {}
        #: Leases this instance handed over, until it sees another holder or holds them again.
        self._handed: set[str] = set()
        self._seen_live: dict[str, float] = {}
        #: True while Redis is unreachable (the node's last call failed to connect).
        self.degraded = False
        #: When Redis answered again after being unreachable.
        self._back_at = -math.inf

    # -- views -------------------------------------------------------------------------------

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    def holds(self, key: str) -> bool:
        return key in self._held

    def holder(self, key: str) -> str | None:
        """The instance Redis last named as *key*'s owner (None: free or not known)."""
        token = self._holders.get(key)
        return None if token is None else token_instance(token)

    def may_publish(self, key: str, now: float) -> bool:
        """True while this instance may publish *key*'s frames as its owner."""
        until = self._held.get(key)
        return until is not None and (now < until or self.degraded)

    def may_jump(self, now: float) -> bool:
        """Whether a standby may take a free lease without waiting (``first``): not for a
        lease's time after Redis answered again (the owner may not be listed yet)."""
        return now - self._back_at >= self.ttl

    def expired(self, now: float) -> list[str]:
        """Held leases past their local validity (none while degraded): stop their upstreams."""
        if self.degraded:
            return []
        return [key for key, until in self._held.items() if now >= until]

    # -- one round ---------------------------------------------------------------------------

    def plan(
        self,
        now: float,
        *,
        followed: Iterable[str],
        live: Iterable[str],
        movable: Iterable[str] = (),
        first: Iterable[str] = (),
    ) -> LeasePlan:
        """The next round's requests, from what Redis said last round (:meth:`observed`).

        *followed*: the fixtures this instance follows; *live*: the instances with a current
        heartbeat (this one is always counted); *movable*: followed keys every instance
        follows (they may be handed over for balance).
        """
        instances = set(live) | {self.me}
        for name in instances:
            self._seen_live.setdefault(name, now)
        for name in list(self._seen_live):
            if name not in instances:
                del self._seen_live[name]
        followed = set(followed)
        movable = set(movable) & followed
        first = set(first) if self.may_jump(now) else set()
        acquire: set[str] = set()
        release: set[str] = set()
        for key in followed:
            if key in self._held:
                acquire.add(key)  # renewed, or taken again if it vanished (Redis lost it)
                continue
            holder = self._holders.get(key)
            if holder is not None:
                self._free_since.pop(key, None)
                self._last_holder[key] = holder
                self._handed.discard(key)
                continue
            if self.degraded:
                # Redis has not answered since it became unreachable (this is the plan of the
                # first round back, before its reply): what it said before is no view of now.
                # Nothing is taken and no free time counted until it answers.
                continue
            since = self._free_since.setdefault(key, now)
            wait = rank(key, instances).index(self.me)
            last = self._last_holder.get(key)
            if key in first:
                wait = 0
            elif key in self._handed:
                # Handed over: the others wait RETAKE_ROUNDS more (its last holder, this one, is
                # live); this one waits longer, so its target (first-ranked) goes first.
                wait += HANDBACK_ROUNDS
            elif (
                last is not None
                and last != self.token
                and (token_instance(last) in instances or now - self._back_at < self.ttl)
            ):
                # Its owner is alive and takes a vanished lease again in its next round. Just
                # after Redis came back the live set may not list it yet (its heartbeat expired
                # during the outage): assume it is alive for a lease's time.
                wait += RETAKE_ROUNDS
            if now - since >= wait * self.tick:
                acquire.add(key)
        budget = self.handovers
        for key in sorted(self._held):
            if key not in followed:
                release.add(key)
            elif budget > 0 and key in movable:
                first = rank(key, instances)[0]
                if first != self.me and now - self._seen_live[first] >= self.ttl:
                    release.add(key)
                    self._handed.add(key)
                    budget -= 1
        renew = frozenset(k for k in self._held if k not in release)
        for key in list(self._free_since):
            if key not in followed:
                del self._free_since[key]
        for key in list(self._last_holder):
            if key not in followed:
                del self._last_holder[key]
        self._handed &= followed
        return LeasePlan(frozenset(acquire - release), renew, frozenset(release))

    def observed(
        self, holders: Mapping[str, str | None], *, sent: float
    ) -> tuple[set[str], set[str]]:
        """Redis answered a round sent at *sent*: *holders* maps each key asked about to its
        owner now. Returns ``(gained, lost)``: keys this instance holds now but did not, and
        keys it held but does not any more."""
        if self.degraded:
            self._back_at = sent
        self.degraded = False
        gained: set[str] = set()
        lost: set[str] = set()
        for key, holder in holders.items():
            self._holders[key] = holder
            if holder == self.token:
                if key not in self._held:
                    gained.add(key)
                    # Taken again: a handback wait is over. Not on a renewal: the node renews
                    # a lease it is handing over before it releases it.
                    self._handed.discard(key)
                self._held[key] = sent + validity(self.ttl)
                self._free_since.pop(key, None)
            elif key in self._held:
                del self._held[key]
                lost.add(key)
        return gained, lost

    def released(self, key: str) -> None:
        """This instance gave *key* up (or stopped following it)."""
        self._held.pop(key, None)
        self._holders.pop(key, None)
        self._free_since.pop(key, None)

    def unreachable(self) -> None:
        """A round failed: Redis did not answer. Held leases stay held (degraded mode).

        How long a lease has been seen free is forgotten: nothing was seen while Redis was
        away, and a lease seen free just before (its holder had not taken it again yet) may
        be held again by now. Counted again from the first answer after Redis is back, so
        its holder, which kept following it meanwhile, has its rounds to take it again."""
        self.degraded = True
        self._free_since.clear()

    def forget(self, key: str) -> None:
        """*key* is not followed any more (its lease, if held, was released)."""
        self.released(key)
