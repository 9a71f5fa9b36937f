"""Pure pieces of gateway.upstream: backoff, connect limiter, auth gate, message classification,
resume.

No sockets. Time-dependent tests run under MockClock(autojump_threshold=0) via pytest-trio's
``autojump_clock`` fixture, so virtual seconds cost nothing and timings are exact.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
import time

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from gateway.upstream import (
    ALL_FRAMES,
    BACKFILL_MARGIN,
    BACKFILL_SAFETY,
    BACKFILL_WIDEN,
    DATA_AGE_BUCKETS,
    DATA_AGE_SAMPLE_EVERY,
    FALLBACK_RATE,
    MAX_WIDENINGS,
    PROMOTE_AFTER,
    AuthGate,
    Backoff,
    ConnectLimiter,
    DataAge,
    FastpathResume,
    Kind,
    Message,
    Priority,
    TrackingResume,
    Verdict,
    classify_fastpath,
    classify_reference,
    classify_tracking,
    parser_reusable,
)


class _MaxRandom(random.Random):
    """uniform() returns its upper bound: the backoff ceiling becomes observable."""

    def uniform(self, a: float, b: float) -> float:
        return b


# -- backoff -----------------------------------------------------------------------------------


def test_backoff_ceiling_doubles_and_caps() -> None:
    b = Backoff(0.5, 4.0, 60.0, rng=_MaxRandom())
    assert [b.next_delay() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]


def test_backoff_full_jitter_stays_in_bounds() -> None:
    b = Backoff(0.5, 30.0, 60.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(200)]
    for n, d in enumerate(delays):
        assert 0.0 <= d <= min(30.0, 0.5 * 2**n)
    # Full jitter really spreads: capped draws are not all near the cap.
    capped = delays[10:]
    assert min(capped) < 10.0 < max(capped)


def test_backoff_huge_failure_count_stays_finite() -> None:
    b = Backoff(0.5, 30.0, 60.0, rng=_MaxRandom())
    b.failures = 10_000
    assert b.next_delay() == 30.0


def test_backoff_resets_only_after_long_live_connection() -> None:
    b = Backoff(1.0, 64.0, 60.0, rng=_MaxRandom())
    for _ in range(4):
        b.next_delay()
    b.connection_ended(59.9)
    assert b.next_delay() == 16.0
    b.connection_ended(60.0)
    assert b.next_delay() == 1.0


def test_backoff_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="initial <= maximum"):
        Backoff(5.0, 1.0, 60.0)


# -- limiter -----------------------------------------------------------------------------------


async def test_limiter_spacing_and_fifo(autojump_clock: trio.testing.MockClock) -> None:
    limiter = ConnectLimiter(5.0)
    grants: list[tuple[int, float]] = []

    async def one(i: int) -> None:
        await limiter.acquire()
        grants.append((i, trio.current_time()))

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(one, i)
            await trio.testing.wait_all_tasks_blocked()  # queue in a known order
    assert [i for i, _ in grants] == list(range(20))
    times = [t for _, t in grants]
    assert all(b - a >= 0.2 - 1e-9 for a, b in itertools.pairwise(times))
    assert times[-1] - times[0] == pytest.approx(19 * 0.2)


async def test_limiter_cancelled_waiter_takes_no_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = ConnectLimiter(1.0)
    await limiter.acquire()
    t0 = trio.current_time()
    with trio.move_on_after(0.5):
        await limiter.acquire()  # cancelled while waiting for its slot
    await limiter.acquire()
    # The next grant is one interval after the last real grant, not two.
    assert trio.current_time() - t0 == pytest.approx(1.0)


async def test_limiter_rate_change(autojump_clock: trio.testing.MockClock) -> None:
    limiter = ConnectLimiter(1.0)
    await limiter.acquire()
    t0 = trio.current_time()
    limiter.set_rate(10.0)
    await limiter.acquire()
    assert trio.current_time() - t0 == pytest.approx(0.1)
    with pytest.raises(ValueError, match="> 0"):
        limiter.set_rate(0)


async def test_limiter_urgent_attempts_go_ahead_of_the_backlog(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """300 ids PUT through the API once made a real fixture wait 60 s: the backlog goes last."""
    limiter = ConnectLimiter(5.0)
    grants: list[str] = []

    async def one(name: str, backlog: bool) -> None:
        await limiter.acquire(backlog=backlog)
        grants.append(name)

    async with trio.open_nursery() as nursery:
        for i in range(30):
            nursery.start_soon(one, f"new{i}", True)
            await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(1.0)  # the backlog has the limiter to itself meanwhile
        assert limiter.waiting == (0, 30 - len(grants))
        nursery.start_soon(one, "configured", False)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(one, "reconnect", False)
        await trio.testing.wait_all_tasks_blocked()
    # At most the one backlog attempt already sleeping for its slot goes before them.
    first_urgent = grants.index("configured")
    assert grants[first_urgent + 1] == "reconnect"
    assert first_urgent <= 7
    assert [g for g in grants if g.startswith("new")] == [f"new{i}" for i in range(30)]


async def test_limiter_spacing_holds_across_both_queues(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = ConnectLimiter(5.0)
    times: list[float] = []

    async def one(backlog: bool) -> None:
        await limiter.acquire(backlog=backlog)
        times.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(one, i % 2 == 0)
        # Urgent ones arriving while a backlog waiter sleeps for its slot must not share it.
        await trio.sleep(0.1)
        for _ in range(5):
            nursery.start_soon(one, False)
    assert len(times) == 25
    assert all(b - a >= 0.2 - 1e-9 for a, b in itertools.pairwise(sorted(times)))


async def test_limiter_cancelled_backlog_head_passes_the_turn_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = ConnectLimiter(1.0)
    await limiter.acquire()
    done: list[str] = []

    async def one(name: str, backlog: bool) -> None:
        await limiter.acquire(backlog=backlog)
        done.append(name)

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery, trio.open_nursery() as inner:
        inner.start_soon(one, "b", True)  # head of the line, sleeping for its slot
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(one, "c", True)  # queued behind it
        await trio.testing.wait_all_tasks_blocked()
        inner.cancel_scope.cancel()  # the head leaves: c gets b's slot, not a later one
    assert done == ["c"]
    assert trio.current_time() - t0 == pytest.approx(1.0)
    assert limiter.waiting == (0, 0)


class _Queued:
    """Named attempts at one limiter with priorities a test changes while they wait."""

    def __init__(self, limiter: ConnectLimiter, nursery: trio.Nursery) -> None:
        self.limiter = limiter
        self.nursery = nursery
        self.priority: dict[str, Priority] = {}
        self.grants: list[tuple[str, float]] = []

    @property
    def order(self) -> list[str]:
        return [name for name, _ in self.grants]

    async def add(
        self, name: str, priority: Priority | None = None, *, backlog: bool = False
    ) -> None:
        """Queue *name* and return once it waits (arrival order is the order of calls)."""
        self.priority[name] = priority if priority is not None else Priority()

        async def one() -> None:
            await self.limiter.acquire(backlog=backlog, priority=lambda: self.priority[name])
            self.grants.append((name, trio.current_time()))

        self.nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()


async def test_limiter_watched_then_recent_then_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A take-over queues many attempts at once: the ones people watch connect first."""
    limiter = ConnectLimiter(5.0)
    await limiter.acquire()  # the next slot is 0.2 s away: everything below waits
    async with trio.open_nursery() as nursery:
        q = _Queued(limiter, nursery)
        await q.add("plain1")
        await q.add("old", Priority(last_active=100.0))
        await q.add("watched1", Priority(watched=True))
        await q.add("recent", Priority(last_active=200.0))
        await q.add("watched2", Priority(watched=True, last_active=50.0))
        await q.add("plain2")
        await q.add("urgent-less", Priority(watched=True), backlog=True)
    # Watched in arrival order, then by recency, then the rest; the backlog stays last.
    assert q.order == [
        "watched1",
        "watched2",
        "recent",
        "old",
        "plain1",
        "plain2",
        "urgent-less",
    ]
    times = [t for _, t in q.grants]
    assert all(b - a == pytest.approx(0.2) for a, b in itertools.pairwise(times))


async def test_limiter_a_subscriber_moves_a_waiting_fixture_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The priority is read when the slot is granted: even the attempt already sleeping for
    the next slot gives it up to a fixture that got a subscriber meanwhile."""
    limiter = ConnectLimiter(1.0)
    await limiter.acquire()
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        q = _Queued(limiter, nursery)
        for i in range(5):
            await q.add(f"f{i}")
        await trio.sleep(0.5)  # f0 sleeps for the slot at t0 + 1
        q.priority["f4"] = Priority(watched=True)
    assert q.order == ["f4", "f0", "f1", "f2", "f3"]
    assert [t - t0 for _, t in q.grants] == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])


async def test_limiter_cancelled_watched_waiter_passes_its_slot_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = ConnectLimiter(1.0)
    await limiter.acquire()
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        q = _Queued(limiter, nursery)
        await q.add("plain")
        async with trio.open_nursery() as inner:
            watched = functools.partial(limiter.acquire, priority=lambda: Priority(watched=True))
            inner.start_soon(watched)
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0.5)  # the watched one sleeps for the slot, then leaves
            inner.cancel_scope.cancel()
    assert q.order == ["plain"]
    assert q.grants[0][1] == pytest.approx(t0 + 1.0)
    assert limiter.waiting == (0, 0)


async def test_limiter_no_attempt_waits_forever_behind_watched_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Watched fixtures arriving faster than the rate would pass an unwatched one forever:
    after PROMOTE_AFTER it joins the watched ones in its arrival order, so it goes next."""
    limiter = ConnectLimiter(1.0)
    await limiter.acquire()
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        q = _Queued(limiter, nursery)
        await q.add("unwatched", Priority(last_active=1e12))
        i = 0
        while "unwatched" not in q.order:
            await q.add(f"w{i}", Priority(watched=True))
            i += 1
            await trio.sleep(0.5)
            assert trio.current_time() - t0 < 2 * PROMOTE_AFTER
        nursery.cancel_scope.cancel()
    granted = dict(q.grants)["unwatched"] - t0
    assert PROMOTE_AFTER <= granted <= PROMOTE_AFTER + 1.0 + 1e-9
    # Until then every slot (1 s, 2 s, ... after the first grant) went to a watched fixture.
    before = q.order[: q.order.index("unwatched")]
    assert before == [f"w{i}" for i in range(round(PROMOTE_AFTER) - 1)]


# -- auth gate ---------------------------------------------------------------------------------


@attrs.define
class RefusedFleet:
    """Fixtures at one :class:`AuthGate`, each attempting again whenever the gate lets it go:
    an attempt is refused while ``vendor_accepts`` is False, else it goes live (``accepted``)."""

    gate: AuthGate = attrs.field(factory=AuthGate)
    vendor_accepts: bool = False
    probe_interval: float = 2.0
    give_up_after: float = 60.0
    attempts: list[tuple[str, float]] = attrs.field(factory=list)
    live: dict[str, float] = attrs.field(factory=dict)

    async def fixture(self, name: str) -> None:
        try:
            while True:  # refused once to begin with
                await self.gate.refused(
                    name, probe_interval=self.probe_interval, give_up_after=self.give_up_after
                )
                self.attempts.append((name, trio.current_time()))
                if self.vendor_accepts:
                    self.live[name] = trio.current_time()
                    self.gate.accepted()
                    return
        finally:
            self.gate.leave(name)

    def probers(self) -> set[str]:
        """The fixtures that attempted: each one probed (or was released)."""
        return {name for name, _ in self.attempts}


def prober(gate: AuthGate) -> object | None:
    """The gate's prober, read through a call: mypy would narrow ``gate.prober`` after an
    ``assert gate.prober == "a"`` and call a later comparison with "b" unreachable."""
    return gate.prober


async def test_gate_probes_at_a_steady_interval_without_doubling(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Refusals in a row once doubled the wait up to 60 s; the probe keeps its interval."""
    fleet = RefusedFleet()
    t0 = trio.current_time()
    with trio.move_on_after(40.5):
        await fleet.fixture("a")
    times = [t - t0 for _, t in fleet.attempts]
    assert times == pytest.approx([2.0 * i for i in range(1, 21)])
    assert fleet.gate.probes == 20


async def test_gate_sends_one_probe_at_a_time_however_many_fixtures(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fleet = RefusedFleet()
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(fleet.fixture, f"f{i}")
        await trio.sleep(30.5)
        assert fleet.gate.waiting == 50
        nursery.cancel_scope.cancel()
    assert len(fleet.attempts) == 15  # one every 2 s, not 50 fixtures each on its own
    assert len(fleet.probers()) == 1
    assert [t - t0 for _, t in fleet.attempts] == pytest.approx([2.0 * i for i in range(1, 16)])
    assert fleet.gate.prober is None and fleet.gate.waiting == 0


async def test_gate_releases_every_waiter_when_the_probe_is_accepted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """However many refusals came before, all go at the first accepted probe."""
    fleet = RefusedFleet(give_up_after=600.0)  # no waiter retries on its own meanwhile
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(fleet.fixture, f"f{i}")
        await trio.sleep(300.5)  # 150 refused probes
        fleet.vendor_accepts = True
    assert len(fleet.live) == 20
    # The next probe (at 302 s) is accepted; the other 19 go at that instant.
    assert sorted(t - t0 for t in fleet.live.values()) == pytest.approx([302.0] * 20)
    assert len(fleet.attempts) == 150 + 20
    assert fleet.gate.prober is None and fleet.gate.waiting == 0


async def test_gate_releases_on_rotation_and_on_another_fixture_going_live(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fleet = RefusedFleet(vendor_accepts=True)
    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(fleet.fixture, f"f{i}")
        await trio.sleep(0.5)
        fleet.gate.release()  # the token file changed: no waiting for the probe
    assert list(fleet.live.values()) == pytest.approx([trio.current_time()] * 3)
    fleet = RefusedFleet(vendor_accepts=True)
    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(fleet.fixture, f"f{i}")
        await trio.sleep(0.5)
        t = trio.current_time()
        fleet.gate.accepted()  # a fixture that never waited went live
    assert list(fleet.live.values()) == pytest.approx([t] * 3)
    fleet.gate.accepted()  # nobody waits: nothing happens
    assert fleet.gate.waiting == 0


async def test_gate_hands_the_probe_on_when_the_prober_leaves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fleet = RefusedFleet()
    first = trio.CancelScope()

    async def a() -> None:
        with first:
            await fleet.fixture("a")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(a)
        await trio.testing.wait_all_tasks_blocked()
        assert prober(fleet.gate) == "a"
        nursery.start_soon(fleet.fixture, "b")
        await trio.sleep(4.5)  # a probed at 2 and 4; b waits
        assert fleet.probers() == {"a"}
        assert prober(fleet.gate) == "a"
        removed = trio.current_time()
        first.cancel()  # a is removed while it waits: b takes the probe, one interval later
        await trio.testing.wait_all_tasks_blocked()
        assert prober(fleet.gate) == "b"
        await trio.sleep(2.5)
        nursery.cancel_scope.cancel()
    name, at = fleet.attempts[-1]
    assert name == "b" and at == pytest.approx(removed + 2.0)
    assert fleet.gate.prober is None


async def test_gate_prober_that_gives_up_the_role_between_attempts_hands_it_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The prober's attempt ended otherwise (a drop): :meth:`leave` frees the role."""
    gate = AuthGate()
    fleet = RefusedFleet(gate=gate)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fleet.fixture, "b")
        await trio.testing.wait_all_tasks_blocked()
        assert prober(gate) == "b"
        nursery.cancel_scope.cancel()
    assert gate.prober is None
    async with trio.open_nursery() as nursery:
        await gate.refused("a", probe_interval=2.0, give_up_after=60.0)  # a probes now
        nursery.start_soon(fleet.fixture, "b")
        await trio.testing.wait_all_tasks_blocked()
        assert prober(gate) == "a"  # held during a's attempt: b waits
        gate.leave("a")
        await trio.testing.wait_all_tasks_blocked()
        assert prober(gate) == "b"
        nursery.cancel_scope.cancel()


async def test_gate_waiters_retry_on_their_own_after_give_up_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``unauthorized_retry`` still bounds every wait (a vendor refusing one fixture, not the
    token, is retried), and caps the probe interval."""
    fleet = RefusedFleet(probe_interval=100.0, give_up_after=10.0)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fleet.fixture, "a")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(fleet.fixture, "b")
        await trio.sleep(10.5)
        nursery.cancel_scope.cancel()
    assert sorted(fleet.attempts) == [("a", t0 + 10.0), ("b", t0 + 10.0)]  # both, together


# -- classification ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        ('{"id":"f","ix":7,"mt":5}', Kind.DATA),
        ('{"message":"Authorisation accepted","level":"INFO"}', Kind.ACCEPTED),
        ('{"message":"Heartbeat sent at 2023-05-01T00:03:11.822Z","level":"INFO"}', Kind.HEARTBEAT),
        ('{"message":"Could not find fixture topic soccer.x","level":"WARN"}', Kind.NOT_FOUND),
        (
            '{"message":"Authentication message had incorrect format","level":"ERROR"}',
            Kind.AUTH_ERROR,
        ),
        ('{"errorMessage":"Supplied token could not be authenticated"}', Kind.AUTH_ERROR),
        ('{"error":"nope","status":401}', Kind.AUTH_ERROR),
        ('{"error":"gone","status":404}', Kind.NOT_FOUND),
        ('{"error":"busy","status":503}', Kind.ERROR),
        ('{"message":"Something else","level":"INFO"}', Kind.INFO),
        ("The supplied authentication is invalid", Kind.AUTH_ERROR),
        ("not json at all", Kind.MALFORMED),
        ("[1,2,3]", Kind.MALFORMED),
        ('{"ix":true}', Kind.MALFORMED),
        ('{"ix":"7"}', Kind.MALFORMED),
        ("{", Kind.MALFORMED),
        ("", Kind.MALFORMED),
    ],
)
def test_classify_tracking(raw: str, kind: Kind) -> None:
    assert classify_tracking(raw).kind is kind


def test_classify_tracking_seq() -> None:
    assert classify_tracking('{"ix":41}').seq == 41


@pytest.mark.parametrize(
    ("raw", "kind", "seq"),
    [
        (
            '{"fixtureAction":{"fixtureSeqNum":1048,"period":4},"fixtureSummary":{}}',
            Kind.DATA,
            1048,
        ),
        ('{"fixtureSeqNum":3}', Kind.DATA, 3),
        (
            '{"timestamp":"t","eventElementType":"ConnectionStateChanged","state":"Connected"}',
            Kind.UNSEQUENCED,
            None,
        ),
        ('{"message":"Heartbeat sent at x","level":"INFO"}', Kind.HEARTBEAT, None),
        ('{"errorMessage":"Supplied token could not be authenticated"}', Kind.AUTH_ERROR, None),
        ('{"fixtureAction":{"fixtureSeqNum":"12"}}', Kind.MALFORMED, None),
        ('{"foo":1}', Kind.MALFORMED, None),
        ("\x00\xff", Kind.MALFORMED, None),
    ],
)
def test_classify_fastpath(raw: str, kind: Kind, seq: int | None) -> None:
    msg = classify_fastpath(raw)
    assert msg.kind is kind
    assert msg.seq == seq


@pytest.mark.parametrize(
    ("raw", "sent_at"),
    [
        ('{"ix":7,"ut":1682899391822}', 1682899391.822),
        ('{"ix":7}', None),
        ('{"ix":7,"ut":"1682899391822"}', None),  # quoted: not the vendor's shape, not guessed
        ('{"ix":7,"ut":1682899391822.5}', None),
    ],
)
def test_classify_tracking_reads_the_vendors_time(raw: str, sent_at: float | None) -> None:
    msg = classify_tracking(raw)
    assert (msg.kind, msg.seq) == (Kind.DATA, 7)
    assert msg.sent_at == (None if sent_at is None else pytest.approx(sent_at))
    assert msg == classify_reference(raw, fastpath=False)


@pytest.mark.parametrize(
    ("raw", "sent_at"),
    [
        (
            '{"fixtureAction":{"fixtureSeqNum":9,"timestamp":"2026-05-06T19:05:08.376151Z"}}',
            1778094308.376151,
        ),
        ('{"fixtureSeqNum":9,"timestamp":"2026-05-06T21:05:08.5+02:00"}', 1778094308.5),
        ('{"fixtureSeqNum":9,"timestamp":"2026-05-06T19:05:08"}', None),  # no zone: not guessed
        ('{"fixtureSeqNum":9,"timestamp":"yesterday"}', None),
        ('{"fixtureSeqNum":9,"timestamp":1778094308}', None),
        ('{"fixtureAction":{"fixtureSeqNum":9},"timestamp":"2026-05-06T19:05:08Z"}', None),
    ],
)
def test_classify_fastpath_reads_the_actions_time(raw: str, sent_at: float | None) -> None:
    msg = classify_fastpath(raw)
    assert (msg.kind, msg.seq) == (Kind.DATA, 9)
    assert msg.sent_at == (None if sent_at is None else pytest.approx(sent_at))
    assert msg == classify_reference(raw, fastpath=True)


def test_data_age_times_one_frame_in_sample_every() -> None:
    age = DataAge()
    sent = time.time() - 2.0  # two seconds old: the (1, 2.5] bucket
    for _ in range(2 * DATA_AGE_SAMPLE_EVERY):
        age.offer(sent)
    assert age.count == 2
    assert age.counts[DATA_AGE_BUCKETS.index(2.5)] == 2
    assert 4.0 <= age.sum < 2 * 2.5
    # A vendor clock ahead of ours: 0, never negative.
    for _ in range(DATA_AGE_SAMPLE_EVERY):
        age.offer(time.time() + 60)
    assert (age.count, age.counts[0]) == (3, 1)


@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_classify_never_raises(raw: str | bytes) -> None:
    classify_tracking(raw)
    classify_fastpath(raw)


def test_classify_bounds_vendor_text() -> None:
    # Bounded (a hostile upstream may send megabytes); the runner scrubs, then shortens more.
    msg = classify_tracking('{"errorMessage":"token ' + "x" * 200_000 + '"}')
    assert msg.kind is Kind.AUTH_ERROR
    assert 60_000 < len(msg.text) <= 64 * 1024 + 3


# The reference the simdjson fast path must agree with: orjson decides, the same rules read it.
def _reference(raw: str | bytes, fastpath: bool) -> Message:
    return classify_reference(raw, fastpath=fastpath)


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)  # past 64 bits: simdjson refuses these
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(
    [
        "ix",
        "fixtureSeqNum",
        "fixtureAction",
        "eventElementType",
        "state",
        "message",
        "level",
        "errorMessage",
        "error",
        "status",
        "ut",
        "timestamp",
        "x",
    ]
)
_texts = st.sampled_from(
    [
        "INFO",
        "ERROR",
        "WARN",
        "Authorisation accepted",
        "Heartbeat sent at t",
        "bad token",
        "2026-05-06T19:05:08.376151Z",
        "2026-05-06T19:05:08",
        "9999-12-31T23:59:59-23:59",
    ]
)
# Vendor-like objects, one level of nesting with the same keys (fastpath's fixtureAction.seq).
_shaped = st.dictionaries(
    _keys,
    _json_values | _texts | st.dictionaries(_keys, _json_values | _texts, max_size=3),
    max_size=5,
)


def _assert_agrees(raw: str) -> None:
    for r in (raw, raw.encode("utf-8", "surrogatepass")):
        assert classify_tracking(r) == _reference(r, fastpath=False)
        assert classify_fastpath(r) == _reference(r, fastpath=True)


@given(st.one_of(_shaped, _json_values), st.integers(min_value=0, max_value=3), st.data())
def test_classify_agrees_with_orjson(value: object, damage: int, data: st.DataObject) -> None:
    raw = json.dumps(value, ensure_ascii=False)  # stdlib: orjson cannot write ints past 64 bits
    for _ in range(damage):  # a few edits make most documents invalid, some still valid
        at = data.draw(st.integers(min_value=0, max_value=len(raw)))
        edit = data.draw(st.sampled_from(list('{}[]",:0-.eE \\\ufeff\x00a')))
        raw = raw[:at] + edit + raw[at + 1 :]
    _assert_agrees(raw)


@pytest.mark.parametrize(
    "raw",
    [
        '{"fixtureAction":{"fixtureSeqNum":7},"x":[1.5]}',
        '{"ix":3,"x":{"y":[36893488147419103232]}}',
        '{"eventElementType":"ConnectionStateChanged","state":{"a":1}}',
        '{"errorMessage":["token"]}',
        '{"error":{"a":1},"status":503}',
    ],
)
def test_classify_agrees_with_orjson_on_vendor_shapes(raw: str) -> None:
    _assert_agrees(raw)


@pytest.mark.parametrize(
    ("raw", "kind", "seq"),
    [
        ('\ufeff{"ix":1}', Kind.MALFORMED, None),  # simdjson skips a BOM; orjson and we do not
        (b'\xef\xbb\xbf{"ix":1}', Kind.MALFORMED, None),
        ('{"ix":5,"big":123456789012345678901234567890}', Kind.DATA, 5),  # orjson: a float
        ('{"ix":123456789012345678901234567890}', Kind.MALFORMED, None),
        ('{"ix":5} trailing', Kind.MALFORMED, None),
        ('{"ix":NaN}', Kind.MALFORMED, None),
        ('"text"', Kind.MALFORMED, None),
    ],
)
def test_classify_edge_cases(raw: str | bytes, kind: Kind, seq: int | None) -> None:
    msg = classify_tracking(raw)
    assert (msg.kind, msg.seq) == (kind, seq)


def test_classify_keeps_no_parser_proxy() -> None:
    # The shared simdjson parser refuses to parse while a proxy of its last document lives; a
    # leak would silently send every later message down the slow path.
    samples = [
        '{"ix":3,"hm":[{"pn":[1.0,2.0]}]}',
        '{"fixtureAction":{"fixtureSeqNum":4}}',
        '{"eventElementType":"ConnectionStateChanged","state":{"a":[1]}}',
        '{"errorMessage":{"nested":["token"]}}',
        '{"message":"Heartbeat sent at t","level":"INFO","x":{}}',
        "[1,{}]",
    ]
    for raw in samples:
        classify_tracking(raw)
        classify_fastpath(raw)
        assert parser_reusable()


# -- resume ------------------------------------------------------------------------------------


def test_tracking_first_subscribe_uses_configured_backfill() -> None:
    r = TrackingResume(initial_backfill=-1)
    assert r.backfill(now=0.0) == -1
    assert r.check(0) is Verdict.DELIVER


def test_tracking_backfill_estimate_and_widening() -> None:
    r = TrackingResume(initial_backfill=0)
    for i in range(101):  # 100 frames per second for one second
        assert r.check(i) is Verdict.DELIVER
        r.delivered(i, now=i / 100)
    assert r.rate() == pytest.approx(100.0)
    n = r.backfill(now=1.0 + 2.0)  # two seconds since the last frame
    assert n == math.ceil(2.0 * 100.0 * BACKFILL_SAFETY) + BACKFILL_MARGIN
    # The reply starts past the gap: too small. It also says where the head is (500 + n - 1),
    # so the next request reaches exactly back to ix 101 (plus the margin).
    assert r.check(500) is Verdict.TOO_SMALL
    n2 = r.backfill(now=3.0)
    assert n2 == (500 + n - 1) - 100 + BACKFILL_MARGIN
    assert n2 >= n * BACKFILL_WIDEN
    # A vendor that counts differently keeps answering short: after MAX_WIDENINGS, everything.
    requests = [n2]
    for k in range(MAX_WIDENINGS - 1):
        assert r.check(10_000 * (k + 1)) is Verdict.TOO_SMALL
        requests.append(r.backfill(now=3.0))
    assert requests[-1] == ALL_FRAMES
    assert all(b >= a * BACKFILL_WIDEN for a, b in itertools.pairwise(requests[:-1]))
    # With everything requested, the overlap is dropped and the widening count resets.
    assert r.check(0) is Verdict.DUPLICATE
    assert r.widenings == 0
    assert r.check(100) is Verdict.DUPLICATE
    assert r.check(101) is Verdict.DELIVER


def test_tracking_overlap_stays_small_when_connections_die_in_it() -> None:
    """Connections that die inside the backfill overlap must not make the next request grow
    with the whole outage (that would never get past the overlap again)."""
    r = TrackingResume(initial_backfill=0)
    for i in range(201):  # 200 Hz for one second
        r.check(i)
        r.delivered(i, now=i / 200)
    now = 1.0
    for _ in range(50):  # each reconnect 50 ms later; each connection sees only duplicates
        now += 0.05
        n = r.backfill(now)
        head = 200 + round((now - 1.0) * 200)  # the simulated vendor's newest ix
        assert head - 200 <= n <= head - 200 + 30  # covers the gap, overlap stays small
        first = head - n + 1
        assert r.check(first) is Verdict.DUPLICATE or first == 201
        if first == 201:
            break


def test_tracking_gap_mid_stream_is_delivered() -> None:
    r = TrackingResume(initial_backfill=0)
    r.check(5)
    r.delivered(5, now=0.0)
    assert r.check(6) is Verdict.DELIVER
    r.delivered(6, now=0.1)
    assert r.check(9) is Verdict.GAP  # not the first frame after a subscribe


def test_tracking_rate_ignores_backfill_bursts() -> None:
    r = TrackingResume(initial_backfill=0)
    for i in range(500):  # 100 Hz for five seconds
        r.delivered(i, now=i / 100)
    for i in range(500, 1000):  # then a 500-frame backfill within 5 ms
        r.delivered(i, now=5.0 + i / 100_000)
    assert r.rate() < 200.0  # a frame-count window would say thousands


def test_tracking_rate_fallback() -> None:
    r = TrackingResume(initial_backfill=0)
    r.delivered(0, now=10.0)
    assert r.rate() == FALLBACK_RATE
    r.delivered(1, now=10.2)  # two samples, but too short a span to trust
    assert r.rate() == FALLBACK_RATE
    assert (
        r.backfill(now=12.2) == math.ceil(2.0 * FALLBACK_RATE * BACKFILL_SAFETY) + BACKFILL_MARGIN
    )


def test_fastpath_positions_across_connections() -> None:
    r = FastpathResume()
    assert r.start_position() == 0
    for seq in (1, 2, 3):
        assert r.check(seq) is Verdict.DELIVER
        r.delivered(seq)
    assert r.start_position() == 3
    assert r.check(1) is Verdict.DELIVER  # restarts at 1 per connection
    r.delivered(1)
    assert r.check(4) is Verdict.GAP  # 2 and 3 skipped by the vendor
    r.delivered(4)
    assert r.check(2) is Verdict.OUT_OF_ORDER
    r.delivered(2)  # forwarded late; does not move the position back
    assert r.start_position() == 3 + 4
