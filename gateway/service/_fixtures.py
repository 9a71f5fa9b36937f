"""Which fixtures the gateway follows, and why: the config, the HTTP API, or a subscriber.

:class:`FixtureBook` keeps the bookkeeping the service needs on top of the upstream supervisor
(which follows whatever it is given): which fixtures the config file names (reconciled on
reload), which a subscriber started on demand (stopped ``linger`` seconds after its last
subscriber left, and at most ``max_on_demand`` per feed), and what was asked for through the
API (kept until deleted, at most ``[api] max_fixtures``). It implements the hub's
``FixtureDirectory``.

It also tells the supervisor which fixtures are *backlog*: ones added through the API or on
demand that the gateway has never seen live. Their first attempts queue behind everything else
at the connect limiter, so a flood of new ids cannot delay a configured fixture, a reconnect, or
the re-add of a fixture that was live before.

It does no I/O itself: following and stopping are the two callables it is built with, so the
rules can be tested with fakes under a MockClock. Its linger timers run in the nursery of
:meth:`FixtureBook.run`.

Example::

    book = FixtureBook(lambda: config.feeds, configured, follow=supervisor.add, stop=stop,
                       is_followed=is_followed, subscribers=count)
    async with trio.open_nursery() as nursery:
        await nursery.start(book.run)
        book.demand("tracking", "f1")     # a subscriber asked: followed now
        book.release("tracking", "f1")    # its last subscriber left: stopped after linger
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Final

import trio

from gateway.config import FeedConfig, FixtureConfig
from gateway.controlplane import FollowLimitError
from gateway.hub import OnDemandLimitError
from gateway.logs import LogThrottle, fields

log = logging.getLogger("gateway")

Key = tuple[str, str]

#: Fixtures remembered as once live (their re-add is not backlog); the oldest are forgotten.
KNOWN_FIXTURES: Final = 10_000


class FixtureBook:
    """The fixtures followed on top of the supervisor, by source. See the module docstring.

    *follow* starts following a fixture (True when newly followed; ``backlog`` as described in
    the module docstring); *stop* stops one (True when it was followed) and must make
    *is_followed* false; *subscribers* counts a fixture's subscribers now. Each is called
    synchronously and must not block. *max_api* reads the current ``[api] max_fixtures``.
    """

    def __init__(
        self,
        feeds: Callable[[], Mapping[str, FeedConfig]],
        configured: Iterable[Key],
        *,
        follow: Callable[[FixtureConfig, bool], bool],
        stop: Callable[[str, str], bool],
        is_followed: Callable[[str, str], bool],
        subscribers: Callable[[str, str], int],
        max_api: Callable[[], int] = lambda: 1 << 30,
        cluster_on_demand: Callable[[str], Collection[str]] | None = None,
    ) -> None:
        self._feeds = feeds
        self._follow = follow
        self._stop = stop
        self._is_followed = is_followed
        self._subscribers = subscribers
        self._max_api = max_api
        self._cluster_on_demand = cluster_on_demand
        self._configured: set[Key] = set(configured)
        self._on_demand: set[Key] = set()
        self._api: set[Key] = set()
        self._known: collections.OrderedDict[Key, None] = collections.OrderedDict()
        self._refusals = LogThrottle(log)
        self._linger: dict[Key, trio.CancelScope] = {}
        self._refused: dict[str, int] = {}
        self._closed = False
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the linger timers until cancelled (a release before this runs never stops)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # -- views -----------------------------------------------------------------------------

    def is_configured(self, feed: str, fixture: str) -> bool:
        return (feed, fixture) in self._configured

    def is_on_demand(self, feed: str, fixture: str) -> bool:
        return (feed, fixture) in self._on_demand

    def on_demand_count(self, feed: str) -> int:
        """Fixtures of *feed* followed on demand: here, and in a cluster on any instance."""
        mine = set(self.on_demand_of(feed))
        if self._cluster_on_demand is not None:
            mine.update(self._cluster_on_demand(feed))
        return len(mine)

    def _elsewhere(self, feed: str, fixture: str) -> bool:
        # Followed on demand by another instance of the cluster: no new vendor connection.
        return self._cluster_on_demand is not None and fixture in self._cluster_on_demand(feed)

    def on_demand_of(self, feed: str) -> list[str]:
        """The fixtures of *feed* this gateway follows on demand."""
        return [fixture for f, fixture in self._on_demand if f == feed]

    def is_api(self, feed: str, fixture: str) -> bool:
        """True when the API asked for *fixture* (and the config does not name it)."""
        return (feed, fixture) in self._api

    @property
    def api_count(self) -> int:
        """Fixtures followed because the API asked (and not also configured)."""
        return len(self._api)

    def remember(self, feed: str, fixture: str) -> None:
        """*fixture* was live: following it again later is not backlog."""
        key = (feed, fixture)
        self._known[key] = None
        self._known.move_to_end(key)
        while len(self._known) > KNOWN_FIXTURES:
            self._known.popitem(last=False)

    def _backlog(self, key: Key) -> bool:
        return key not in self._known

    def refused(self) -> dict[str, int]:
        """On-demand subscriptions refused per feed (``max_on_demand``), since start."""
        return dict(self._refused)

    def close(self) -> None:
        """Draining: no fixture is followed on demand from now on."""
        self._closed = True

    # -- the hub's FixtureDirectory --------------------------------------------------------

    def is_followed(self, feed: str, fixture: str) -> bool:
        return self._is_followed(feed, fixture)

    def demand(self, feed: str, fixture: str) -> bool:
        """A subscriber wants *fixture* of an on-demand feed: follow it (or keep following).

        False when the feed is unknown or not on demand, or the gateway is draining. Raises
        :class:`~gateway.hub.OnDemandLimitError` (counted and logged) when following it would
        pass the feed's ``max_on_demand``.
        """
        cfg = self._feeds().get(feed)
        if cfg is None or not cfg.on_demand or self._closed:
            return False
        key = (feed, fixture)
        # The vendor wants few connections: subscribers must not open them without bound.
        if (
            key not in self._on_demand
            and not self._is_followed(feed, fixture)
            and not self._elsewhere(feed, fixture)
            and self.on_demand_count(feed) >= cfg.max_on_demand
        ):
            self._refused[feed] = self._refused.get(feed, 0) + 1
            # Any subscriber can cause this at any rate: counted every time, logged throttled.
            self._refusals.warning(
                "refused on-demand %s/%s: the feed already follows %d fixtures on demand",
                feed,
                fixture,
                cfg.max_on_demand,
                extra=fields(feed=feed, fixture=fixture),
            )
            raise OnDemandLimitError(
                f"fixture {fixture!r} of feed {feed!r} refused: the feed already follows "
                f"{cfg.max_on_demand} fixtures on demand (max_on_demand)"
            )
        self._cancel_linger(key)
        if self._follow(FixtureConfig(feed=feed, id=fixture, backfill=0), self._backlog(key)):
            self._on_demand.add(key)
            log.info(
                "following %s/%s on demand", feed, fixture, extra=fields(feed=feed, fixture=fixture)
            )
        return True

    def release(self, feed: str, fixture: str) -> None:
        """The last subscriber left: an on-demand fixture stops after its feed's ``linger``."""
        key = (feed, fixture)
        if key not in self._on_demand or key in self._linger or self._nursery is None:
            return
        linger = self._feeds()[feed].linger
        scope = trio.CancelScope()
        self._linger[key] = scope
        self._nursery.start_soon(self._linger_then_stop, key, linger, scope)

    async def _linger_then_stop(self, key: Key, linger: float, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(linger)
            self._linger.pop(key, None)
            if key in self._on_demand and self._subscribers(*key) == 0:
                log.info(
                    "stopping on-demand %s/%s: no subscriber for %.0f s",
                    *key,
                    linger,
                    extra=fields(feed=key[0], fixture=key[1]),
                )
                self.stop(*key)

    def _cancel_linger(self, key: Key) -> None:
        scope = self._linger.pop(key, None)
        if scope is not None:
            scope.cancel()

    # -- the API and reload ----------------------------------------------------------------

    def follow(self, fixture: FixtureConfig, *, limit: bool = True) -> bool:
        """Follow *fixture* because the API asked: it stays until deleted, even if it came on
        demand. True when newly followed.

        Raises :class:`~gateway.controlplane.FollowLimitError` when that would make more than
        ``[api] max_fixtures`` API fixtures (asking again for one already followed never does).
        *limit* False: the API of another instance of the cluster asked (and checked).
        """
        key = fixture.key
        if key not in self._api and key not in self._configured:
            max_api = self._max_api()
            if limit and len(self._api) >= max_api:
                self._refusals.warning(
                    "refused to follow %s/%s through the API: max_fixtures (%d) reached",
                    *key,
                    max_api,
                    extra=fields(feed=key[0], fixture=key[1]),
                )
                raise FollowLimitError(
                    f"fixture {fixture.id[:40]!r} of feed {fixture.feed!r} refused: the API "
                    f"already follows {max_api} fixtures ([api] max_fixtures)"
                )
            self._api.add(key)
        self._on_demand.discard(key)
        self._cancel_linger(key)
        return self._follow(fixture, self._backlog(key))

    def stop(self, feed: str, fixture: str) -> bool:
        """Stop following, whatever the source; False when it was not followed."""
        key = (feed, fixture)
        self._configured.discard(key)
        self._on_demand.discard(key)
        self._api.discard(key)
        self._cancel_linger(key)
        return self._stop(feed, fixture)

    def reconcile(self, wanted: Iterable[FixtureConfig]) -> tuple[list[FixtureConfig], list[Key]]:
        """Make the configured fixtures *wanted* (a reloaded config's, of known feeds).

        Follows the new ones and stops the ones no longer configured; API and on-demand
        fixtures are left alone, and unchanged ones keep their connection. Returns
        ``(added, removed)``.
        """
        wanted_by_key = {fx.key: fx for fx in wanted}
        added = [fx for key, fx in wanted_by_key.items() if key not in self._configured]
        removed = sorted(self._configured - wanted_by_key.keys())
        for key in removed:
            self.stop(*key)
        for fx in added:
            self._configured.add(fx.key)
            self._api.discard(fx.key)  # the file owns it now
            self._on_demand.discard(fx.key)
            self._cancel_linger(fx.key)
            self._follow(fx, False)
        return added, removed
