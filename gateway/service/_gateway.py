"""The gateway as one object: config, hub, upstream supervisor, data plane and control plane.

:class:`Gateway` composes the pieces and is the only place that knows all of them. It implements
the control plane's :class:`~gateway.controlplane.ControlTarget` facade, and hands the hub a
:class:`~gateway.service._fixtures.FixtureBook` as its ``FixtureDirectory`` (which fixtures are
followed and why: config, API, on demand with linger and cap), so neither of those packages
imports the other. Its :meth:`Gateway.run` is the body of the root nursery; signals,
sd_notify and reload live in :mod:`gateway.service._lifecycle`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Collection, Mapping
from functools import partial
from typing import Final

import attrs
import trio

from gateway import __version__
from gateway.config import (
    Config,
    FeedConfig,
    FixtureConfig,
    ListenAddress,
    SubscriberTokens,
    load_cluster_password,
    load_server_tls,
    load_subscriber_tokens,
)
from gateway.controlplane import (
    ClusterInstanceView,
    ClusterView,
    FeedTotals,
    FixtureView,
    RecorderTotals,
    RecordingView,
    StreamEndpoint,
    SubscriberView,
    Totals,
)
from gateway.controlplane import run as run_control_plane
from gateway.dataplane import (
    STREAM_PATH,
    Page,
    SubscriberAuth,
    SubscriberQuery,
    SubscriberRegistry,
)
from gateway.dataplane import run as run_data_plane
from gateway.histogram import Histogram
from gateway.hub import Hub, LatencyHistogram, Topic, UnknownFeedError
from gateway.logs import fields, log_context
from gateway.model import (
    FixtureState,
    FixtureStatus,
    FrameSink,
    ResumePoint,
    UpstreamCounters,
    sum_counters,
)
from gateway.recorder import FixtureLog, Recorder
from gateway.replay import ReplayCounters, Replays, VendorLink
from gateway.service._cluster import ROLE_OWNER, ClusterNode
from gateway.service._clusterrec import ClusterRecording
from gateway.service._fixtures import FixtureBook
from gateway.upstream import FixtureHandle, Supervisor

log = logging.getLogger("gateway")


class _Unread:
    """The default of :meth:`Gateway.apply`'s ``tokens``: read the token file there."""


_UNREAD: Final = _Unread()


def recording_view(log: FixtureLog) -> RecordingView:
    """The API's view of one recording (read on the trio thread: plain values only)."""
    first = log.first_seq
    last = log.written_seq
    return RecordingView(
        feed=log.feed,
        fixture=log.fixture,
        state=log.state,
        reason=log.reason or log.broken,
        epoch=log.epoch,
        first_seq=first,
        last_seq=last,
        durable_seq=log.durable_seq,
        first_time=log.first_t,
        last_time=log.written_t,
        bytes=log.stored_bytes,
        frames_dropped=log.frames_dropped + log.frames_failed,
    )


class RecordedTopic:
    """A topic's ``FrameSink`` that also hands each frame to the recorder.

    The publish path: the topic numbers and fans the frame out, then the recorder queues its
    text for the writer thread. Neither awaits; a recorder that cannot keep up stops recording
    the fixture (counted), the fan-out is untouched.
    """

    __slots__ = ("log", "recorder", "topic")

    def __init__(self, topic: Topic, recorder: Recorder, log: FixtureLog) -> None:
        self.topic = topic
        self.recorder = recorder
        self.log = log

    def publish(self, raw: str, position: int | None) -> None:
        topic = self.topic
        topic.publish(raw, position)
        frame = topic.latest_frame
        assert frame is not None
        # The bytes the topic encoded once (and its history holds): no copy for the recorder.
        self.recorder.append(self.log, frame.seq, position, frame.raw_bytes)

    def set_status(self, state: FixtureState, detail: str) -> None:
        self.topic.set_status(state, detail)


@attrs.frozen
class Bound:
    """The addresses the listeners actually bound (port 0 resolved)."""

    stream: ListenAddress
    http: ListenAddress


class Gateway:
    """Everything one running gateway holds. Create, then ``await nursery.start(gw.run)``.

    Fixtures come from three places: the config file (reconciled on reload), the HTTP API
    (kept until deleted; runtime changes are not written back) and on-demand subscriptions
    (stopped ``linger`` seconds after their last subscriber leaves). Only on-demand ones linger.

    The files the config names are read first: the subscriber tokens (``self.auth``, swapped
    by :meth:`apply`) and the TLS certificate and key; a broken one raises
    :class:`~gateway.config.ConfigError` before anything starts.

    With ``[recorder] dir`` every followed fixture is recorded (docs/recorder.md): its topic
    continues the recorded epoch and seq, reads older frames from the files, and its upstream
    resumes from the recorded vendor position. *recorder*: one already opened (the service
    opens it in a worker thread: opening checks every recording); else it is opened here.
    """

    def __init__(self, config: Config, *, recorder: Recorder | None = None) -> None:
        self.auth = SubscriberAuth(load_subscriber_tokens(config))
        self.tls = load_server_tls(config)
        if recorder is None and config.recorder.enabled:
            recorder = Recorder(config.recorder)
        self.recorder = recorder
        self.config = config
        self.version = __version__
        self.started_at = time.time()
        self.fixtures = FixtureBook(
            lambda: self.config.feeds,
            (fx.key for fx in config.fixtures),
            follow=self._follow,
            stop=self._stop,
            is_followed=self.is_followed,
            subscribers=self._subscriber_count,
            max_api=lambda: self.config.api.max_fixtures,
            cluster_on_demand=self._cluster_on_demand,
        )
        self.hub = Hub(config.feeds, directory=self.fixtures)
        self.registry = SubscriberRegistry()
        # Counters of fixtures no longer followed, per feed: totals never go down.
        self._retired: dict[str, UpstreamCounters] = {}
        #: In a cluster (``[cluster]``): this instance's leases, relays and takeovers.
        self.cluster: ClusterNode | None = None
        #: The recorder's side of the cluster (``[recorder]`` with ``[cluster]``).
        self._cluster_recording: ClusterRecording | None = None
        if config.cluster is None:
            # Last: it follows the configured fixtures at once, into the hub's topics.
            self.supervisor = Supervisor(
                config,
                self._sink_for,
                resume_for=self._resume_for,
                watchers=self._subscriber_count,
            )
        else:
            # The node decides which fixtures this instance follows upstream (their owner).
            if recorder is not None:
                self._cluster_recording = ClusterRecording(recorder)
            self.supervisor = Supervisor(
                attrs.evolve(config, fixtures=()),
                self._sink_for,
                resume_for=self._resume_for,
                watchers=self._subscriber_count,
            )
            self.cluster = ClusterNode(
                config.cluster,
                hub=self.hub,
                supervisor=self.supervisor,
                movable=self.fixtures.is_configured,
                retire=self._retire,
                info=self._cluster_info,
                shared=self,
                password=load_cluster_password(config),
                recording=self._cluster_recording,
            )
            for fixture in config.fixtures:
                self.cluster.follow(fixture, False)
        supervisor = self.supervisor
        #: Replays (issue 23): limits, counters, and dedicated vendor connections for drop-in
        #: replays the gateway cannot serve, through the supervisor's connector and limiter.
        self.replays = Replays(
            config.replay,
            vendor=VendorLink(
                limiter=supervisor.limiter,
                connector=lambda: supervisor.connector,
                upstream=lambda: self.config.upstream,
            ),
        )
        self._supervisor_scope = trio.CancelScope()
        self._supervisor_done = trio.Event()
        self._ready = False
        self._draining = False
        self.bound: Bound | None = None
        #: The data plane's bound address, known before the control plane starts.
        self._stream_bound: ListenAddress | None = None

    # -- the root nursery's body ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED) -> None:
        """Start supervisor, data plane and control plane; ``started(Bound)`` once both
        listeners are bound. Runs until cancelled; cancellation closes every upstream and
        subscriber connection (use :meth:`drain` first for a graceful stop).

        In a cluster every line of every task started here names the instance (``instance``).
        """
        node = {} if self.cluster is None else {"instance": self.cluster.instance}
        with log_context(**node):
            await self._run(task_status=task_status)

    async def _run(self, *, task_status: trio.TaskStatus[Bound]) -> None:
        async with trio.open_nursery() as nursery:
            if self.recorder is not None:
                await nursery.start(self.recorder.run)
            await nursery.start(self.fixtures.run)
            await nursery.start(self._run_supervisor)
            if self.cluster is not None:
                await nursery.start(self.cluster.run)
            stream = await nursery.start(
                partial(
                    run_data_plane,
                    self.config,
                    self.hub,
                    self.registry,
                    auth=self.auth,
                    tls=self.tls,
                    replays=self.replays,
                )
            )
            self._stream_bound = stream
            http = await nursery.start(run_control_plane, self.config, self)
            self.bound = Bound(stream=stream, http=http)
            self._ready = True
            s = "s" if self.tls is not None else ""
            log.info(
                "gateway ready: stream ws%s://%s/v1/stream, http http%s://%s/ (%d fixtures)",
                s,
                stream,
                s,
                http,
                len(self._followed_keys()),
                extra=fields(stream=str(stream), http=str(http)),
            )
            task_status.started(self.bound)

    async def _run_supervisor(self, *, task_status: trio.TaskStatus[None]) -> None:
        # Its own scope so drain() can stop the upstreams (they close cleanly on cancel)
        # while the listeners keep running to send close frames.
        try:
            with self._supervisor_scope:
                await self.supervisor.run(task_status=task_status)
        finally:
            self._supervisor_done.set()

    async def drain(self) -> None:
        """Graceful stop, bounded by ``drain_timeout``: /readyz turns 503 at once, subscribers
        get close 1001 with :data:`~gateway.wire.DRAIN_REASON` spread over ``lame_duck_period``
        (at most half the drain time left by then), every upstream is closed. Never raises; what
        does not finish in time is cut when the caller cancels the root nursery."""
        self._draining = True
        self.fixtures.close()
        with trio.move_on_after(self.config.gateway.drain_timeout) as scope:
            if self.cluster is not None:
                # First: the others take this instance's fixtures over while it drains.
                # Make-before-break for up to half the drain time, then release the rest.
                await self.cluster.leave(handover_within=self.config.gateway.drain_timeout / 2)
            # Lame duck: closes spread, leaving half the time left for the last ones to finish.
            left = scope.deadline - trio.current_time()
            period = min(self.config.gateway.lame_duck_period, max(0.0, left / 2))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(self.registry.drain, period=period))
                self._supervisor_scope.cancel()
                nursery.start_soon(self._supervisor_done.wait)
        if scope.cancelled_caught:
            log.warning("drain did not finish within %.1f s", self.config.gateway.drain_timeout)

    # -- reload --------------------------------------------------------------------------------

    def apply(
        self, new: Config, *, tokens: SubscriberTokens | _Unread | None = _UNREAD
    ) -> dict[str, list[str]]:
        """Reconcile the configured fixtures with *new*; return what changed.

        Unchanged fixtures keep their connection and seq. Fixtures added through the API or on
        demand are left alone. ``[upstream]`` applies from the next connect attempt. The
        subscriber tokens (``[subscribers] tokens_file``, the path and the file's content) are
        re-read and apply to new connections; connected subscribers keep the access they had.
        Listener addresses and TLS files, ``[feeds]``, the rest of ``[subscribers]`` and
        ``[api]`` need a restart: a change there is reported (``needs_restart``), not applied,
        and a fixture of a feed that is new in *new* is reported as ``skipped``.

        *tokens*: the token file already read (the service reads it in a worker thread); when
        not given it is read here. Raises :class:`~gateway.config.ConfigError` (a broken token
        file) before changing anything: the running config, tokens included, stays as it was.
        """
        if isinstance(tokens, _Unread):
            tokens = load_subscriber_tokens(new)
        old = self.config
        skipped = [
            fx
            for fx in new.fixtures
            if fx.feed not in old.feeds and not self.fixtures.is_configured(*fx.key)
        ]
        needs_restart = [
            section
            for section in ("gateway", "feeds", "api", "recorder", "replay", "cluster")
            if getattr(old, section) != getattr(new, section)
        ]
        if attrs.evolve(old.subscribers, tokens_file=None) != attrs.evolve(
            new.subscribers, tokens_file=None
        ):
            needs_restart.append("subscribers")
        if old.upstream.client != new.upstream.client:
            needs_restart.append("upstream.client")
        kept = tuple(fx for fx in new.fixtures if fx.feed in old.feeds)
        subscribers = attrs.evolve(old.subscribers, tokens_file=new.subscribers.tokens_file)
        self.config = attrs.evolve(
            old, upstream=new.upstream, fixtures=kept, subscribers=subscribers
        )
        self.auth.replace(tokens)
        if tokens is None:
            log.info("subscriber access is open: no [subscribers] tokens_file")
        else:
            log.info("subscriber tokens: %d from %s", len(tokens), tokens.source)
        self.supervisor.update_config(self.config)
        added, removed = self.fixtures.reconcile(kept)
        return {
            "added": [f"{fx.feed}/{fx.id}" for fx in added],
            "removed": [f"{f}/{i}" for f, i in removed],
            "skipped": [f"{fx.feed}/{fx.id}" for fx in skipped],
            "needs_restart": needs_restart,
        }

    # -- upstream -> hub -----------------------------------------------------------------------

    def _sink_for(self, feed: FeedConfig, fixture: FixtureConfig) -> FrameSink:
        if self.cluster is not None:
            return self.cluster.sink(feed, fixture)
        recorder = self.recorder
        if recorder is None:
            return self.hub.topic(feed.name, fixture.id)
        log = recorder.fixture(feed.name, fixture.id)
        recorder.activate(log)  # first: it may move the numbering to a new epoch
        topic = self.hub.topic(
            feed.name,
            fixture.id,
            epoch=log.epoch,
            seq=log.last_seq,
            prior_epochs=log.prior_epochs,
        )
        if topic.epoch != log.epoch or topic.seq < log.last_seq:
            # A topic older than its recording (not expected: topics are made here): record
            # nothing rather than two numberings in one file.
            recorder.deactivate(log)
            return topic
        topic.archive = log
        return RecordedTopic(topic, recorder, log)

    def _resume_for(self, feed: FeedConfig, fixture: FixtureConfig) -> ResumePoint | None:
        """Where the upstream goes on: the cluster stream's or the recording's last vendor
        position, if any."""
        if self.cluster is not None:
            return self.cluster.resume_point(feed, fixture)
        if self.recorder is None:
            return None
        log = self.recorder.get(feed.name, fixture.id)
        if log is None or log.last_position is None or log.last_position_t is None:
            return None
        return ResumePoint(position=log.last_position, received_at=log.last_position_t)

    def _retire(self, handle: FixtureHandle) -> None:
        # Keep its counts so per-feed metrics stay monotonic after it is gone.
        feed = handle.feed.name
        self._retired[feed] = self._retired.get(feed, UpstreamCounters()) + handle.status.counters

    def _stop(self, feed: str, fixture: str) -> bool:
        # The FixtureBook's stop callback: only it calls this (it keeps its sets in step).
        handle = self.supervisor.get(feed, fixture)
        if handle is not None and handle.status.counters.frames:
            self.fixtures.remember(feed, fixture)
        if self.cluster is not None:
            stopped = self.cluster.unfollow(feed, fixture)
            self.hub.close_topic(feed, fixture)
            if self._cluster_recording is not None:
                self._cluster_recording.detach(feed, fixture)
            return stopped
        if handle is not None:
            self._retire(handle)
        stopped = self.supervisor.remove(feed, fixture)
        self.hub.close_topic(feed, fixture)
        if self.recorder is not None:
            log = self.recorder.get(feed, fixture)
            if log is not None:
                self.recorder.deactivate(log)
        return stopped

    def _follow(self, fixture: FixtureConfig, backlog: bool) -> bool:
        # The FixtureBook's follow callback (the supervisor is made after the book).
        if self.cluster is not None:
            return self.cluster.follow(fixture, backlog)
        return self.supervisor.add(fixture, backlog=backlog)

    def _subscriber_count(self, feed: str, fixture: str) -> int:
        topic = self.hub.get(feed, fixture)
        return 0 if topic is None else topic.subscriber_count

    # -- ControlTarget (HTTP API) --------------------------------------------------------------

    def is_ready(self) -> bool:
        return self._ready and not self._draining

    def is_draining(self) -> bool:
        return self._draining

    def degraded_reason(self) -> str | None:
        return None if self.cluster is None else self.cluster.degraded_reason()

    def _cluster_info(self) -> dict[str, object]:
        # What this instance tells the others with its heartbeat (GET /v1/cluster).
        bound = self.bound
        return {
            "version": self.version,
            "started_at": self.started_at,
            "stream": None if bound is None else str(bound.stream),
            "http": None if bound is None else str(bound.http),
            "ready": self.is_ready(),
        }

    def cluster_view(self) -> ClusterView | None:
        node = self.cluster
        if node is None:
            return None
        leases = node.leases_by_instance()
        appender = node.appender
        relay = node.relay
        owned = sum(1 for fx in node.followed() if node.role(fx.feed, fx.id) == ROLE_OWNER)
        reason = node.degraded_reason()
        standbys = node.standby.by_instance()
        counters = {
            "rounds": node.rounds,
            "round_errors": node.round_errors,
            "leases_gained": node.leases_gained,
            "leases_lost": node.leases_lost,
            "handovers": node.handovers,
            "handovers_warm": node.desk.made,
            "handovers_received": node.desk.received,
            "handover_fallbacks": node.desk.fallbacks,
            "warm_connections": node.desk.warmed,
            "standby_started": node.standby.started,
            "standby_promoted": node.standby.promoted,
            "standby_dropped": node.standby.dropped,
            "fenced": node.fenced,
            "leases_confirmed": node.leases_confirmed,
            "conflicts": node.conflicts,
            "connect_waits": node.connect_waits,
            "connect_unavailable": node.connect_unavailable,
            "frames_appended": 0 if appender is None else appender.frames_appended,
            "append_dropped": 0 if appender is None else appender.frames_dropped,
            "append_fenced": 0 if appender is None else appender.frames_fenced,
            "append_failures": 0 if appender is None else appender.failures,
            "frames_reappended": 0 if appender is None else appender.frames_reappended,
            "append_lost": 0 if appender is None else appender.frames_lost,
            "frames_relayed": 0 if relay is None else relay.entries_relayed,
            "relay_failures": 0 if relay is None else relay.failures,
            "relay_holds": 0 if relay is None else relay.holds,
        }
        return ClusterView(
            instance=node.instance,
            state="ok" if reason is None else "degraded",
            reason=reason,
            lease_ttl=node.config.lease_ttl,
            instances=[
                ClusterInstanceView(
                    name=name,
                    info=info,
                    leases=leases.get(name, 0),
                    silent=node.silent_for(name),
                    standbys=standbys.get(name, 0),
                )
                for name, info in sorted(node.live.items())
            ],
            owned=owned,
            relayed=len(node.followed()) - owned,
            counters=counters,
            relay_lag_max=max(relay.lag.values(), default=0.0) if relay is not None else 0.0,
            append_queued_bytes=0 if appender is None else appender.queued_bytes,
            view_at=node.view_at,
            unreachable_since=node.unreachable_since,
            standby=node.config.standby,
            standing_by=node.standby.in_step(),
        )

    def feeds(self) -> Mapping[str, FeedConfig]:
        return self.config.feeds

    def _followed_keys(self) -> list[tuple[str, str]]:
        if self.cluster is not None:
            return [fx.key for fx in self.cluster.followed()]
        return [(h.feed.name, h.config.id) for h in self.supervisor.handles()]

    def fixture_views(self) -> list[FixtureView]:
        views = (self.fixture_view(feed, fixture) for feed, fixture in self._followed_keys())
        return [v for v in views if v is not None]

    def fixture_view(self, feed: str, fixture: str) -> FixtureView | None:
        node = self.cluster
        topic: Topic | None = self.hub.get(feed, fixture)
        handle = self.supervisor.get(feed, fixture)
        owner = role = standby = None
        if node is None:
            if handle is None:
                return None
            status = handle.status
        else:
            if not node.is_followed(feed, fixture):
                return None
            owner, role = node.owner(feed, fixture), node.role(feed, fixture)
            standby = node.standby.of(f"{feed}/{fixture}")
            if handle is not None and role == ROLE_OWNER:
                status = handle.status
            else:
                # Another instance follows it upstream: the state its owner published (or
                # degraded/connecting), as the topic shows it to subscribers. The counters are
                # this instance's warm connection's (a standby, a handover), if it has one.
                status = FixtureStatus(
                    feed,
                    fixture,
                    state=topic.state if topic else FixtureState.CONNECTING,
                    state_since=topic.state_since if topic else self.started_at,
                    detail=topic.detail if topic else "",
                )
        return FixtureView(
            feed=feed,
            fixture=fixture,
            state=status.state,
            state_since=status.state_since,
            detail=status.detail,
            seq=topic.seq if topic else 0,
            epoch=topic.epoch if topic else "",
            subscribers=topic.subscriber_count if topic else 0,
            frames_per_second=topic.frames_per_second() if topic else 0.0,
            upstream=(status if handle is None else handle.status).snapshot(),
            drops=topic.drops if topic else 0,
            slow_disconnects=topic.slow_disconnects if topic else 0,
            recording=self._recording_view(feed, fixture),
            owner=owner,
            role=role,
            standby=standby,
            frame_age=topic.frame_age() if topic else None,
        )

    def is_followed(self, feed: str, fixture: str) -> bool:
        if self.cluster is not None:
            return self.cluster.is_followed(feed, fixture)
        return self.supervisor.get(feed, fixture) is not None

    def follow(self, feed: str, fixture: str, backfill: int) -> bool:
        if feed not in self.config.feeds:
            raise UnknownFeedError(f"unknown feed {feed!r}")
        fx = FixtureConfig(feed=feed, id=fixture, backfill=backfill)
        created = self.fixtures.follow(fx)
        if self.cluster is not None and self.fixtures.is_api(feed, fixture):
            self.cluster.share_follow(fx)
        return created

    def unfollow(self, feed: str, fixture: str) -> bool:
        if not self.is_followed(feed, fixture):
            return False
        if self.cluster is not None:
            self.cluster.share_unfollow(feed, fixture)
        return self.fixtures.stop(feed, fixture)

    async def sync_fixtures(self) -> bool:
        return True if self.cluster is None else await self.cluster.sync_shared()

    # -- the cluster's shared fixtures (gateway.service._cluster.SharedFixtures) ----------------

    def follow_shared(self, fixture: FixtureConfig) -> None:
        if not self._draining:
            self.fixtures.follow(fixture, limit=False)

    def stop_shared(self, feed: str, fixture: str) -> None:
        if self.fixtures.is_api(feed, fixture):
            self.fixtures.stop(feed, fixture)

    def on_demand_of(self, feed: str) -> list[str]:
        return self.fixtures.on_demand_of(feed)

    def _cluster_on_demand(self, feed: str) -> Collection[str]:
        return () if self.cluster is None else self.cluster.cluster_on_demand(feed)

    def latest(self, feed: str, fixture: str) -> str | None:
        if not self.is_followed(feed, fixture):
            return None
        topic = self.hub.get(feed, fixture)
        return topic.latest if topic else None

    def subscriber_views(
        self, after: str | None = None, limit: int | None = None
    ) -> list[SubscriberView]:
        return self.registry.views(after, limit)

    async def subscriber_query(self, query: SubscriberQuery) -> Page[SubscriberView]:
        return await self.registry.query(query)

    def disconnect_subscriber(self, ident: str, reason: str) -> bool:
        return self.registry.disconnect(ident, reason)

    def stream_endpoint(self) -> StreamEndpoint | None:
        bound = self._stream_bound
        if bound is None:
            return None
        return StreamEndpoint.for_listener(
            bound, self.config.gateway.http_listen.host, tls=self.tls is not None, path=STREAM_PATH
        )

    @property
    def fanout_latency(self) -> LatencyHistogram:
        return self.hub.fanout_latency

    def data_age(self) -> Mapping[str, Histogram]:
        return self.supervisor.data_age

    def feed_totals(self) -> dict[str, FeedTotals]:
        refused = self.fixtures.refused()
        upstream = {name: self._retired.get(name, UpstreamCounters()) for name in self.config.feeds}
        for handle in self.supervisor.handles():
            name = handle.feed.name
            upstream[name] = upstream.get(name, UpstreamCounters()) + handle.status.counters
        return {
            name: FeedTotals(upstream=counters, on_demand_refused=refused.get(name, 0))
            for name, counters in upstream.items()
        }

    def totals(self) -> Totals:
        stats = self.registry.stats()
        return Totals(
            frames_out=stats.frames_sent,
            bytes_out=stats.bytes_sent,
            drops=stats.frames_dropped,
            slow_disconnects=stats.slow_disconnects,
            rate_limited=stats.rate_limited,
            ping_timeouts=stats.ping_timeouts,
            disconnected=stats.disconnected,
            subscribers=stats.connections,
            batched=stats.batched,
            batch_groups=stats.batch_groups,
            upstream=sum_counters(f.upstream for f in self.feed_totals().values()),
            auth_failures=dict(self.auth.failures),
        )

    # -- recordings ----------------------------------------------------------------------------

    def _recording_view(self, feed: str, fixture: str) -> RecordingView | None:
        if self.recorder is None:
            return None
        log = self.recorder.get(feed, fixture)
        return None if log is None else recording_view(log)

    def recordings(self) -> list[RecordingView]:
        if self.recorder is None:
            return []
        return [recording_view(log) for log in self.recorder.recordings()]

    def replay_counters(self) -> ReplayCounters:
        return self.replays.counters

    def recorder_totals(self) -> RecorderTotals | None:
        recorder = self.recorder
        if recorder is None:
            return None
        written: dict[str, int] = {}
        dropped: dict[str, int] = {}
        states: dict[str, int] = {}
        stored = 0
        for log in recorder.logs():
            written[log.feed] = written.get(log.feed, 0) + log.frames_written
            dropped[log.feed] = dropped.get(log.feed, 0) + log.frames_dropped + log.frames_failed
            if log.listed:
                states[log.state] = states.get(log.state, 0) + 1
            stored += log.stored_bytes
        return RecorderTotals(
            frames_written=written,
            frames_dropped=dropped,
            fixtures=states,
            queued_bytes=recorder.queued_bytes,
            stored_bytes=stored,
        )

    def recording_download(
        self, feed: str, fixture: str, after: int, limit: int | None
    ) -> AsyncIterator[bytes] | None:
        if self.recorder is None:
            return None
        log = self.recorder.get(feed, fixture)
        if log is None or not (log.active or log.has_frames):
            return None
        return self.recorder.download(log, after=after, limit=limit)

    def summary(self) -> str:
        """One line for sd_notify STATUS= and the log."""
        views = self.fixture_views()
        live = sum(1 for v in views if v.state is FixtureState.LIVE)
        stats = self.registry.stats()
        return (
            f"fixtures live {live}/{len(views)}, subscribers {stats.connections}, "
            f"drops {stats.frames_dropped}"
        )
