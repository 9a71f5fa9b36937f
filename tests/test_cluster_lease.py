"""The cluster's lease rules (gateway.cluster: LeaseTable, rendezvous hashing), without Redis.

Most tests drive :class:`LeaseTable` with plain float times: it has no clock of its own, so
``now`` is whatever the test says and every boundary is exact (a handover raced by two or three
instances at chosen round phases too). The last two tests run whole lease rounds of two
instances against an in-memory stand-in for the lease scripts, under
``MockClock(autojump_threshold=0)`` (pytest-trio's ``autojump_clock``): joining, gradual
rebalancing, a death and a paused owner, with the single-owner invariant checked throughout.
"""

from __future__ import annotations

import collections
import copy
import itertools
from collections.abc import Iterable, Mapping, Sequence

import pytest
import trio
import trio.testing

from gateway.cluster import (
    DEFAULT_HANDOVERS,
    HANDBACK_ROUNDS,
    MAX_TICK,
    RETAKE_ROUNDS,
    LeaseTable,
    holder_token,
    rank,
    tick_interval,
    token_instance,
    validity,
)
from tests.kit import wait_until

A, B, C = "gw-a", "gw-b", "gw-c"
TOKEN_A = holder_token(A, "a1a1a1")
TOKEN_B = holder_token(B, "b1b1b1")


def degraded(x: LeaseTable) -> bool:
    """``x.degraded``, read through a call: mypy would otherwise narrow it between two asserts."""
    return x.degraded


def ranked(me: str, position: int, instances: Sequence[str], n: int = 1) -> list[str]:
    """*n* fixture keys for which *me* is ranked *position* among *instances*."""
    out: list[str] = []
    for i in range(10_000):
        key = f"tracking/{i}"
        if rank(key, instances).index(me) == position:
            out.append(key)
            if len(out) == n:
                return out
    raise AssertionError("not enough keys")  # pragma: no cover


# -- rendezvous ---------------------------------------------------------------------------------


def test_rank_is_deterministic_and_ignores_the_order_given() -> None:
    instances = [A, B, C]
    for i in range(50):
        key = f"tracking/{i}"
        first = rank(key, instances)
        assert sorted(first) == sorted(instances)
        assert rank(key, reversed(instances)) == first
        assert rank(key, [C, A, B]) == first
        assert rank(key, instances) == first


def test_rank_is_stable_across_versions() -> None:
    """Every instance of a cluster must compute the same order, also across gateway versions
    during a rolling upgrade: these pinned rankings change only with the hash (a breaking
    change for mixed-version clusters)."""
    assert rank("tracking/f1", [A, B, C]) == [C, A, B]
    assert rank("fastpath/12345", [A, B, C]) == [A, C, B]
    assert rank("tracking/9", [A, B, C]) == [B, A, C]


@pytest.mark.parametrize(
    ("instances", "low", "high"),
    [([A, B], 0.35, 0.65), ([A, B, C], 0.20, 0.47)],
)
def test_rank_spreads_keys_fairly(instances: list[str], low: float, high: float) -> None:
    keys = [f"tracking/{i}" for i in range(200)]
    share = collections.Counter(rank(key, instances)[0] for key in keys)
    assert set(share) == set(instances)
    for name in instances:
        assert low <= share[name] / len(keys) <= high, share


def test_removing_an_instance_moves_only_its_keys() -> None:
    keys = [f"tracking/{i}" for i in range(200)]
    before = {key: rank(key, [A, B, C]) for key in keys}
    after = {key: rank(key, [A, B]) for key in keys}
    moved = 0
    for key in keys:
        if before[key][0] == C:
            moved += 1
            # It goes to the one ranked next: the order of the others is unchanged.
            assert after[key][0] == before[key][1]
        else:
            assert after[key][0] == before[key][0]
        assert after[key] == [n for n in before[key] if n != C]
    assert moved > 0
    # And a joining instance takes keys only for itself.
    joined = {key: rank(key, [A, B, C, "gw-d"])[0] for key in keys}
    assert all(joined[key] in (before[key][0], "gw-d") for key in keys)


# -- timing and tokens --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ttl", "tick", "valid"),
    [(1.0, 0.25, 0.5), (2.0, 0.5, 1.5), (4.0, 1.0, 3.2), (10.0, 1.0, 8.0), (300.0, 1.0, 240.0)],
)
def test_tick_interval_and_validity(ttl: float, tick: float, valid: float) -> None:
    assert tick_interval(ttl) == pytest.approx(tick)
    assert validity(ttl) == pytest.approx(valid)
    table = LeaseTable(A, ttl)
    assert table.tick == pytest.approx(tick)
    assert table.handovers == DEFAULT_HANDOVERS


def test_validity_leaves_room_for_renewals_over_the_whole_ttl_range() -> None:
    for tenth in range(10, 3001):
        ttl = tenth / 10
        tick = tick_interval(ttl)
        assert 0 < tick <= MAX_TICK
        # At least two renewals fit in the local validity, which ends before Redis's TTL.
        assert 2 * tick <= validity(ttl) < ttl
        assert ttl - validity(ttl) >= 0.5


def test_token_names_the_instance() -> None:
    assert token_instance(holder_token("gw-a", "00ff")) == "gw-a"
    assert token_instance(holder_token("host.example:7-12", "abc")) == "host.example:7-12"
    assert holder_token("gw-a", "1") != holder_token("gw-a", "2")


# -- plan: acquiring ----------------------------------------------------------------------------


@pytest.mark.parametrize("position", [0, 1, 2])
def test_rank_i_acquires_after_seeing_the_lease_free_for_i_ticks(position: int) -> None:
    instances = [A, B, C]
    (key,) = ranked(A, position, instances)
    table = LeaseTable(A, ttl=4.0, token=TOKEN_A)  # tick 1.0
    t0 = 100.0
    for i in range(position):
        assert table.plan(t0 + i, followed={key}, live=instances).acquire == frozenset()
        table.observed({key: None}, sent=t0 + i)
        # Just short of its turn: still waiting.
        assert table.plan(t0 + i + 0.999, followed={key}, live=instances).acquire == frozenset()
    plan = table.plan(t0 + position, followed={key}, live=instances)
    assert plan.acquire == {key}
    assert plan.renew == plan.release == frozenset()


def test_the_only_live_instance_is_first_for_everything() -> None:
    keys = [f"tracking/{i}" for i in range(20)]
    table = LeaseTable(A, ttl=10.0, token=TOKEN_A)
    # This instance counts as live even before its heartbeat shows it.
    assert table.plan(0.0, followed=keys, live=()).acquire == frozenset(keys)


def test_seeing_a_holder_restarts_the_free_count() -> None:
    (key,) = ranked(A, 1, [A, B])
    gone = holder_token("gw-gone", "x")  # a holder not in the live set (no retake wait)
    table = LeaseTable(A, ttl=4.0, token=TOKEN_A)
    assert not table.plan(0.0, followed={key}, live=[A, B]).acquire  # free since 0.0
    table.observed({key: gone}, sent=0.0)  # taken meanwhile
    assert not table.plan(1.0, followed={key}, live=[A, B]).acquire
    table.observed({key: None}, sent=1.0)  # and free again
    # Counted from 2.0, not from 0.0: one tick more.
    assert not table.plan(2.0, followed={key}, live=[A, B]).acquire
    table.observed({key: None}, sent=2.0)
    assert not table.plan(2.999, followed={key}, live=[A, B]).acquire
    assert table.plan(3.0, followed={key}, live=[A, B]).acquire == {key}


def test_a_vanished_lease_waits_for_its_live_holder_to_take_it_again() -> None:
    """Redis lost a lease (restart without data): its holder, still live, asks "acquire if
    free" for it in its next round; others wait RETAKE_ROUNDS ticks, even the first-ranked."""
    (key,) = ranked(A, 0, [A, B])
    table = LeaseTable(A, ttl=4.0, token=TOKEN_A)  # tick 1.0
    table.plan(0.0, followed={key}, live=[A, B])
    table.observed({key: TOKEN_B}, sent=0.0)  # B holds it (not yet handed over to A)
    table.plan(1.0, followed={key}, live=[A, B])
    table.observed({key: None}, sent=1.0)  # gone from Redis
    for now in (2.0, 3.0, 2.0 + RETAKE_ROUNDS - 0.001):
        assert not table.plan(now, followed={key}, live=[A, B]).acquire
    assert table.plan(2.0 + RETAKE_ROUNDS, followed={key}, live=[A, B]).acquire == {key}
    # Its holder no longer live: no reason to wait.
    other = LeaseTable(A, ttl=4.0, token=TOKEN_A)
    other.plan(0.0, followed={key}, live=[A, B])
    other.observed({key: TOKEN_B}, sent=0.0)
    other.plan(1.0, followed={key}, live=[A, B])
    other.observed({key: None}, sent=1.0)
    assert other.plan(2.0, followed={key}, live=[A]).acquire == {key}


def test_after_an_outage_a_vanished_lease_waits_even_if_its_holder_is_not_listed() -> None:
    """Redis came back (empty, or after the heartbeats expired): the live set may not list the
    other instances yet, but they are alive and take their leases again. For a lease's time
    after Redis answers again, a free lease last held by another waits RETAKE_ROUNDS ticks."""
    (key,) = ranked(A, 0, [A, B])
    table = LeaseTable(A, ttl=4.0, token=TOKEN_A)  # tick 1.0
    table.plan(0.0, followed={key}, live=[A, B])
    table.observed({key: TOKEN_B}, sent=0.0)
    table.unreachable()  # Redis goes away ...
    table.plan(1.0, followed={key}, live=[A, B])
    table.observed({key: None}, sent=5.0)  # ... and comes back without the lease
    for now in (6.0, 6.0 + RETAKE_ROUNDS - 0.001):
        assert not table.plan(now, followed={key}, live=[A]).acquire
    assert table.plan(6.0 + RETAKE_ROUNDS, followed={key}, live=[A]).acquire == {key}


def test_a_lease_seen_free_just_before_an_outage_is_not_taken_when_redis_answers() -> None:
    """Issue 22's lease defect, as tests/test_cluster_process.py met it: Redis restarts
    with its data after the leases ran out; this instance's first round back sees the other
    one's lease free (its holder has not taken it again yet) and Redis goes away again before
    its next round. When Redis answers again (empty), the lease is *not* taken at once: the
    outage is no time seen free (before the fix it counted, and the instance took the lease
    the moment Redis answered, from a holder that kept following it: a vendor reconnect, the
    holder's appends fenced). It waits RETAKE_ROUNDS rounds from the first answer, as after
    any outage, and is taken only if its holder does not take it again meanwhile."""
    (key,) = ranked(A, 0, [A, B])
    table = LeaseTable(B, ttl=4.0, token=TOKEN_B)  # tick 1.0
    assert not table.plan(0.0, followed={key}, live=[A, B]).acquire
    table.observed({key: TOKEN_A}, sent=0.0)  # A holds it
    table.unreachable()  # Redis stops; restarted with its data after the lease ran out
    # The first round back: A's heartbeat not written yet, nor its lease taken again.
    assert not table.plan(5.0, followed={key}, live=[B]).acquire
    table.observed({key: None}, sent=5.0)
    assert not table.plan(5.0, followed={key}, live=[B]).acquire
    table.unreachable()  # Redis stops again before the next round (A took it meanwhile)
    # Redis answers again, empty: the round's plan (sent before any reply) takes nothing ...
    assert not table.plan(10.0, followed={key}, live=[B]).acquire
    table.observed({key: None}, sent=10.0)
    # ... nor the plan after its reply: free since 10.0, not since 5.0.
    for now in (10.0, 11.0, 10.0 + RETAKE_ROUNDS - 0.001):
        assert not table.plan(now, followed={key}, live=[B]).acquire
        table.observed({key: None}, sent=now)
    # Its holder takes it again in time: nothing to take.
    held = copy.deepcopy(table)
    held.observed({key: TOKEN_A}, sent=11.5)
    assert not held.plan(10.0 + RETAKE_ROUNDS, followed={key}, live=[A, B]).acquire
    # It does not (it died during the outage): taken after those rounds, as after a death.
    assert table.plan(10.0 + RETAKE_ROUNDS, followed={key}, live=[B]).acquire == {key}


def test_a_lease_of_a_previous_life_is_not_taken_while_it_lasts() -> None:
    key = "tracking/f1"
    table = LeaseTable(A, ttl=10.0, token=TOKEN_A)
    previous = holder_token(A, "0ld0ld")
    gained, lost = table.observed({key: previous}, sent=0.0)
    assert gained == lost == set()
    assert not table.holds(key)
    assert table.holder(key) == A  # the name it shows, though not this process's lease
    assert table.plan(1.0, followed={key}, live=[A]).acquire == frozenset()


# -- plan: renewing and releasing ---------------------------------------------------------------


def test_a_held_lease_is_renewed_and_taken_again_if_it_vanished() -> None:
    keys = ["tracking/1", "tracking/2"]
    table = LeaseTable(A, ttl=10.0, token=TOKEN_A)
    table.observed(dict.fromkeys(keys, TOKEN_A), sent=0.0)
    plan = table.plan(1.0, followed=keys, live=[A, B])
    assert plan.renew == frozenset(keys)
    # Asked "acquire if free" too: a lease Redis lost is taken again at once by its holder.
    assert plan.acquire == frozenset(keys)
    assert plan.release == frozenset()


def test_held_keys_no_longer_followed_are_released() -> None:
    keys = ["tracking/1", "tracking/2", "tracking/3"]
    table = LeaseTable(A, ttl=10.0, token=TOKEN_A, handovers=0)
    table.observed(dict.fromkeys(keys, TOKEN_A), sent=0.0)
    plan = table.plan(1.0, followed=keys[:1], live=[A])
    # Not limited by the handover budget (0 here): they are not followed at all.
    assert plan.release == frozenset(keys[1:])
    assert plan.renew == {keys[0]}
    for key in plan.release:
        table.released(key)
    assert table.held == {keys[0]}
    assert not table.may_publish(keys[1], 1.0)


def test_handover_rules() -> None:
    """Only movable keys, only once the first-ranked has been live for a ttl, at most
    ``handovers`` per plan."""
    theirs = ranked(B, 0, [A, B], n=5)  # B should own these
    mine = ranked(A, 0, [A, B], n=2)
    pinned = [k for k in ranked(B, 0, [A, B], n=7) if k not in theirs]  # B-first, not movable
    followed = theirs + mine + pinned
    movable = theirs + mine
    table = LeaseTable(A, ttl=10.0, token=TOKEN_A, handovers=2)

    def plan(now: float, live: Iterable[str]) -> frozenset[str]:
        table.observed(dict.fromkeys(table.held, TOKEN_A), sent=now)
        return table.plan(now, followed=followed, live=live, movable=movable).release

    # A was alone and holds everything.
    assert table.plan(0.0, followed=followed, live=[A]).acquire == frozenset(followed)
    table.observed(dict.fromkeys(followed, TOKEN_A), sent=0.0)
    # B shows up at 5.0: nothing moves until it has been live for a ttl.
    for now in (5.0, 6.0, 14.999):
        assert plan(now, [A, B]) == frozenset()
    released: list[str] = []
    for now in (15.0, 16.0, 17.0, 18.0):
        out = plan(now, [A, B])
        assert len(out) <= 2
        assert out <= set(theirs)
        for key in out:
            table.released(key)
        released += out
    assert sorted(released) == sorted(theirs)
    assert table.held == frozenset(mine + pinned)
    # B leaves and comes back: it must be live for a whole ttl again.
    table.observed(dict.fromkeys(theirs, TOKEN_A), sent=19.0)  # A took them back meanwhile
    assert plan(20.0, [A]) == frozenset()
    assert plan(21.0, [A, B]) == frozenset()
    assert plan(30.999, [A, B]) == frozenset()
    assert len(plan(31.0, [A, B])) == 2


def rounds(
    tables: Mapping[str, tuple[LeaseTable, float]],
    key: str,
    holder: str | None,
    until: float,
) -> list[tuple[float, str, str]]:
    """Whole lease rounds of several instances against one key, with plain times: each table
    plans and observes every tick (1.0) at its own phase, releasing and acquiring as a lease
    round would. Returns what happened: (time, instance, "release" or "acquire")."""
    events = sorted(
        (phase + k, name) for name, (_, phase) in tables.items() for k in range(int(until) + 1)
    )
    live = list(tables)
    out: list[tuple[float, str, str]] = []
    for now, name in events:
        table = tables[name][0]
        plan = table.plan(now, followed=[key], live=live, movable=[key])
        if key in plan.release:
            table.released(key)
            if holder == table.token:
                holder = None
                out.append((now, name, "release"))
        if key in plan.acquire and holder is None:
            holder = table.token
            out.append((now, name, "acquire"))
        table.observed({key: holder}, sent=now)
    return out


@pytest.mark.parametrize(
    ("order", "phases"),
    [
        ([B, A], {A: 0.0, B: 0.1}),
        ([B, A], {A: 0.0, B: 0.5}),
        ([B, A], {A: 0.0, B: 0.95}),
        ([B, C, A], {A: 0.0, B: 0.95, C: 0.05}),  # a third one, ranked between, rounds earlier
        ([B, A, C], {A: 0.0, B: 0.95, C: 0.05}),
    ],
    ids=["two-b-early", "two-b-mid", "two-b-late", "three-a-last", "three-a-second"],
)
def test_a_handed_over_lease_goes_to_its_target_once(
    order: list[str], phases: dict[str, float]
) -> None:
    """The target is first-ranked but sees the last holder (the releaser) live, so it waits
    RETAKE_ROUNDS more; the releaser, ranked second, took it straight back before its turn and
    handed it over again the next round, forever (a vendor reconnect each time); a third
    instance tied with the target and took it in its place."""
    key = next(f"tracking/{i}" for i in range(10_000) if rank(f"tracking/{i}", order) == order)
    tables = {
        name: (LeaseTable(name, ttl=4.0, token=holder_token(name, "n"), handovers=1), phase)
        for name, phase in phases.items()
    }
    tables[A][0].observed({key: token_of(tables, A)}, sent=0.0)  # A took it while alone
    events = rounds(tables, key, token_of(tables, A), until=30.0)
    assert [(name, what) for _, name, what in events] == [(A, "release"), (B, "acquire")]
    released, acquired = (t for t, _, _ in events)
    assert released == 4.0  # A saw B live for a ttl
    # B saw it free in its next round, then waited RETAKE_ROUNDS (A is live) from the one after.
    assert acquired == pytest.approx(4.0 + phases[B] + 1.0 + RETAKE_ROUNDS)


def test_a_handed_over_lease_is_taken_back_if_nobody_takes_it() -> None:
    (key,) = ranked(B, 0, [A, B])
    table = LeaseTable(A, ttl=4.0, token=TOKEN_A)  # tick 1.0; A is ranked second
    table.plan(0.0, followed=[key], live=[A, B], movable=[key])
    table.observed({key: TOKEN_A}, sent=0.0)
    assert table.plan(4.0, followed=[key], live=[A, B], movable=[key]).release == {key}
    table.released(key)
    table.observed({key: None}, sent=4.0)
    table.plan(5.0, followed=[key], live=[A, B], movable=[key])  # free since 5.0
    wait = 1 + HANDBACK_ROUNDS  # its rank's wait and the handback's
    assert not table.plan(5.0 + wait - 0.001, followed=[key], live=[A, B]).acquire
    assert table.plan(5.0 + wait, followed=[key], live=[A, B]).acquire == {key}
    # Taken (by anyone): the handback wait is over for good.
    table.observed({key: TOKEN_A}, sent=9.0)
    table.released(key)  # say, fenced
    table.observed({key: None}, sent=10.0)
    table.plan(11.0, followed=[key], live=[A, B])
    assert table.plan(12.0, followed=[key], live=[A, B]).acquire == {key}


def test_the_renewal_before_a_release_keeps_the_handback_wait() -> None:
    """The node renews its leases before it releases the ones it hands over (so that their
    flushes cannot delay the others' renewal): Redis answers that round with this instance's
    token for the handed-over lease too. That renewal ended the handback wait: the releaser,
    ranked second, took the lease back a round later, before its target's RETAKE_ROUNDS were
    over, and handed it over again, for good (tests/test_cluster_process.py)."""
    (key,) = ranked(B, 0, [A, B])
    table = LeaseTable(A, ttl=4.0, token=TOKEN_A)  # tick 1.0; A is ranked second
    table.plan(0.0, followed=[key], live=[A, B], movable=[key])
    table.observed({key: TOKEN_A}, sent=0.0)
    assert table.plan(4.0, followed=[key], live=[A, B], movable=[key]).release == {key}
    table.observed({key: TOKEN_A}, sent=4.0)  # the round's renewal, before the release
    table.released(key)
    table.plan(5.0, followed=[key], live=[A, B], movable=[key])
    table.observed({key: None}, sent=5.0)  # free since 5.0 (the released marker)
    wait = 1 + HANDBACK_ROUNDS
    for now in (6.0, 7.0, 5.0 + wait - 0.001):
        assert not table.plan(now, followed=[key], live=[A, B], movable=[key]).acquire, now


def token_of(tables: Mapping[str, tuple[LeaseTable, float]], name: str) -> str:
    return tables[name][0].token


def test_no_handover_when_the_first_ranked_is_this_instance() -> None:
    mine = ranked(A, 0, [A, B], n=3)
    table = LeaseTable(A, ttl=1.0, token=TOKEN_A)
    table.observed(dict.fromkeys(mine, TOKEN_A), sent=0.0)
    table.plan(0.0, followed=mine, live=[A, B], movable=mine)
    assert table.plan(100.0, followed=mine, live=[A, B], movable=mine).release == frozenset()


# -- observed, publishing, degraded -------------------------------------------------------------


def test_observed_reports_gained_and_lost() -> None:
    k1, k2, k3, k4 = (f"tracking/{i}" for i in range(4))
    table = LeaseTable(A, ttl=10.0, token=TOKEN_A)
    other_life = holder_token(A, "another-nonce")
    gained, lost = table.observed({k1: TOKEN_A, k2: TOKEN_B, k3: None, k4: other_life}, sent=0.0)
    assert (gained, lost) == ({k1}, set())
    assert table.held == {k1}
    assert (table.holder(k1), table.holder(k2), table.holder(k3)) == (A, B, None)
    # Same instance name, another nonce: not this process's lease.
    assert not table.holds(k4)
    # Renewed: neither gained nor lost.
    assert table.observed({k1: TOKEN_A}, sent=1.0) == (set(), set())
    # Taken by another instance, or expired in Redis: lost.
    assert table.observed({k1: TOKEN_B}, sent=2.0) == (set(), {k1})
    assert table.observed({k1: TOKEN_A, k2: TOKEN_A}, sent=3.0) == ({k1, k2}, set())
    assert table.observed({k1: None, k2: other_life}, sent=4.0) == (set(), {k1, k2})
    assert table.held == frozenset()


def test_may_publish_until_sent_plus_validity() -> None:
    key = "tracking/f1"
    table = LeaseTable(A, ttl=10.0, token=TOKEN_A)
    assert not table.may_publish(key, 0.0)
    table.observed({key: TOKEN_A}, sent=50.0)
    until = 50.0 + validity(10.0)  # 58.0
    assert table.may_publish(key, 50.0)
    assert table.may_publish(key, until - 0.001)
    assert table.expired(until - 0.001) == []
    assert not table.may_publish(key, until)
    assert table.expired(until) == [key]
    assert not table.may_publish("tracking/other", 51.0)
    # A renewal sent later extends it from when it was sent, not from when it was answered.
    table.observed({key: TOKEN_A}, sent=57.0)
    assert table.may_publish(key, 57.0 + validity(10.0) - 0.001)
    assert not table.may_publish(key, 57.0 + validity(10.0))


def test_degraded_keeps_publishing_until_redis_answers() -> None:
    key, lost_key = "tracking/f1", "tracking/f2"
    table = LeaseTable(A, ttl=10.0, token=TOKEN_A)
    table.observed({key: TOKEN_A, lost_key: TOKEN_A}, sent=0.0)
    table.unreachable()
    assert degraded(table)
    # Nobody can take a lease from a Redis nobody reaches: the fan-out goes on.
    assert table.may_publish(key, 100.0)
    assert table.expired(100.0) == []
    # Degraded mode never makes a lease this instance does not hold publishable.
    assert not table.may_publish("tracking/never", 100.0)
    # Redis answers again: degraded ends, the answer counts.
    gained, lost = table.observed({key: TOKEN_A, lost_key: TOKEN_B}, sent=100.0)
    assert (gained, lost) == (set(), {lost_key})
    assert not degraded(table)
    assert not table.may_publish(lost_key, 100.0)
    assert table.may_publish(key, 100.0 + validity(10.0) - 0.001)
    assert not table.may_publish(key, 100.0 + validity(10.0))
    assert table.expired(100.0 + validity(10.0)) == [key]


def test_released_and_forget() -> None:
    key = "tracking/f1"
    table = LeaseTable(A, ttl=10.0, token=TOKEN_A)
    table.observed({key: TOKEN_A}, sent=0.0)
    table.released(key)
    assert not table.holds(key)
    assert not table.may_publish(key, 0.0)
    assert table.holder(key) is None
    table.observed({key: TOKEN_A}, sent=1.0)
    table.forget(key)
    assert table.held == frozenset()


# -- whole rounds under MockClock ---------------------------------------------------------------

#: Each request's trip to the fake Redis (so Redis's time is after the local "sent").
LATENCY = 0.002


class FakeLeaseRedis:
    """The LEASES, RELEASE and HEARTBEAT scripts' semantics, in memory, on the trio clock."""

    def __init__(self) -> None:
        self.stored: dict[str, tuple[str, float]] = {}
        self.beats: dict[str, float] = {}

    def holder(self, key: str) -> str | None:
        held = self.stored.get(key)
        if held is None or held[1] <= trio.current_time():
            self.stored.pop(key, None)
            return None
        return held[0]

    async def heartbeat(self, name: str, ttl: float) -> set[str]:
        await trio.sleep(LATENCY)
        now = trio.current_time()
        self.beats[name] = now + ttl
        return {n for n, until in self.beats.items() if until > now}

    async def leases(
        self, token: str, ttl: float, modes: Mapping[str, str]
    ) -> dict[str, str | None]:
        await trio.sleep(LATENCY)
        out: dict[str, str | None] = {}
        for key, mode in modes.items():
            cur = self.holder(key)
            if cur == token or (cur is None and mode == "a"):
                self.stored[key] = (token, trio.current_time() + ttl)
                cur = token
            out[key] = cur
        return out

    async def release(self, token: str, keys: Iterable[str]) -> None:
        await trio.sleep(LATENCY)
        for key in keys:
            if self.holder(key) == token:
                del self.stored[key]


class Member:
    """One instance's lease rounds, as the node runs them (heartbeat, release, acquire/renew)."""

    def __init__(self, redis: FakeLeaseRedis, name: str, keys: Sequence[str]) -> None:
        self.redis = redis
        self.table = LeaseTable(name, ttl=4.0, token=holder_token(name, "n0nce"), handovers=2)
        self.keys = keys
        #: (time, leases held) after each round.
        self.rounds: list[tuple[float, frozenset[str]]] = []
        self.handed_over = 0
        #: Set to an unset event to freeze this instance before its next round (SIGSTOP).
        self.frozen: trio.Event | None = None
        #: Leases past their local validity when a round began (the node fences them).
        self.expired: list[tuple[float, list[str]]] = []
        self.lost: set[str] = set()

    async def run(self) -> None:
        table, redis = self.table, self.redis
        while True:
            if self.frozen is not None:
                await self.frozen.wait()
            self.expired.append((trio.current_time(), table.expired(trio.current_time())))
            live = await redis.heartbeat(table.me, table.ttl)
            plan = table.plan(trio.current_time(), followed=self.keys, live=live, movable=self.keys)
            for key in plan.release:
                table.released(key)
            if plan.release:
                self.handed_over += len(plan.release)
                await redis.release(table.token, plan.release)
            sent = trio.current_time()
            modes = {key: "a" if key in plan.acquire else "-" for key in self.keys}
            _, lost = table.observed(await redis.leases(table.token, table.ttl, modes), sent=sent)
            self.lost |= lost
            assert table.expired(trio.current_time()) == []
            self.rounds.append((trio.current_time(), table.held))
            await trio.sleep(table.tick)


def token(member: Member) -> str:
    return member.table.token


async def _run_in(scope: trio.CancelScope, member: Member) -> None:
    with scope:
        await member.run()


async def single_owner(
    redis: FakeLeaseRedis, members: Sequence[Member], keys: Sequence[str]
) -> None:
    """Check, all along: at most one instance may publish a key, and only while Redis still
    holds its token (the local view of a lease always ends first)."""
    while True:
        now = trio.current_time()
        for key in keys:
            owners = [m for m in members if m.table.may_publish(key, now)]
            assert len(owners) <= 1, (key, now, [m.table.me for m in owners])
            for m in owners:
                assert redis.holder(key) == m.table.token, (key, now)
        await trio.sleep(0.01)


async def test_lease_rounds_join_rebalance_and_death(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keys = [f"tracking/{i}" for i in range(12)]
    first = {key: rank(key, [A, B])[0] for key in keys}
    b_share = sorted(k for k in keys if first[k] == B)
    assert len(b_share) >= 4  # enough to see the handovers spread over rounds
    redis = FakeLeaseRedis()
    a, b = Member(redis, A, keys), Member(redis, B, keys)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(single_owner, redis, [a, b], keys)
            nursery.start_soon(a.run)
            # Alone, A takes everything in its first round.
            await wait_until(lambda: a.table.held == frozenset(keys), timeout=1.0)
            joined = trio.current_time()
            b_life = trio.CancelScope()
            nursery.start_soon(_run_in, b_life, b)
            await wait_until(
                lambda: all(redis.holder(k) == token(a if first[k] == A else b) for k in keys),
                timeout=4.0 + 10.0,
            )
            balanced = trio.current_time()
            assert a.table.held == frozenset(k for k in keys if first[k] == A)
            assert b.table.held == frozenset(b_share)
            # Nothing moved before B had been live for a ttl, then at most 2 per A's round,
            # and each key once (no lease bounced back to A).
            for t, held in a.rounds:
                if t < joined + 4.0:
                    assert held == frozenset(keys)
            for (_, before), (_, after) in itertools.pairwise(a.rounds):
                assert len(before - after) <= 2
            assert a.handed_over == len(b_share)
            assert balanced - joined < 4.0 + len(b_share) * 1.5 + 3.0
            # B dies (no goodbye): A has everything again within about a ttl.
            b_life.cancel()
            died = trio.current_time()
            await wait_until(lambda: a.table.held == frozenset(keys), timeout=10.0)
            assert trio.current_time() - died <= 4.0 + 3 * 1.0
            nursery.cancel_scope.cancel()


async def test_lease_rounds_paused_owner(autojump_clock: trio.testing.MockClock) -> None:
    """An owner frozen past its lease (SIGSTOP, a VM pause): its local view ends before Redis
    lets the other instance take over, and on waking it finds every lease expired (the node
    fences them) before it learns it lost them."""
    keys = [f"tracking/{i}" for i in range(12)]
    first = {key: rank(key, [A, B])[0] for key in keys}
    b_share = frozenset(k for k in keys if first[k] == B)
    redis = FakeLeaseRedis()
    a, b = Member(redis, A, keys), Member(redis, B, keys)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(single_owner, redis, [a, b], keys)
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)
            await wait_until(lambda: b.table.held == b_share, timeout=30.0)
            assert not any(expired for _, expired in b.expired)
            b.frozen = trio.Event()
            await wait_until(lambda: a.table.held == frozenset(keys), timeout=10.0)
            b.frozen.set()
            woke = trio.current_time()
            await wait_until(lambda: b.lost == b_share, timeout=2.0)
            expired_on_waking = [e for t, e in b.expired if t >= woke]
            assert sorted(expired_on_waking[0]) == sorted(b_share)
            # And B gets its share back by handover, once A has seen it live for a ttl again.
            await wait_until(lambda: b.table.held == b_share, timeout=30.0)
            nursery.cancel_scope.cancel()
