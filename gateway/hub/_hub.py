"""The hub: every topic, keyed by (feed, fixture), and the on-demand rules."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, Protocol

from gateway.config import FeedConfig
from gateway.hub._latency import LatencyHistogram
from gateway.hub._topic import Topic, TopicSubscriber

#: The fixture ids a subscriber (or the HTTP API) may make the gateway follow. Ids end up in
#: upstream URLs and log lines: the vendor's shapes (UUIDs, numbers) pass; a ``/``, ``..``,
#: ``%``, whitespace or a control character, which could change a URL path or a log's
#: structure, does not.
FIXTURE_ID_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}"
_FIXTURE_ID: Final = re.compile(FIXTURE_ID_PATTERN)


#: Characters of a feed or fixture name quoted in a :class:`HubError` message: a client may
#: send any string (up to ``max_message_bytes``), and its error reply must stay short.
SHOWN_MAX: Final = 64


def _shown(value: str) -> str:
    """*value* quoted for an error message, cut after :data:`SHOWN_MAX` characters."""
    return repr(value) if len(value) <= SHOWN_MAX else repr(value[:SHOWN_MAX]) + "..."


def valid_fixture_id(fixture: str) -> bool:
    """True when *fixture* matches :data:`FIXTURE_ID_PATTERN` (whole string)."""
    return _FIXTURE_ID.fullmatch(fixture) is not None


class FixtureDirectory(Protocol):
    """Which fixtures are followed, and the door to follow more (the supervisor, in production)."""

    def is_followed(self, feed: str, fixture: str) -> bool: ...

    def demand(self, feed: str, fixture: str) -> bool:
        """An on-demand feed's fixture got a subscriber: follow it now. False if refused.

        May raise :class:`HubError` (e.g. :class:`OnDemandLimitError`) to refuse with a reason
        the subscriber is shown.
        """
        ...

    def release(self, feed: str, fixture: str) -> None:
        """The last subscriber left: stop after ``feed.linger`` unless followed by config."""
        ...


class HubError(Exception):
    """A subscription request the hub cannot satisfy; the message is safe to show a client."""


class UnknownFeedError(HubError):
    pass


class UnknownFixtureError(HubError):
    pass


class OnDemandLimitError(HubError):
    """The feed already follows ``max_on_demand`` fixtures on demand (raised by the directory)."""


class Hub:
    """All topics. One :class:`LatencyHistogram` (``fanout_latency``) is shared by all of them."""

    def __init__(
        self, feeds: Mapping[str, FeedConfig], directory: FixtureDirectory | None = None
    ) -> None:
        self.feeds: Mapping[str, FeedConfig] = feeds
        self.directory = directory
        self.fanout_latency = LatencyHistogram()
        self._topics: dict[tuple[str, str], Topic] = {}

    def feed(self, feed: str) -> FeedConfig:
        """The configuration of *feed*; raises :class:`UnknownFeedError`."""
        return self._feed(feed)

    def _feed(self, feed: str) -> FeedConfig:
        try:
            return self.feeds[feed]
        except KeyError:
            raise UnknownFeedError(f"unknown feed {_shown(feed)}") from None

    def topic(
        self,
        feed: str,
        fixture: str,
        *,
        epoch: str | None = None,
        seq: int = 0,
        prior_epochs: Mapping[str, int] | None = None,
    ) -> Topic:
        """The topic of (feed, fixture), created if there is none: with a new epoch and seq 0,
        or continuing the *epoch* and *seq* given (a recorded topic, see :class:`Topic`).

        Raises :class:`UnknownFeedError` for a feed that is not configured.
        """
        key = (feed, fixture)
        t = self._topics.get(key)
        if t is None:
            t = self._topics[key] = Topic(
                self._feed(feed),
                fixture,
                latency=self.fanout_latency,
                epoch=epoch,
                seq=seq,
                prior_epochs=prior_epochs,
            )
        return t

    def get(self, feed: str, fixture: str) -> Topic | None:
        return self._topics.get((feed, fixture))

    def topics(self) -> list[Topic]:
        return list(self._topics.values())

    def close_topic(self, feed: str, fixture: str) -> None:
        """The fixture stopped: its subscribers get status ``stopped`` and the topic is dropped.

        A later :meth:`topic` call creates a fresh topic with a new epoch.
        """
        t = self._topics.pop((feed, fixture), None)
        if t is not None:
            t.close()

    # -- used by the data plane ------------------------------------------------------------

    def open(self, feed: str, fixture: str) -> Topic:
        """The topic a new subscriber of (feed, fixture) attaches to.

        An existing topic is used as is; a fixture the directory follows gets its topic made;
        on an on-demand feed the directory is asked to follow the fixture. Raises
        :class:`UnknownFeedError`, or :class:`UnknownFixtureError` when none of that applies,
        the directory refused, or the id of a fixture to follow on demand is not a
        :func:`valid_fixture_id` (it would become part of an upstream URL).
        """
        cfg = self._feed(feed)
        t = self._topics.get((feed, fixture))
        d = self.directory
        if cfg.on_demand and d is not None and (t is None or t.subscriber_count == 0):
            # Also for an existing topic without subscribers: it may be lingering towards a stop.
            if not valid_fixture_id(fixture) and not d.is_followed(feed, fixture):
                raise UnknownFixtureError(
                    f"invalid fixture id {_shown(fixture)}: must match {FIXTURE_ID_PATTERN}"
                )
            if not d.demand(feed, fixture):
                raise UnknownFixtureError(
                    f"fixture {_shown(fixture)} of feed {_shown(feed)} was refused"
                )
            return self.topic(feed, fixture)
        if t is not None:
            return t
        if d is not None and d.is_followed(feed, fixture):
            return self.topic(feed, fixture)
        raise UnknownFixtureError(f"unknown fixture {_shown(fixture)} of feed {_shown(feed)}")

    def leave(self, topic: Topic, sub: TopicSubscriber) -> None:
        """Detach *sub*; when it was the topic's last subscriber, tell the directory."""
        if not topic.detach(sub) or topic.subscriber_count or self.directory is None:
            return
        # A closed (replaced) topic's fixture is not this subscriber's business any more.
        if self._topics.get((topic.feed.name, topic.fixture)) is topic:
            self.directory.release(topic.feed.name, topic.fixture)
