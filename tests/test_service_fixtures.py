"""FixtureBook: which fixtures are followed and why (config, API, on demand), with fakes.

No sockets: following and stopping are recorded by a fake supervisor; linger timers run under
``MockClock(autojump_threshold=0)``, so "after 30 s" is exact and instant.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing

from gateway.config import FeedConfig, FixtureConfig
from gateway.controlplane import FollowLimitError
from gateway.hub import OnDemandLimitError
from gateway.service import FixtureBook

LIVE = FeedConfig(kind="tracking", url="ws://up.test/ws/t", name="live")
DEMAND = FeedConfig(
    kind="tracking", url="ws://up.test/ws/d", name="demand", on_demand=True, linger=30.0,
    max_on_demand=2,
)  # fmt: skip


@attrs.define
class FakeSupervisor:
    """Follows whatever it is given; records the calls."""

    followed: dict[tuple[str, str], FixtureConfig] = attrs.field(factory=dict)
    backlog: dict[tuple[str, str], bool] = attrs.field(factory=dict)
    stops: list[tuple[str, str]] = attrs.field(factory=list)
    subscribers: dict[tuple[str, str], int] = attrs.field(factory=dict)

    def follow(self, fixture: FixtureConfig, backlog: bool = False) -> bool:
        if fixture.key in self.followed:
            return False
        self.followed[fixture.key] = fixture
        self.backlog[fixture.key] = backlog
        return True

    def stop(self, feed: str, fixture: str) -> bool:
        self.stops.append((feed, fixture))
        return self.followed.pop((feed, fixture), None) is not None

    def is_followed(self, feed: str, fixture: str) -> bool:
        return (feed, fixture) in self.followed

    def is_backlog(self, feed: str, fixture: str) -> bool:
        """How the fixture was last followed."""
        return self.backlog[(feed, fixture)]

    def count(self, feed: str, fixture: str) -> int:
        return self.subscribers.get((feed, fixture), 0)


def make_book(
    sup: FakeSupervisor, configured: Sequence[FixtureConfig] = (), max_api: int = 1000
) -> tuple[FixtureBook, Callable[[], None]]:
    feeds = {"live": LIVE, "demand": DEMAND}
    for fx in configured:
        sup.follow(fx)
    book = FixtureBook(
        lambda: feeds,
        (fx.key for fx in configured),
        follow=sup.follow,
        stop=sup.stop,
        is_followed=sup.is_followed,
        subscribers=sup.count,
        max_api=lambda: max_api,
    )

    def reconfigure_linger() -> None:
        feeds["demand"] = attrs.evolve(DEMAND, linger=5.0)

    return book, reconfigure_linger


@asynccontextmanager
async def running(book: FixtureBook) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(book.run)
        yield
        nursery.cancel_scope.cancel()


async def test_demand_follows_and_release_stops_after_linger(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = FakeSupervisor()
    book, _ = make_book(sup)
    async with running(book):
        assert book.demand("demand", "f1")
        assert sup.followed[("demand", "f1")].backfill == 0
        assert book.is_on_demand("demand", "f1")
        book.release("demand", "f1")
        await trio.sleep(29.9)
        assert sup.stops == []
        await trio.sleep(0.2)
        assert sup.stops == [("demand", "f1")]
        assert not book.is_on_demand("demand", "f1")


async def test_a_new_subscriber_within_linger_keeps_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = FakeSupervisor()
    book, _ = make_book(sup)
    async with running(book):
        book.demand("demand", "f1")
        book.release("demand", "f1")
        await trio.sleep(20)
        assert book.demand("demand", "f1")  # cancels the timer
        await trio.sleep(60)
        assert sup.stops == []
        # Released again and still a subscriber counted when the timer fires: kept.
        book.release("demand", "f1")
        sup.subscribers[("demand", "f1")] = 1
        await trio.sleep(60)
        assert sup.stops == []


async def test_linger_is_read_from_the_current_config(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = FakeSupervisor()
    book, shorten = make_book(sup)
    async with running(book):
        shorten()
        book.demand("demand", "f1")
        book.release("demand", "f1")
        await trio.sleep(5.1)
        assert sup.stops == [("demand", "f1")]


async def test_on_demand_cap_refuses_counts_and_frees_room(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    sup = FakeSupervisor()
    book, _ = make_book(sup)
    async with running(book):
        assert book.demand("demand", "a") and book.demand("demand", "b")
        assert book.demand("demand", "a")  # already followed: no new connection, no refusal
        with pytest.raises(OnDemandLimitError, match="max_on_demand"):
            book.demand("demand", "c")
        assert book.refused() == {"demand": 1}
        assert "refused on-demand demand/c" in caplog.text
        assert ("demand", "c") not in sup.followed
        book.release("demand", "a")
        await trio.sleep(31)
        assert book.demand("demand", "c")
        assert book.on_demand_count("demand") == 2


async def test_refusals_without_following(autojump_clock: trio.testing.MockClock) -> None:
    sup = FakeSupervisor()
    book, _ = make_book(sup)
    async with running(book):
        assert not book.demand("live", "f1")  # not an on-demand feed
        assert not book.demand("nofeed", "f1")
        book.close()  # draining
        assert not book.demand("demand", "f1")
    assert sup.followed == {}


async def test_api_follow_makes_an_on_demand_fixture_permanent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = FakeSupervisor()
    book, _ = make_book(sup)
    async with running(book):
        book.demand("demand", "f1")
        book.release("demand", "f1")
        assert not book.follow(FixtureConfig(feed="demand", id="f1", backfill=5))
        assert not book.is_on_demand("demand", "f1")
        await trio.sleep(120)
        assert sup.stops == []  # the linger timer was cancelled
        book.release("demand", "f1")  # not on demand any more: no timer
        await trio.sleep(120)
        assert sup.stops == []
        assert book.stop("demand", "f1")
        assert sup.stops == [("demand", "f1")]
        assert not book.stop("demand", "f1")


async def test_stop_cancels_a_pending_linger(autojump_clock: trio.testing.MockClock) -> None:
    sup = FakeSupervisor()
    book, _ = make_book(sup)
    async with running(book):
        book.demand("demand", "f1")
        book.release("demand", "f1")
        assert book.stop("demand", "f1")
        await trio.sleep(60)
        assert sup.stops == [("demand", "f1")]  # once, not again when the timer would fire


def test_reconcile_adds_and_removes_configured_only() -> None:
    sup = FakeSupervisor()
    a = FixtureConfig(feed="live", id="a")
    b = FixtureConfig(feed="live", id="b")
    c = FixtureConfig(feed="live", id="c", backfill=10)
    book, _ = make_book(sup, [a, b])
    assert book.follow(FixtureConfig(feed="live", id="api"))  # API: left alone by reloads
    added, removed = book.reconcile([b, c])
    assert added == [c] and removed == [("live", "a")]
    assert set(sup.followed) == {("live", "b"), ("live", "c"), ("live", "api")}
    assert sup.followed[("live", "c")].backfill == 10
    assert book.is_configured("live", "c") and not book.is_configured("live", "a")
    assert book.reconcile([b, c]) == ([], [])  # unchanged: nothing touched
    assert sup.stops == [("live", "a")]


def test_api_cap_refuses_new_fixtures_only(caplog: pytest.LogCaptureFixture) -> None:
    """300 PUTs were once all accepted and queued: ``[api] max_fixtures`` bounds them."""
    sup = FakeSupervisor()
    configured = FixtureConfig(feed="live", id="conf")
    book, _ = make_book(sup, [configured], max_api=2)
    assert book.follow(FixtureConfig(feed="live", id="a"))
    assert book.follow(FixtureConfig(feed="live", id="b"))
    assert book.api_count == 2
    for i in range(50):
        with pytest.raises(FollowLimitError, match=r"max_fixtures"):
            book.follow(FixtureConfig(feed="live", id=f"junk{i}"))
    # Logged once, not 50 times (any API client can cause it at any rate).
    assert caplog.text.count("refused to follow") == 1
    # Asking again for a followed fixture, or for a configured one, is never refused.
    assert not book.follow(FixtureConfig(feed="live", id="a", backfill=3))
    assert not book.follow(configured)
    assert book.stop("live", "a")
    assert book.follow(FixtureConfig(feed="live", id="c"))  # room again
    assert set(sup.followed) == {("live", "conf"), ("live", "b"), ("live", "c")}


def test_new_fixtures_are_backlog_until_seen_live() -> None:
    sup = FakeSupervisor()
    book, _ = make_book(sup, [FixtureConfig(feed="live", id="conf")])
    assert sup.backlog == {("live", "conf"): False}  # the FakeSupervisor's own add
    book.follow(FixtureConfig(feed="live", id="new"))
    book.demand("demand", "od")
    assert sup.is_backlog("live", "new") and sup.is_backlog("demand", "od")
    # It went live, was removed, and is added again: it goes ahead of the backlog now.
    book.remember("live", "new")
    book.stop("live", "new")
    book.follow(FixtureConfig(feed="live", id="new"))
    assert not sup.is_backlog("live", "new")
    # A reload that configures a fixture: never backlog, and no longer the API's.
    book.follow(FixtureConfig(feed="live", id="x"))
    assert book.api_count == 2
    sup.stop("live", "x")  # (so the reconcile below follows it anew)
    book.reconcile([FixtureConfig(feed="live", id="conf"), FixtureConfig(feed="live", id="x")])
    assert not sup.is_backlog("live", "x")
    assert book.api_count == 1


async def test_a_reload_that_configures_an_on_demand_fixture_cancels_its_linger(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = FakeSupervisor()
    book, _ = make_book(sup)
    async with running(book):
        book.demand("demand", "f1")
        book.release("demand", "f1")
        book.reconcile([FixtureConfig(feed="demand", id="f1")])
        await trio.sleep(120)
        assert sup.stops == []  # configured now: the linger must not stop it
        assert book.is_configured("demand", "f1") and not book.is_on_demand("demand", "f1")
