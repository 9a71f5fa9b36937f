"""The facade the control plane reads and drives: :class:`ControlTarget` and its plain views.

The control plane depends on nothing else in the gateway. The service object implements this
protocol over the real upstream supervisor, hub and data plane; the tests use an in-memory
double (``MemoryTarget``, in the repository's tests).

Every method is called from the trio thread that runs the HTTP server (the handlers are all
``async def``, so Starlette never moves them to a worker thread) and must return promptly without
blocking: they read in-memory state. The views are snapshots: frozen values, safe to keep after
the call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Final, Protocol

import attrs

from gateway.config import FeedConfig, ListenAddress
from gateway.dataplane import Page, SubscriberQuery, SubscriberView
from gateway.model import FixtureState, UpstreamCounters
from gateway.replay import ReplayCounters

#: Listen hosts meaning "every address": a browser reaches them by the host it already uses.
WILDCARD_HOSTS: Final = frozenset({"", "0.0.0.0", "::"})


@attrs.frozen
class FixtureView:
    """One followed fixture as ``GET /v1/fixtures/{feed}/{fixture}`` shows it.

    ``upstream`` is :meth:`gateway.model.FixtureStatus.snapshot` (keys:
    :func:`gateway.model.snapshot_keys`). ``state_since`` is a UNIX time.
    """

    feed: str
    fixture: str
    state: FixtureState
    state_since: float
    detail: str
    seq: int
    epoch: str
    subscribers: int
    frames_per_second: float
    upstream: Mapping[str, Any]
    #: Frames dropped for this fixture's subscribers (drop-oldest), and its subscribers closed
    #: as too slow (4008); both since the fixture's topic was created.
    drops: int = 0
    slow_disconnects: int = 0
    #: The fixture's recording (:class:`RecordingView`), or None without a recorder.
    recording: RecordingView | None = None
    #: In a cluster: the instance that holds the fixture's lease (None: none now) and this
    #: instance's role for it (``owner`` or ``relay``). Both None on a single node.
    owner: str | None = None
    role: str | None = None
    #: In a cluster with ``standby``: the instance that stands by for the fixture (a warm
    #: vendor connection, takes over without a reconnect), as this instance sees it; None
    #: without standby, on a single node, or while there is none.
    standby: str | None = None
    #: Seconds since the fixture's last frame reached its subscribers (None: none yet).
    frame_age: float | None = None


@attrs.frozen
class StreamEndpoint:
    """Where subscribers reach ``/v1/stream``, as a browser on the control plane's page needs it.

    ``host`` is None when the stream listener is on the same address as the HTTP listener, or
    on every address (``0.0.0.0``, ``::``): the page then uses the host it was loaded from (a
    name, a TLS certificate's name, a tunnel). ``tls``: ``wss://`` instead of ``ws://``.
    """

    host: str | None
    port: int
    tls: bool
    path: str

    @classmethod
    def for_listener(
        cls, stream: ListenAddress, http_host: str, *, tls: bool, path: str
    ) -> StreamEndpoint:
        """The endpoint of a stream listener bound at *stream*, next to an HTTP listener on
        *http_host*."""
        same = stream.host in WILDCARD_HOSTS or stream.host == http_host
        return cls(host=None if same else stream.host, port=stream.port, tls=tls, path=path)


@attrs.frozen
class RecordingView:
    """One fixture's recording on disk (``GET /v1/recordings``, a fixture's ``recording``).

    ``state``: ``recording``, ``stopped`` (followed but not recorded: ``reason`` says why) or
    ``idle`` (not followed). Seqs and times are of the frames on disk (``first_seq`` greater
    than ``last_seq``: none); ``durable_seq`` is the last one known fsynced. ``bytes`` is the
    size of its files.
    """

    feed: str
    fixture: str
    state: str
    reason: str
    epoch: str
    first_seq: int
    last_seq: int
    durable_seq: int
    first_time: float | None
    last_time: float | None
    bytes: int
    frames_dropped: int


#: The counters of :attr:`ClusterView.counters` with their help texts, defined once: the keys
#: of ``GET /v1/cluster``'s ``counters`` (every one present) and the Prometheus counters
#: ``dde_cluster_<name>_total``. A key the facade gives that is not here is not shown.
CLUSTER_COUNTERS: Final[Mapping[str, str]] = {
    "rounds": "Cluster rounds run (heartbeat, leases, stream metas), successful or not.",
    "round_errors": "Cluster rounds that ended in an unexpected error (a bug; logged).",
    "leases_gained": "Fixture leases this instance took over (it became the owner).",
    "leases_lost": "Fixture leases this instance found held by another or expired (it relays).",
    "handovers": "Owned fixtures handed over to another instance (balance, or this one "
    "stopping), make-before-break or not.",
    "handovers_warm": "Owned fixtures handed over make-before-break: the successor's vendor "
    "connection was open and in step before this one's closed.",
    "handovers_received": "Fixtures taken over from this instance's warm vendor connection (a "
    "planned handover to it).",
    "handover_fallbacks": "Handovers whose successor was not in step in time: released "
    "(break-before-make).",
    "warm_connections": "Warm vendor connections opened for a planned handover to this instance.",
    "standby_started": "Standby vendor connections opened here ([cluster] standby): warm "
    "connections for fixtures another instance owns.",
    "standby_promoted": "Fixtures taken over from this instance's standby connection after "
    "their owner died: no vendor reconnect.",
    "standby_dropped": "Standby connections closed without a take-over (another instance "
    "stands by now, the fixture is no longer followed, this instance is stopping, or not in "
    "step with the stream at the take-over).",
    "fenced": "Owned fixtures fenced: the lease ran out locally or Redis refused an append.",
    "leases_confirmed": "Owned fixtures whose lease ran out locally (the process was paused) "
    "and that Redis confirmed as still held here: kept, not fenced.",
    "conflicts": "Stream frames that differed from the frame published here under the same seq "
    "(a paused owner's): the topic was replaced.",
    "connect_waits": "Upstream connects that waited for a cluster-wide connect slot.",
    "connect_unavailable": "Upstream connects made on the local limit alone (Redis not answering).",
    "frames_appended": "Frames appended to the fixtures' Redis streams.",
    "append_dropped": "Frames dropped before reaching Redis (append queue over its byte limit).",
    "append_fenced": "Frames not appended because the lease was gone (refused by Redis, or "
    "discarded from the queue).",
    "append_failures": "Append requests that failed (Redis unreachable); each is retried.",
    "frames_reappended": "Frames appended again from memory after Redis lost them (a restart "
    "without its data, or a failover to a replica that lacked them).",
    "append_lost": "Frames Redis lost that were no longer in the owner's memory history "
    "(relays see a gap).",
    "frames_relayed": "Stream entries relayed into this instance's topics.",
    "relay_failures": "Relay reads that failed (Redis unreachable); each is retried.",
    "relay_holds": "Relayed streams catching up that waited for their subscribers' queues to "
    "drain (instead of overflowing them).",
}

#: What ``GET /v1/cluster`` shows of an instance's heartbeat info (:attr:`ClusterInstanceView.
#: info`), each key with the JSON type it must have: another key is left out, a value of another
#: type (an instance of another version) shows as null. The info comes from Redis, written by
#: any instance: only these keys ever reach a response.
CLUSTER_INFO_KEYS: Final[Mapping[str, type]] = {
    "version": str,
    "started_at": float,
    "http": str,
    "stream": str,
    "ready": bool,
}


@attrs.frozen
class ClusterInstanceView:
    """One live instance of the cluster, as its heartbeat describes it."""

    name: str
    #: What the instance publishes with its heartbeat (version, start time, listeners); the
    #: API shows the keys of :data:`CLUSTER_INFO_KEYS` only.
    info: Mapping[str, Any]
    #: Fixtures followed here that this instance holds the lease of (as last seen).
    leases: int
    #: Seconds since its heartbeat last moved, once it has gone silent (several rounds without
    #: one: killed without a goodbye, or hung); None while it is heard every round.
    silent: float | None = None
    #: Followed fixtures this instance stands by for (``[cluster] standby``), as this
    #: instance computes it from its view (rendezvous, the owner left out); 0 without standby.
    standbys: int = 0


@attrs.frozen
class ClusterView:
    """This instance's view of its cluster (``GET /v1/cluster``)."""

    instance: str
    #: ``ok`` or ``degraded`` (Redis unreachable: see ``reason``).
    state: str
    reason: str | None
    lease_ttl: float
    instances: Sequence[ClusterInstanceView]
    #: Fixtures this instance owns, and relays.
    owned: int
    relayed: int
    #: Monotonic counters since start, keys of :data:`CLUSTER_COUNTERS` (which describes each;
    #: a missing one reads 0).
    counters: Mapping[str, int] = attrs.field(factory=dict)
    #: Seconds from the owner's receipt of the last relayed frame to its relay here, the
    #: largest over the relayed fixtures (0: none relayed).
    relay_lag_max: float = 0.0
    #: Bytes of frames waiting to be appended to Redis.
    append_queued_bytes: int = 0
    #: UNIX time of the last round that reached Redis: the instances, leases and owners shown
    #: are as of then (None: not yet).
    view_at: float | None = None
    #: UNIX time since which Redis has not answered this instance's rounds (None: it does).
    unreachable_since: float | None = None
    #: ``[cluster] standby``: a second instance per fixture keeps a warm vendor connection.
    standby: bool = False
    #: Standby vendor connections here in step with their streams (ready to take over).
    standing_by: int = 0


@attrs.frozen
class RecorderTotals:
    """The recorder's counters: per feed since start (monotonic), and gauges."""

    frames_written: Mapping[str, int] = attrs.field(factory=dict)
    #: Published frames not recorded (queue full, write errors, recording stopped).
    frames_dropped: Mapping[str, int] = attrs.field(factory=dict)
    #: Fixtures per state (``recording``, ``stopped``, ``idle``).
    fixtures: Mapping[str, int] = attrs.field(factory=dict)
    queued_bytes: int = 0
    stored_bytes: int = 0


@attrs.frozen
class Totals:
    """Process-wide counters since start. All are monotonic except ``subscribers``, ``batched``
    and ``batch_groups`` (gauges).

    ``upstream`` is the sum of every fixture's :class:`~gateway.model.UpstreamCounters`, those
    stopped included. ``auth_failures``: failed subscriber authentications per endpoint kind
    (``gateway.dataplane.AUTH_ENDPOINTS``; a kind that is absent counts 0).
    """

    frames_out: int = 0
    #: Bytes written to subscriber sockets (frames, replies, closes; before TLS).
    bytes_out: int = 0
    drops: int = 0
    slow_disconnects: int = 0
    #: Subscribers closed for sending frames too fast (1008) / for not answering a ping (1011).
    rate_limited: int = 0
    ping_timeouts: int = 0
    #: Subscribers an operator disconnected (``DELETE /v1/subscribers/{id}``).
    disconnected: int = 0
    subscribers: int = 0
    #: Subscribers written as part of a batch group now, and those groups (gauges).
    batched: int = 0
    batch_groups: int = 0
    upstream: UpstreamCounters = attrs.field(factory=UpstreamCounters)
    auth_failures: Mapping[str, int] = attrs.field(factory=dict)

    @property
    def frames_in(self) -> int:
        """Upstream data frames accepted (``upstream.frames``)."""
        return self.upstream.frames


@attrs.frozen
class FeedTotals:
    """Monotonic upstream counters of one feed, summed over every fixture it ever followed.

    Kept per feed by the service (not summed from :meth:`ControlTarget.fixture_views`) so an
    unfollowed fixture does not make a Prometheus counter go down.
    """

    upstream: UpstreamCounters = attrs.field(factory=UpstreamCounters)
    #: Subscriptions refused because the feed already followed ``max_on_demand`` fixtures.
    on_demand_refused: int = 0


class FollowLimitError(Exception):
    """The gateway follows as many fixtures through the API as it may (``[api] max_fixtures``).

    Raised by :meth:`ControlTarget.follow`; the message says why and is safe to show a client.
    """


class LatencyHistogram(Protocol):
    """Fan-out latency observations in seconds.

    ``buckets`` are finite, increasing upper bounds; ``counts[i]`` is the number of observations
    in ``(buckets[i-1], buckets[i]]`` (per bucket, not cumulative; a trailing extra entry for
    values above the last bound is allowed and ignored). ``count`` is every observation, so the
    ``+Inf`` bucket is ``count``.
    """

    @property
    def buckets(self) -> Sequence[float]: ...
    @property
    def counts(self) -> Sequence[int]: ...
    @property
    def sum(self) -> float: ...
    @property
    def count(self) -> int: ...


class ControlTarget(Protocol):
    """What the control plane needs from the running gateway."""

    @property
    def version(self) -> str: ...

    @property
    def started_at(self) -> float:
        """UNIX time the process started."""
        ...

    @property
    def fanout_latency(self) -> LatencyHistogram: ...

    def is_ready(self) -> bool:
        """Listeners bound and config loaded, and not draining."""
        ...

    def is_draining(self) -> bool: ...

    def degraded_reason(self) -> str | None:
        """Why the gateway runs degraded (it serves, but e.g. its cluster's Redis is
        unreachable), or None."""
        ...

    def cluster_view(self) -> ClusterView | None:
        """The cluster as this instance sees it, or None on a single node."""
        ...

    def feeds(self) -> Mapping[str, FeedConfig]: ...

    def fixture_views(self) -> list[FixtureView]: ...

    def fixture_view(self, feed: str, fixture: str) -> FixtureView | None:
        """The fixture's view, or None when it is not followed."""
        ...

    def follow(self, feed: str, fixture: str, backfill: int) -> bool:
        """Start following. True when newly followed, False when it already was.

        Raises :class:`gateway.hub.UnknownFeedError` for a feed that is not configured and
        :class:`FollowLimitError` when a new fixture would pass ``[api] max_fixtures``. After
        it returns, :meth:`fixture_view` of the
        fixture is not None.
        """
        ...

    def unfollow(self, feed: str, fixture: str) -> bool:
        """Stop following. False when the fixture was not followed."""
        ...

    async def sync_fixtures(self) -> bool:
        """Make this instance's API fixtures the cluster's before an API change is answered:
        its own changes written to Redis, the cluster's set read (a fixture another
        instance's API added is followed here from now). True at once on a single node;
        False when the cluster's Redis did not answer (the changes are written later)."""
        ...

    def latest(self, feed: str, fixture: str) -> str | None:
        """The last raw upstream frame text of the fixture, or None."""
        ...

    def subscriber_views(
        self, after: str | None = None, limit: int | None = None
    ) -> list[SubscriberView]:
        """The connected subscribers in id order (:func:`gateway.dataplane.subscriber_order`):
        those after the id *after* (None: from the first), at most *limit* (None: all). Builds
        views for the returned subscribers only."""
        ...

    async def subscriber_query(self, query: SubscriberQuery) -> Page[SubscriberView]:
        """The page of connected subscribers *query* selects (filters, order, cursor, limit:
        :mod:`gateway.dataplane`), yielding to the event loop while it examines them."""
        ...

    def disconnect_subscriber(self, ident: str, reason: str) -> bool:
        """Close subscriber *ident* as an operator asked (close code and reason:
        :data:`gateway.wire.CLOSE_DISCONNECTED`). False when there is no such subscriber."""
        ...

    def stream_endpoint(self) -> StreamEndpoint | None:
        """The subscriber stream's address (None before the data plane is bound)."""
        ...

    def totals(self) -> Totals: ...

    def feed_totals(self) -> Mapping[str, FeedTotals]:
        """Per-feed monotonic counters (an addition to the original brief, for the metrics)."""
        ...

    def data_age(self) -> Mapping[str, LatencyHistogram]:
        """Per feed: seconds from the vendor's stamp on a frame to its receipt here (a feed is
        present once one of its fixtures was followed)."""
        ...

    def recordings(self) -> list[RecordingView]:
        """Every recorded fixture (empty without a recorder)."""
        ...

    def recorder_totals(self) -> RecorderTotals | None:
        """The recorder's counters, or None without a recorder."""
        ...

    def replay_counters(self) -> ReplayCounters:
        """The replays' counters (running, started, refused, frames; gateway.replay)."""
        ...

    def recording_download(
        self, feed: str, fixture: str, after: int, limit: int | None
    ) -> AsyncIterator[bytes] | None:
        """The record lines of a fixture after seq *after* (at most *limit*), verbatim, as
        chunks read off the event loop; None when the fixture has no recording. Nothing is
        opened or read before the first chunk is asked for (the API may drop the iterator
        unread when the download limits refuse it)."""
        ...
