"""An honest in-memory :class:`~gateway.controlplane.ControlTarget`: a test double.

It follows the facade's contract (UnknownFeedError for an unknown feed, True only for a new follow,
monotonic counters, per-feed totals that survive an unfollow) without any I/O, so the control
plane can be exercised, and its API explored, without an upstream. The mutators (``publish``,
``set_state``, ``add_subscriber`` ...) play the part of the data path.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Final

import attrs

from gateway.config import Config, FeedConfig
from gateway.controlplane import (
    ClusterView,
    FeedTotals,
    FixtureView,
    FollowLimitError,
    RecorderTotals,
    RecordingView,
    StreamEndpoint,
    SubscriberView,
    Totals,
)
from gateway.dataplane import (
    STREAM_PATH,
    Page,
    SubscriberQuery,
    run_query,
    subscriber_order,
    view_facts,
)
from gateway.hub import UnknownFeedError
from gateway.model import FixtureState, FixtureStatus, UpstreamCounters, sum_counters
from gateway.replay import ReplayCounters

DEFAULT_LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class MemoryHistogram:
    """Per-bucket counts (not cumulative), as ``gateway.controlplane.LatencyHistogram`` says."""

    def __init__(self, buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS) -> None:
        self.buckets: tuple[float, ...] = tuple(buckets)
        self.counts: list[int] = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.sum += seconds
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if seconds <= bound:
                self.counts[i] += 1
                return


@attrs.define
class _Followed:
    status: FixtureStatus
    backfill: int
    epoch: str = attrs.field(factory=lambda: secrets.token_hex(8))
    seq: int = 0
    latest: str | None = None
    subscribers: int = 0
    frames_per_second: float = 0.0
    drops: int = 0
    slow_disconnects: int = 0
    owner: str | None = None
    role: str | None = None
    #: ``time.perf_counter()`` of its last published frame (None: none yet).
    published_at: float | None = None


class MemoryTarget:
    """A gateway with no network: fixtures, counters and subscribers held in dicts.

    The configured fixtures (``config.fixtures``) are followed at construction, as the real
    service does at start.
    """

    def __init__(
        self, config: Config, *, version: str = "0.0.0-memory", started_at: float | None = None
    ) -> None:
        #: Batch groups with members now (the totals' gauge; set by tests).
        self.batch_groups = 0
        self.config = config
        self.version = version
        self.started_at = time.time() if started_at is None else started_at
        self.fanout_latency = MemoryHistogram()
        #: Per feed, what ``data_age()`` answers (set by tests).
        self.data_ages: dict[str, MemoryHistogram] = {}
        self._bytes_out = 0
        self.ready = True
        self.draining = False
        #: What ``degraded_reason()`` and ``cluster_view()`` answer (None: not degraded; a
        #: single node).
        self.degraded: str | None = None
        #: What ``sync_fixtures()`` answers (False: a cluster whose Redis does not answer).
        self.synced = True
        self.cluster: ClusterView | None = None
        self._fixtures: dict[tuple[str, str], _Followed] = {}
        self._subscribers: dict[str, SubscriberView] = {}
        self._frames_out = 0
        self._drops = 0
        self._slow_disconnects = 0
        self._rate_limited = 0
        self._ping_timeouts = 0
        #: Subscribers disconnected through the API, with the reason given.
        self.disconnected = 0
        self.disconnect_reasons: dict[str, str] = {}
        self._auth_failures: dict[str, int] = {}
        self._feed_counters = {name: UpstreamCounters() for name in config.feeds}
        self._refused: dict[str, int] = {}
        #: What ``stream_endpoint()`` answers (None: "not bound yet"); nothing is bound here,
        #: so port 0 ("any free port") reads as the default port.
        self.stream: StreamEndpoint | None = StreamEndpoint(
            host=None,
            port=config.gateway.stream_listen.port or 8765,
            tls=config.gateway.tls,
            path=STREAM_PATH,
        )
        self._configured = {fx.key for fx in config.fixtures}
        #: Recorded lines per (feed, fixture), as the recorder would serve them.
        self._recorded: dict[tuple[str, str], list[bytes]] = {}
        self.replays = ReplayCounters()
        for fx in config.fixtures:
            self.follow(fx.feed, fx.id, fx.backfill)

    # --- the ControlTarget protocol ---------------------------------------------------------

    def is_ready(self) -> bool:
        return self.ready and not self.draining

    def is_draining(self) -> bool:
        return self.draining

    def degraded_reason(self) -> str | None:
        return self.degraded

    def cluster_view(self) -> ClusterView | None:
        return self.cluster

    def feeds(self) -> Mapping[str, FeedConfig]:
        return self.config.feeds

    def fixture_views(self) -> list[FixtureView]:
        return [self._view(f) for f in self._fixtures.values()]

    def fixture_view(self, feed: str, fixture: str) -> FixtureView | None:
        followed = self._fixtures.get((feed, fixture))
        return None if followed is None else self._view(followed)

    def follow(self, feed: str, fixture: str, backfill: int) -> bool:
        if feed not in self.config.feeds:
            raise UnknownFeedError(f"unknown feed {feed!r}")
        if (feed, fixture) in self._fixtures:
            return False
        limit = self.config.api.max_fixtures
        if len(self._fixtures.keys() - self._configured) >= limit:
            raise FollowLimitError(f"the API already follows {limit} fixtures (max_fixtures)")
        self._fixtures[(feed, fixture)] = _Followed(FixtureStatus(feed, fixture), backfill)
        return True

    def unfollow(self, feed: str, fixture: str) -> bool:
        return self._fixtures.pop((feed, fixture), None) is not None

    async def sync_fixtures(self) -> bool:
        return self.synced

    def latest(self, feed: str, fixture: str) -> str | None:
        followed = self._fixtures.get((feed, fixture))
        return None if followed is None else followed.latest

    def subscriber_views(
        self, after: str | None = None, limit: int | None = None
    ) -> list[SubscriberView]:
        views = sorted(self._subscribers.values(), key=lambda v: subscriber_order(v.id))
        if after is not None:
            views = [v for v in views if subscriber_order(v.id) > subscriber_order(after)]
        return views if limit is None else views[:limit]

    async def subscriber_query(self, query: SubscriberQuery) -> Page[SubscriberView]:
        return await run_query(list(self._subscribers.values()), view_facts, query)

    def disconnect_subscriber(self, ident: str, reason: str) -> bool:
        if self._subscribers.pop(ident, None) is None:
            return False
        self.disconnected += 1
        self.disconnect_reasons[ident] = reason
        return True

    def stream_endpoint(self) -> StreamEndpoint | None:
        return self.stream

    def totals(self) -> Totals:
        return Totals(
            frames_out=self._frames_out,
            bytes_out=self._bytes_out,
            drops=self._drops,
            slow_disconnects=self._slow_disconnects,
            rate_limited=self._rate_limited,
            ping_timeouts=self._ping_timeouts,
            disconnected=self.disconnected,
            subscribers=len(self._subscribers),
            batched=sum(v.batched for v in self._subscribers.values()),
            batch_groups=self.batch_groups,
            upstream=sum_counters(self._feed_counters.values()),
            auth_failures=dict(self._auth_failures),
        )

    def data_age(self) -> Mapping[str, MemoryHistogram]:
        return self.data_ages

    def feed_totals(self) -> Mapping[str, FeedTotals]:
        return {
            feed: FeedTotals(upstream=counters, on_demand_refused=self._refused.get(feed, 0))
            for feed, counters in self._feed_counters.items()
        }

    def recordings(self) -> list[RecordingView]:
        return [self._recording_view(key) for key in self._recorded]

    def replay_counters(self) -> ReplayCounters:
        return self.replays

    def recorder_totals(self) -> RecorderTotals | None:
        frames: dict[str, int] = {}
        for (feed, _), lines in self._recorded.items():
            frames[feed] = frames.get(feed, 0) + len(lines)
        return RecorderTotals(frames_written=frames, fixtures={"recording": len(self._recorded)})

    def recording_download(
        self, feed: str, fixture: str, after: int, limit: int | None
    ) -> AsyncIterator[bytes] | None:
        lines = self._recorded.get((feed, fixture))
        if lines is None:
            return None

        async def chunks() -> AsyncIterator[bytes]:
            picked = [line for seq, line in enumerate(lines, 1) if seq > after]
            yield b"".join(picked[:limit])

        return chunks()

    # --- playing the data path --------------------------------------------------------------

    def record(self, feed: str, fixture: str, raw: str) -> None:
        """One frame of (feed, fixture) written to its recording (seq = its position)."""
        lines = self._recorded.setdefault((feed, fixture), [])
        seq = len(lines) + 1
        lines.append(b'{"seq":%d,"pos":null,"t":1.0,"data":%s}\n' % (seq, raw.encode()))

    def backfill_of(self, feed: str, fixture: str) -> int:
        """The backfill the fixture was followed with. KeyError when not followed."""
        return self._fixtures[(feed, fixture)].backfill

    def publish(self, feed: str, fixture: str, raw: str, *, deliveries: int = 0) -> None:
        """One upstream frame accepted and fanned out to *deliveries* subscribers."""
        followed = self._fixtures[(feed, fixture)]
        followed.seq += 1
        followed.latest = raw
        followed.status.last_message_at = time.time()
        followed.published_at = time.perf_counter()
        self._frames_out += deliveries
        self._bytes_out += deliveries * len(raw.encode())
        self.count_upstream(feed, fixture, frames=1)

    def count_upstream(self, feed: str, fixture: str, **deltas: int) -> None:
        """Upstream events of a followed fixture (keyword per counter, e.g. ``gaps=2``),
        counted per fixture, per feed and in total."""
        counters = self._fixtures[(feed, fixture)].status.counters
        for name, n in deltas.items():
            setattr(counters, name, getattr(counters, name) + n)
        self._feed_counters[feed] = self._feed_counters.get(
            feed, UpstreamCounters()
        ) + UpstreamCounters(**deltas)

    def count_slow(
        self,
        *,
        drops: int = 0,
        slow_disconnects: int = 0,
        rate_limited: int = 0,
        ping_timeouts: int = 0,
    ) -> None:
        self._drops += drops
        self._slow_disconnects += slow_disconnects
        self._rate_limited += rate_limited
        self._ping_timeouts += ping_timeouts

    def count_auth_failures(self, endpoint: str, n: int = 1) -> None:
        """Failed subscriber authentications on *endpoint* (``stream`` or ``dropin``)."""
        self._auth_failures[endpoint] = self._auth_failures.get(endpoint, 0) + n

    def set_state(
        self,
        feed: str,
        fixture: str,
        state: FixtureState,
        detail: str = "",
        *,
        last_error: str | None = None,
    ) -> None:
        status = self._fixtures[(feed, fixture)].status
        if status.state != state:
            status.state = state
            status.state_since = time.time()
        status.detail = detail
        if last_error is not None:
            status.last_error = last_error

    def set_fixture_load(
        self,
        feed: str,
        fixture: str,
        *,
        subscribers: int,
        frames_per_second: float,
        drops: int = 0,
        slow_disconnects: int = 0,
    ) -> None:
        followed = self._fixtures[(feed, fixture)]
        followed.subscribers = subscribers
        followed.frames_per_second = frames_per_second
        followed.drops = drops
        followed.slow_disconnects = slow_disconnects

    def set_role(self, feed: str, fixture: str, *, owner: str | None, role: str | None) -> None:
        """In a cluster (set ``cluster`` too): who holds the fixture's lease, and whether this
        instance is its ``owner`` or a ``relay``."""
        followed = self._fixtures[(feed, fixture)]
        followed.owner = owner
        followed.role = role

    def add_subscriber(self, view: SubscriberView) -> None:
        self._subscribers[view.id] = view

    def remove_subscriber(self, subscriber_id: str) -> None:
        del self._subscribers[subscriber_id]

    # --- internals ---------------------------------------------------------------------------

    def _recording_view(self, key: tuple[str, str]) -> RecordingView:
        n = len(self._recorded[key])
        return RecordingView(
            feed=key[0],
            fixture=key[1],
            state="recording" if key in self._fixtures else "idle",
            reason="",
            epoch="memory",
            first_seq=1,
            last_seq=n,
            durable_seq=n,
            first_time=1.0,
            last_time=1.0,
            bytes=sum(len(line) for line in self._recorded[key]),
            frames_dropped=0,
        )

    def _view(self, f: _Followed) -> FixtureView:
        s = f.status
        return FixtureView(
            feed=s.feed,
            fixture=s.fixture,
            state=s.state,
            state_since=s.state_since,
            detail=s.detail,
            seq=f.seq,
            epoch=f.epoch,
            subscribers=f.subscribers,
            frames_per_second=f.frames_per_second,
            upstream=s.snapshot(),
            drops=f.drops,
            slow_disconnects=f.slow_disconnects,
            recording=(
                self._recording_view((s.feed, s.fixture))
                if (s.feed, s.fixture) in self._recorded
                else None
            ),
            owner=f.owner,
            role=f.role,
            frame_age=None if f.published_at is None else time.perf_counter() - f.published_at,
        )
