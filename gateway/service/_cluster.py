"""This instance as a member of a cluster: leases, owner and relay roles, takeovers.

:class:`ClusterNode` decides, fixture by fixture, whether this instance follows the vendor
(*owner*: it holds the fixture's lease; its upstream runner publishes into the local topic
through an :class:`OwnedTopic`, which also queues each frame for the appender) or reads the
fixture's Redis stream into the local topic (*relay*: :class:`RelayedTopic`). Either way the
hub topic carries the cluster's numbering (epoch and seq), so subscribers, drop-in endpoints,
backfill and resume behave the same on every instance. The rules of the leases are in
:mod:`gateway.cluster._lease`, the Redis side in :mod:`gateway.cluster._store`; this module
ties them to the hub and the upstream supervisor, and is the only one that knows all four.

One *round* every :func:`~gateway.cluster.tick_interval` (at most a second):

1. heartbeat: this instance's entry in the live set (and the others', with their info);
2. leases: release what is to be handed over or no longer followed, then acquire/renew in one
   request; for each lease gained, *take over* (below); for each lost, *step down*;
3. leases past their local validity while Redis still answers (a process that was paused):
   step down before anything else is published;
4. metas: each relayed fixture's epoch and its owner's upstream state (shown by the topic).

Taking over: the stream's last entry gives seq and vendor position; the local topic first
relays what it has not yet, then the upstream runner starts with that position as its resume
point (tracking backfill from ``ix``, fastpath ``startPosition``), so the next vendor frame gets
the next seq: no gap, no duplicate. Stepping down stops the runner and drops the frames not
yet appended; the relay goes on from the last seq Redis confirmed, skipping frames the topic
already holds byte for byte (a conflict, which only a paused owner can cause, replaces the
topic: its subscribers are told and resubscribe).

When Redis does not answer, owners keep their upstreams and keep fanning out locally (appends
are retried, then dropped and counted), relays report their fixtures ``degraded``, no lease is
taken, and ``/readyz`` says why; everything resumes by itself when Redis is back.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

import orjson
import trio

from gateway.cluster import (
    BEAT_KEY,
    HANDOVER_POLL,
    LEAVING_KEY,
    Appender,
    Entry,
    LeaseTable,
    Liveness,
    Meta,
    RedisStore,
    RedisUnavailable,
    Relay,
    StreamArchive,
    WarmSink,
    holder_token,
    open_store,
    rank,
)
from gateway.config import ClusterSection, FeedConfig, FixtureConfig, Secret
from gateway.hub import Hub, Topic
from gateway.model import FixtureState, FrameSink, ResumePoint
from gateway.service._clusterrec import TopicRecording
from gateway.service._handover import REBALANCING, STOPPING, HandoverDesk
from gateway.service._standby import StandbyDesk
from gateway.throttle import LogThrottle
from gateway.upstream import FixtureHandle, Supervisor

log = logging.getLogger("gateway.cluster")

#: The environment variable that names the instance when ``[cluster] instance`` is not set
#: (the systemd template unit sets it to the unit's instance name).
INSTANCE_ENV: Final = "DDE_GATEWAY_INSTANCE"
#: How long a handover waits for the fixture's queued frames to reach Redis before releasing.
HANDOVER_FLUSH: Final = 2.0
#: Entries asked per request when a topic catches up with its stream before taking over.
CATCH_UP_COUNT: Final = 1000
#: Frames an owner holds back while Redis is asked whether its lease, run out locally (a
#: paused process), is still its own; past this many it is fenced without waiting.
HELD_MAX: Final = 10_000

ROLE_OWNER: Final = "owner"
ROLE_RELAY: Final = "relay"


def instance_name(config: ClusterSection) -> str:
    """``[cluster] instance``, else ``$DDE_GATEWAY_INSTANCE``, else ``hostname-pid``."""
    if config.instance:
        return config.instance
    env = os.environ.get(INSTANCE_ENV, "").strip()
    if env:
        return env
    return f"{socket.gethostname()}-{os.getpid()}"


def fixture_key(feed: str, fixture: str) -> str:
    return f"{feed}/{fixture}"


def split_key(key: str) -> tuple[str, str]:
    feed, fixture = key.rsplit("/", 1)
    return feed, fixture


class OwnedTopic:
    """The owner's ``FrameSink``: publish into the topic, then queue the frame for Redis.

    Once the lease is past its local validity (the process was paused), frames are held back
    and the node asks Redis at once: the lease still its own, they are published in order
    (:meth:`release_held`); else the node fences the fixture, the held frames are dropped and
    a new owner resumes from the stream, where they are fetched again.
    """

    __slots__ = ("active", "appender", "held", "key", "node", "position", "received_at", "topic")

    def __init__(self, node: ClusterNode, key: str, topic: Topic, appender: Appender) -> None:
        self.node = node
        self.key = key
        self.topic = topic
        self.appender = appender
        self.active = True
        #: The last vendor position published and when it was received (a take-over after
        #: Redis lost the stream goes on from here).
        self.position: int | None = None
        self.received_at = 0.0
        #: Frames held back while the lease is confirmed (see the class docstring).
        self.held: list[tuple[str, int | None]] = []

    def publish(self, raw: str, position: int | None) -> None:
        if not self.active:
            return
        if not self.node.may_publish(self.key):
            if len(self.held) >= HELD_MAX:
                self.node.fence(self.key, "lease expired and not confirmed in time")
                return
            self.held.append((raw, position))
            self.node.confirm(self.key)
            return
        if self.held:
            self.release_held()
        self._publish(raw, position)

    def release_held(self) -> None:
        """The lease was confirmed: publish the frames held back, in order."""
        held, self.held = self.held, []
        for raw, position in held:
            self._publish(raw, position)

    def _publish(self, raw: str, position: int | None) -> None:
        topic = self.topic
        topic.publish(raw, position)
        frame = topic.latest_frame
        assert frame is not None
        now = time.time()
        if position is not None:
            self.position = position
            self.received_at = now
        self.appender.append(self.key, topic.epoch, frame.seq, position, now, frame.raw_bytes)

    def set_status(self, state: FixtureState, detail: str) -> None:
        if not self.active:
            return
        self.topic.set_status(state, detail)
        self.appender.status(self.key, self.topic.epoch, state.value, detail)


class RelayedTopic:
    """A relay's sink: stream entries into the topic under the cluster's numbering."""

    __slots__ = ("key", "node", "position", "received_at", "topic")

    def __init__(self, node: ClusterNode, key: str, topic: Topic) -> None:
        self.node = node
        self.key = key
        self.topic = topic
        #: The last vendor position relayed and when its owner received it (a takeover with
        #: a lost stream goes on from here).
        self.position: int | None = None
        self.received_at: float | None = None

    def backlog(self) -> float:
        return self.topic.backlog()

    def relay(self, entries: Sequence[Entry]) -> None:
        topic = self.topic
        for e in entries:
            if e.seq <= topic.seq:
                held = topic.held_bytes(e.seq)
                if held is not None and held != e.data:
                    self.node.conflict(self.key, e.seq)
                    return
                continue
            topic.publish_at(e.seq, e.data, e.position)
            if e.position is not None:
                self.position = e.position
                self.received_at = e.received_at


class SharedFixtures(Protocol):
    """What the node needs of the service's FixtureBook to share API and on-demand fixtures
    with the other instances."""

    def follow_shared(self, fixture: FixtureConfig) -> None:
        """Another instance's API followed *fixture*: follow it here too."""

    def stop_shared(self, feed: str, fixture: str) -> None:
        """Another instance's API deleted *fixture*: stop it here if the API had added it."""

    def on_demand_of(self, feed: str) -> list[str]:
        """The fixtures of *feed* this instance follows on demand."""
        ...


class ClusterNode:
    """See the module docstring. Built by the service's ``Gateway``; run in its nursery."""

    def __init__(
        self,
        config: ClusterSection,
        *,
        hub: Hub,
        supervisor: Supervisor,
        movable: Callable[[str, str], bool],
        retire: Callable[[FixtureHandle], None],
        info: Callable[[], dict[str, Any]],
        shared: SharedFixtures | None = None,
        password: Secret | None = None,
        recording: TopicRecording | None = None,
    ) -> None:
        self.config = config
        self.instance = instance_name(config)
        self.token = holder_token(self.instance, secrets.token_hex(6))
        self.table = LeaseTable(self.instance, config.lease_ttl, token=self.token)
        self.liveness = Liveness(self.instance, self.table.tick)
        self._hub = hub
        self._supervisor = supervisor
        self._movable = movable
        self._retire = retire
        self._info = info
        self._shared = shared
        self._password = password
        #: The recorder (``[recorder]``): every topic records what it takes.
        self._recording = recording
        #: API changes of this instance not yet written to the cluster's set.
        self._api_add: dict[str, int] = {}
        self._api_del: set[str] = set()
        #: The cluster's API set as last read (a key gone from it was deleted elsewhere).
        self._api_seen: set[str] = set()
        self._shared_lock = trio.Lock()
        #: Per on-demand feed: the fixtures followed on demand anywhere in the cluster.
        self._demand: dict[str, set[str]] = {}
        self._fixtures: dict[str, FixtureConfig] = {}
        self._backlog: dict[str, bool] = {}
        self._owned: dict[str, OwnedTopic] = {}
        self._relayed: dict[str, RelayedTopic] = {}
        #: Followed fixtures whose stream has no epoch yet (nobody owned them): not relayed.
        self._waiting: set[str] = set()
        self._resume: dict[str, ResumePoint] = {}
        #: Where this instance's own upstream of a fixture was when it stopped owning it:
        #: (the topic's seq then, the resume point).
        self._local_points: dict[str, tuple[int, ResumePoint]] = {}
        self._metas: dict[str, Meta] = {}
        #: Each followed fixture's stream as its topic's archive (old frames for backfills).
        self._archives: dict[str, StreamArchive] = {}
        self._store: RedisStore | None = None
        self._appender: Appender | None = None
        self._relay: Relay | None = None
        self._wake = trio.Event()
        self._errors = LogThrottle(log)
        #: Live instances (name -> info) as of the last heartbeat.
        self.live: dict[str, dict[str, Any]] = {}
        self.redis_error: str | None = None
        #: UNIX time of the last round that reached Redis (the view shown is as of then).
        self.view_at: float | None = None
        #: UNIX time since which rounds find Redis unreachable (None: they do not).
        self.unreachable_since: float | None = None
        self.leases_gained = 0
        self.leases_lost = 0
        self.handovers = 0
        self.fenced = 0
        #: Owned leases that ran out locally (a paused process) and Redis confirmed as ours.
        self.leases_confirmed = 0
        self.conflicts = 0
        self.connect_waits = 0
        self.connect_unavailable = 0
        self.rounds = 0
        #: Rounds that ended in an unexpected error (a bug; logged with its traceback).
        self.round_errors = 0
        self._left = False
        #: The first lease round (look, do not claim) is done.
        self._looked = False
        #: Planned handovers under way, both sides (make-before-break).
        self._desk = HandoverDesk(self)
        #: Hot standby (``[cluster] standby``): warm connections kept for others' fixtures.
        self._standby = StandbyDesk(self)
        #: Stopping: every owned fixture is offered to another instance, none is taken.
        self._draining = False
        #: When the last round started (trio time): polls run between rounds.
        self._round_at = -float("inf")

    # -- views ---------------------------------------------------------------------------------

    def is_followed(self, feed: str, fixture: str) -> bool:
        return fixture_key(feed, fixture) in self._fixtures

    def followed(self) -> list[FixtureConfig]:
        return list(self._fixtures.values())

    def role(self, feed: str, fixture: str) -> str:
        return ROLE_OWNER if fixture_key(feed, fixture) in self._owned else ROLE_RELAY

    def owner(self, feed: str, fixture: str) -> str | None:
        key = fixture_key(feed, fixture)
        if key in self._owned:
            return self.instance
        return self.table.holder(key)

    @property
    def desk(self) -> HandoverDesk:
        """The planned handovers under way and their counters."""
        return self._desk

    @property
    def standby(self) -> StandbyDesk:
        """Hot standby: the connections this instance stands by with, and their counters."""
        return self._standby

    @property
    def appender(self) -> Appender | None:
        return self._appender

    @property
    def relay(self) -> Relay | None:
        return self._relay

    def degraded_reason(self) -> str | None:
        """Why this instance is degraded (Redis unreachable), or None."""
        if self.table.degraded or self.redis_error is not None:
            return f"cluster: {self.redis_error or 'redis unreachable'}"
        if self._relay is not None and self._relay.failing:
            return f"cluster relay: {self._relay.last_error}"
        if self._appender is not None and self._appender.failing:
            return f"cluster appends: {self._appender.last_error}"
        return None

    def may_publish(self, key: str) -> bool:
        return self.table.may_publish(key, trio.current_time())

    def confirm(self, key: str) -> None:
        """*key*'s lease ran out locally while its upstream publishes: ask Redis now (a round
        at once; its frames are held until then)."""
        self._wake.set()

    def leases_by_instance(self) -> dict[str, int]:
        """Followed fixtures per owner, as this instance last saw the leases."""
        out: dict[str, int] = {}
        for key in self._fixtures:
            owner = self.instance if key in self._owned else self.table.holder(key)
            if owner is not None:
                out[owner] = out.get(owner, 0) + 1
        return out

    # -- the FixtureBook's follow/stop, and the supervisor's sink ----------------------------

    def follow(self, fixture: FixtureConfig, backlog: bool) -> bool:
        """Follow *fixture* in the cluster: its topic relays until this instance owns it."""
        key = fixture_key(fixture.feed, fixture.id)
        if key in self._fixtures:
            return False
        self._fixtures[key] = fixture
        self._backlog[key] = backlog
        self._topic(key)
        self._waiting.add(key)
        self._wake.set()
        return True

    def unfollow(self, feed: str, fixture: str) -> bool:
        """Stop following: the upstream (if owned) stops now, its lease is released by the
        next round, the topic is the caller's to close."""
        key = fixture_key(feed, fixture)
        if self._fixtures.pop(key, None) is None:
            return False
        self._backlog.pop(key, None)
        self._waiting.discard(key)
        self._metas.pop(key, None)
        self._local_points.pop(key, None)
        archive = self._archives.pop(key, None)
        if archive is not None:
            archive.recording = False
        self._desk.forget(key)
        self._step_down(key, "no longer followed")
        self._stop_relay(key)
        return True

    def sink(self, feed: FeedConfig, fixture: FixtureConfig) -> FrameSink:
        """The supervisor's sink for a fixture this instance just took over."""
        key = fixture_key(feed.name, fixture.id)
        sink: FrameSink | None = self._owned.get(key) or self._desk.warm.get(key)
        if sink is None:
            raise RuntimeError(f"{key} is not owned by this instance")
        return sink

    def resume_point(self, feed: FeedConfig, fixture: FixtureConfig) -> ResumePoint | None:
        return self._resume.pop(fixture_key(feed.name, fixture.id), None)

    async def reserve_connect(self) -> float:
        """Seconds until this instance's next cluster-wide connect slot (``connect_rate``
        across all instances); 0 when Redis does not answer (the local limit still holds)."""
        store = self._store
        if store is None:
            return 0.0
        try:
            delay = await store.reserve_connect(self._supervisor.limiter.rate)
        except RedisUnavailable:
            self.connect_unavailable += 1
            return 0.0
        if delay > 0:
            self.connect_waits += 1
        return delay

    # -- fixtures shared through the API and on demand -----------------------------------------

    def share_follow(self, fixture: FixtureConfig) -> None:
        """This instance's API followed *fixture*: every instance follows it (next round)."""
        key = fixture_key(fixture.feed, fixture.id)
        self._api_del.discard(key)
        self._api_add[key] = fixture.backfill
        self._wake.set()

    def share_unfollow(self, feed: str, fixture: str) -> None:
        """This instance's API deleted *fixture*: every instance stops it (next round)."""
        key = fixture_key(feed, fixture)
        self._api_add.pop(key, None)
        self._api_del.add(key)
        self._wake.set()

    def cluster_on_demand(self, feed: str) -> set[str]:
        """Fixtures of *feed* followed on demand on any instance (as of the last round)."""
        return self._demand.get(feed, set())

    async def sync_shared(self) -> bool:
        """Write this instance's API changes to the cluster's set and follow (or stop) what
        the others' changed, now rather than at the next round (an API request waits for
        it). False when Redis did not answer: the next round writes them."""
        store = self._store
        if store is None:
            return False
        try:
            await self._sync_shared(store)
        except RedisUnavailable:
            return False
        return True

    async def _sync_shared(self, store: RedisStore) -> None:
        # One at a time (a round and API requests): an older read of the set applied after
        # a newer one would follow again what was just deleted.
        async with self._shared_lock:
            await self._sync_api(store)

    async def _sync_api(self, store: RedisStore) -> None:
        shared = self._shared
        if shared is None:
            return
        add, remove = dict(self._api_add), set(self._api_del)
        api = await store.api_fixtures(add, remove)
        for key, backfill in add.items():
            if self._api_add.get(key) == backfill:
                del self._api_add[key]
        self._api_del -= remove
        for key, backfill in sorted(api.items()):
            if key not in self._fixtures and key not in self._api_del:
                feed, fixture_id = split_key(key)
                if feed in self._hub.feeds:
                    shared.follow_shared(FixtureConfig(feed=feed, id=fixture_id, backfill=backfill))
        for key in sorted(self._api_seen - api.keys()):
            if key not in self._api_add:
                shared.stop_shared(*split_key(key))
        self._api_seen = set(api)

    async def _sync_demand(self, store: RedisStore) -> None:
        shared = self._shared
        if shared is None:
            return
        for name, cfg in self._hub.feeds.items():
            if cfg.on_demand:
                mine = shared.on_demand_of(name)
                self._demand[name] = await store.demand(name, mine, self.config.lease_ttl)

    # -- running ---------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open Redis, start the appender and the relay, run lease rounds until cancelled.

        Started after the first round, whether Redis answered or not (without Redis the
        instance starts degraded: it relays nothing and owns nothing until Redis is back).
        On cancellation the leases this instance holds are released (bounded), so others take
        over at once instead of after ``lease_ttl``.
        """
        async with (
            open_store(self.config, password=self._password) as store,
            trio.open_nursery() as nursery,
        ):
            self._store = store
            self._appender = Appender(
                store,
                self.token,
                self.instance,
                max_bytes=self.config.append_queue_bytes,
                on_fenced=self._fenced,
                history=self._history,
                interval=self.config.batch_interval,
            )
            self._relay = Relay(store, interval=self.config.batch_interval)
            for key in list(self._fixtures):
                self._topic(key)  # fixtures followed before Redis was open get their archive
            await nursery.start(self._appender.run)
            await nursery.start(self._relay.run)
            self._supervisor.limiter.reserve = self.reserve_connect
            try:
                await self._round()
                log.info(
                    "cluster: instance %s joined (%d live, redis %s)",
                    self.instance,
                    len(self.live),
                    "ok" if self.redis_error is None else self.redis_error,
                )
                task_status.started()
                while True:
                    # Handovers under way, or owners gone whose fixtures this one stands by for:
                    # checked every HANDOVER_POLL between rounds.
                    pending = self._desk.pending or bool(self._standby.urgent())
                    with trio.move_on_after(HANDOVER_POLL if pending else self.table.tick):
                        await self._wake.wait()
                    self._wake = trio.Event()
                    if self._left:
                        await trio.sleep_forever()
                    if pending and trio.current_time() - self._round_at < self.table.tick:
                        await self._poll(store)
                    else:
                        await self._round()
            finally:
                self._supervisor.limiter.reserve = None
                if not self._left:
                    with (
                        trio.CancelScope(shield=True),
                        trio.move_on_after(self.config.redis_timeout),
                    ):
                        await self._leave(store)
                nursery.cancel_scope.cancel()

    async def leave(self, *, handover_within: float = 0.0) -> None:
        """A clean stop (drain): first, for up to *handover_within* seconds, hand each owned
        fixture over make-before-break (to the instance ranked first among the others); then
        stop owning the rest, let queued frames reach Redis, release every lease and leave
        the live set, so other instances take over at once. That part is bounded by
        ``redis_timeout``; what does not finish is left to the leases' expiry."""
        store = self._store
        if store is None or self._left:
            return
        if handover_within > 0:
            self._draining = True  # the next heartbeat says so: no fixture is offered to it
            for key in sorted(self._owned):
                successor = self._successor(key)
                if successor is not None:
                    self._desk.offer(key, successor, STOPPING)
            self._wake.set()
            with trio.move_on_after(handover_within):
                await self._desk.idle.wait()
        with trio.move_on_after(self.config.redis_timeout):
            await self._leave(store)

    def _successor(self, key: str) -> str | None:
        """The instance a stopping one hands *key* to: the first-ranked other live one that
        is heard (None: there is none)."""
        others = [n for n in self.staying() if n != self.instance and self.silent_for(n) is None]
        return rank(key, others)[0] if others else None

    async def _poll(self, store: RedisStore) -> None:
        """Between rounds while handovers are under way: one handover check."""
        try:
            await self._desk.step(store, full=False)
            await self._claim_standby(store)
        except RedisUnavailable:
            pass  # the next round says so
        except Exception:
            self.round_errors += 1
            self._errors.log(logging.ERROR, "cluster: handover check failed", exc_info=True)

    async def _claim_standby(self, store: RedisStore) -> None:
        """Between rounds: the leases of fixtures this instance stands by for whose owner is
        gone, asked for (taken if free) now rather than at the next round, so the take-over
        follows their expiry within a poll."""
        keys = sorted(self._standby.urgent() - self.table.held)
        if not keys or not self.table.may_jump(trio.current_time()):
            return
        sent = trio.current_time()
        holders = await store.leases(self.token, self.table.expiry, dict.fromkeys(keys, "a"))
        gained, _ = self.table.observed(holders, sent=sent)
        for key in sorted(gained):
            await self.take_over_now(store, key)

    async def _leave(self, store: RedisStore) -> None:
        self._left = True
        for key in list(self._desk.warm):
            self._desk.cool(key)
        held = list(self.table.held)
        for key in list(self._owned):
            self._step_down(key, "instance stopping", discard=False)
        for key in list(self._fixtures):
            self._stop_relay(key)
        appender = self._appender
        try:
            if appender is not None:
                for key in held:
                    await appender.wait_written(key)
            if held:
                await store.release(self.token, held)
            await store.leave(self.instance)
        except RedisUnavailable:
            pass
        for key in held:
            self.table.released(key)

    async def _round(self) -> None:
        store = self._store
        assert store is not None
        self.rounds += 1
        self._round_at = trio.current_time()
        try:
            await self._heartbeat(store)
            await self._sync_shared(store)
            await self._sync_demand(store)
            await self._leases(store)
            await self._refresh(store)
            await self._desk.step(store, full=True)
            self._standby.step()
            # Owned streams live on while owned; a fixture nobody follows any more (deleted
            # everywhere) has no owner, and its stream and meta expire after stream_retention.
            await store.retain(sorted(self._owned), self.config.stream_retention)
            if self.redis_error is not None:
                log.info("cluster: redis reachable again (was: %s)", self.redis_error)
            self.redis_error = None
            self.view_at = time.time()
            self.unreachable_since = None
        except Exception as exc:
            if not isinstance(exc, RedisUnavailable):
                # A bug must not take the gateway down: logged, counted, next round retries.
                self.round_errors += 1
                self._errors.log(logging.ERROR, "cluster: round failed", exc_info=True)
                return
            self.table.unreachable()
            if self.unreachable_since is None:
                self.unreachable_since = time.time()
            if self.redis_error is None:
                log.warning("cluster: redis unreachable, degraded: %s", exc)
            self.redis_error = str(exc)
            for key in self._relayed:
                topic = self._hub.get(*split_key(key))
                if topic is not None:
                    topic.set_status(FixtureState.DEGRADED, "cluster: redis unreachable")
        # Past local validity while Redis answers: a paused process. Nothing is published
        # meanwhile (frames are held); Redis is asked, and the fixture fenced unless it still
        # holds the lease for this instance.
        expired = self.table.expired(trio.current_time())
        if expired:
            try:
                await self._confirm(store, expired)
            except RedisUnavailable as exc:
                self.table.unreachable()
                self.redis_error = str(exc)
        for key in self.table.expired(trio.current_time()):
            self.fence(key, "lease expired before it was renewed")
        for sink in list(self._owned.values()):
            if sink.held and self.may_publish(sink.key):
                sink.release_held()

    async def _heartbeat(self, store: RedisStore) -> None:
        beat = {**self._info(), BEAT_KEY: self.rounds, LEAVING_KEY: self._draining}
        info = orjson.dumps(beat).decode()
        live = await store.heartbeat(self.instance, self.config.lease_ttl, info)
        self.live = {name: _info(text) for name, text in live.items()}
        self.liveness.observed(self.live, trio.current_time())

    def staying(self) -> set[str]:
        """The live instances that are not stopping (a stopping one takes no fixture)."""
        return {name for name, info in self.live.items() if info.get(LEAVING_KEY) is not True}

    def silent_for(self, name: str) -> float | None:
        """Seconds since live instance *name* was last heard, when it has gone silent (killed
        without a goodbye, or hung); None while it is heard every round."""
        return self.liveness.silent_for(name, trio.current_time())

    async def _leases(self, store: RedisStore) -> None:
        if not self._looked:
            # The first round after joining only looks: instances started together with this
            # one may not have written a heartbeat yet, and claiming now would rank every free
            # lease over this instance alone (all of them here, handed over again for many
            # rounds). From the next round on the ranks are over all of them: a fair share.
            sent = trio.current_time()
            holders = await store.leases(
                self.token, self.table.expiry, dict.fromkeys(self._fixtures, "-")
            )
            self.table.observed(holders, sent=sent)
            self._looked = True
            return
        now = trio.current_time()
        # Held leases already past their local validity (this process was paused): one found
        # taken now is fenced (counted and logged as such), not merely lost.
        stale = set(self.table.expired(now))
        movable = {k for k in self._fixtures if self._movable(*split_key(k))}
        staying = self.staying()
        # Free leases this instance stands by for, whose owner is gone: taken at once.
        first = self._standby.first(self._standby.candidates())
        plan = self.table.plan(
            now, followed=self._fixtures, live=staying, movable=movable, first=first
        )
        # A fixture to move to the instance ranked first is offered to it (make-before-break:
        # the lease goes once that one's warm connection is in step); one no longer followed
        # is released. Those stop publishing now, but release only after the renewal went
        # out: their flushes must not delay the other leases' renewal past its local validity.
        releasing = sorted(k for k in plan.release if k not in self._fixtures)
        for key in releasing:
            self._hand_over(key)
        instances = staying | {self.instance}
        for key in sorted(plan.release - set(releasing)):
            if not self._draining:
                self._desk.offer(key, rank(key, instances)[0], REBALANCING)
        acquire = set() if self._draining else plan.acquire
        modes = {key: "a" if key in acquire else "-" for key in self._fixtures}
        sent = trio.current_time()
        holders = await store.leases(self.token, self.table.expiry, modes)
        _, lost = self.table.observed(holders, sent=sent)
        # Leases this round found free that this instance may take now (their holder died):
        # asked for at once rather than next round (a failover a round sooner).
        now = trio.current_time()
        again = self.table.plan(
            now, followed=self._fixtures, live=staying, movable=movable, first=first
        )
        fresh = again.acquire - self.table.held - set(releasing)
        if fresh and not self._draining:
            sent = trio.current_time()
            holders = await store.leases(self.token, self.table.expiry, dict.fromkeys(fresh, "a"))
            more_lost = self.table.observed(holders, sent=sent)[1]
            lost |= more_lost
        self._lost(lost - stale)
        self._taken_while_paused(lost & stale)
        if releasing:
            await self._release(store, releasing)
        if self._left:
            return  # stopping: its leases are being released (a round woken by the stop)
        # Every lease held but not yet owned: the ones gained now, and any whose take-over
        # failed half-way last round (Redis went away in between).
        for key in sorted(self.table.held - self._owned.keys()):
            if key in self._fixtures:
                try:
                    await self._take_over(store, key)
                except RedisUnavailable:
                    self.table.released(key)
                    raise

    def _lost(self, keys: set[str]) -> None:
        for key in sorted(keys):
            self.leases_lost += 1
            owner = self.table.holder(key)
            log.warning("cluster: lost the lease of %s (now %s): relaying", key, owner or "free")
            self._step_down(key, "lease lost")

    async def _confirm(self, store: RedisStore, keys: list[str]) -> None:
        """Leases past their local validity while Redis answers (the process was paused):
        renewed if Redis still holds them for this instance (nothing else could have written
        their streams: the owner goes on, held frames are published), else fenced."""
        sent = trio.current_time()
        holders = await store.leases(self.token, self.table.expiry, dict.fromkeys(keys, "-"))
        lost = self.table.observed(holders, sent=sent)[1]
        for key in sorted(set(keys) - lost):
            self.leases_confirmed += 1
            log.warning(
                "cluster: %s: the lease ran out locally (this process was paused?) but redis "
                "still holds it for this instance: kept",
                key,
            )
        self._taken_while_paused(lost)

    def _taken_while_paused(self, keys: set[str]) -> None:
        for key in sorted(keys):
            self.leases_lost += 1
            self.fence(key, f"lease taken by {self.table.holder(key) or 'nobody'} while paused")

    def _hand_over(self, key: str) -> None:
        """Begin giving *key* up: its upstream stops now; :meth:`_release` finishes."""
        if key in self._owned:
            self.handovers += 1
            if key in self._fixtures:
                log.info("cluster: handing %s over (rebalancing)", key)
            self._step_down(key, "handed over", discard=False)

    # -- the handover desk's hooks (gateway/service/_handover.py) -------------------------------

    def owns(self, key: str) -> bool:
        return key in self._owned

    @property
    def draining(self) -> bool:
        return self._draining

    def relayed_keys(self) -> list[str]:
        """Followed fixtures relayed here (a successor's candidates)."""
        return sorted(k for k in self._relayed if k in self._fixtures)

    def relayed_position(self, key: str) -> int | None:
        sink = self._relayed.get(key)
        return None if sink is None else sink.position

    def start_warm(self, key: str, sink: WarmSink, *, standby: bool = False) -> bool:
        """Open a warm upstream connection of *key* into *sink* (the desk holds it), resuming
        after the relay's last position; False when there is none to resume from (a standby
        without one connects live: the stream has no position yet). A standby's first
        attempt queues behind the others at the connect limiter (its backlog)."""
        point = self._relayed_point(key)
        fixture = self._fixtures.get(key)
        if (point is None and not standby) or fixture is None or key in self._owned:
            return False
        if self._supervisor.get(*split_key(key)) is not None:
            return False
        if point is not None:
            self._resume[key] = point
            sink.buffer.resume_after(point.position)
        return self._supervisor.add(fixture, backlog=standby)

    def standby_closed(self, key: str, why: str) -> None:
        """The handover desk closed *key*'s standby connection (not promoted)."""
        self._standby.closed(key, why)

    def stop_upstream(self, key: str) -> None:
        """Close *key*'s upstream connection (a warm one that is not needed)."""
        feed, fixture_id = split_key(key)
        handle = self._supervisor.get(feed, fixture_id)
        if handle is not None:
            self._retire(handle)
        self._supervisor.remove(feed, fixture_id)
        self._resume.pop(key, None)

    async def stop_owning(self, key: str, why: str) -> None:
        """Hand-over, owner side: the upstream stops, the queued frames reach Redis (for at
        most a round; the rest are dropped: the successor has them), the topic relays."""
        self.handovers += 1
        self._step_down(key, why, discard=False)
        appender = self._appender
        if appender is not None:
            with trio.move_on_after(min(HANDOVER_FLUSH, self.table.tick)):
                await appender.wait_written(key)
            appender.discard(key)

    async def release_now(self, store: RedisStore, key: str, why: str) -> None:
        """Hand-over fallback: stop owning *key* and release its lease (break-before-make)."""
        if key in self._owned:
            self.handovers += 1
            log.info("cluster: handing %s over (%s)", key, why)
            self._step_down(key, "handed over", discard=False)
            await self._release(store, [key])

    async def check_leases(self, store: RedisStore, keys: list[str]) -> set[str]:
        """Ask Redis who holds *keys* now (renewing those this instance holds); the ones
        that are this instance's."""
        sent = trio.current_time()
        holders = await store.leases(self.token, self.table.expiry, dict.fromkeys(keys, "-"))
        self.table.observed(holders, sent=sent)
        return {key for key, holder in holders.items() if holder == self.token}

    async def take_over_now(self, store: RedisStore, key: str) -> None:
        """The lease of *key* was handed to this instance: take over now, not next round."""
        if key in self._fixtures and key not in self._owned:
            try:
                await self._take_over(store, key)
            except RedisUnavailable:
                self.table.released(key)
                raise

    async def _release(self, store: RedisStore, keys: list[str]) -> None:
        """Let the frames of *keys* reach Redis (for at most a round), then release them.

        Frames still queued then are dropped: appended later they would take the released
        lease straight back (an append takes a lease nobody holds)."""
        appender = self._appender
        if appender is not None:
            with trio.move_on_after(min(HANDOVER_FLUSH, self.table.tick)):
                for key in keys:
                    await appender.wait_written(key)
            for key in keys:
                appender.discard(key)
        for key in keys:
            self.table.released(key)
        await store.release(self.token, keys)

    async def _take_over(self, store: RedisStore, key: str) -> None:
        feed, _ = split_key(key)
        fixture = self._fixtures[key]
        cfg = self._hub.feeds[feed]
        info = await store.takeover(key)
        previous = self._metas.get(key)
        relayed_from = self._relayed_point(key)
        self._stop_relay(key)
        topic = self._topic(key)
        if info.epoch is not None:
            start = self._prime_from(key, max(0, info.seq - cfg.history))
            topic = self._numbered(key, topic, info.epoch, start)
            # What the relay had not delivered yet: fanned out (subscribers have not had it).
            await self._fill(store, key, topic, info.seq, fan_out=True)
        resume = _latest(
            None
            if info.position is None or info.received_at is None
            else ResumePoint(info.position, info.received_at),
            relayed_from,
            self._local_point(key, topic),
        )
        # Answered an offer (a planned handover), rather than standing by for a dead owner.
        handed = key in self._desk.ready
        warm = self._desk.take_warm(key, info.position if info.epoch is not None else None)
        if resume is not None and warm is None:
            self._resume[key] = resume
        appender = self._appender_or_fail()
        # The stream must hold what the topic holds (a relay may have had frames from a
        # primary that failed over before its replica got them): the first append finds
        # out and appends the missing ones again.
        appender.appended[key] = topic.seq
        owned = self._owned[key] = OwnedTopic(self, key, topic, appender)
        self._waiting.discard(key)
        self.leases_gained += 1
        if warm is not None and warm.standby and not handed:
            # Hot standby: the owner died; the standby's connection goes on as the owner's,
            # with the frames the stream lacks first. No reconnect.
            at = topic.seq
            sent = warm.promote(owned, info.position)
            log.info(
                "cluster: owner of %s now (standby promoted, took over from %s without a "
                "reconnect), at seq %d, %d frames from the standby after vendor position %s",
                key,
                self._standby.promoted_now(key) or "?",
                at,
                sent,
                info.position,
            )
            return
        if warm is not None:
            # Make-before-break: the warm connection goes on as the owner's, from the frame
            # after the stream's last one.
            at = topic.seq
            sent = warm.promote(owned, info.position)
            self._desk.received += 1
            self._standby.owners.pop(key, None)
            log.info(
                "cluster: owner of %s now (handed over by %s, warm), at seq %d, %d warm frames "
                "after vendor position %s",
                key,
                previous.owner if previous is not None and previous.owner else "?",
                at,
                sent,
                info.position,
            )
            return
        was = previous.owner if previous is not None and previous.owner else None
        log.info(
            "cluster: owner of %s now%s, at seq %d%s",
            key,
            f" (took over from {was})" if was and was != self.instance else "",
            topic.seq,
            "" if resume is None else f", vendor position {resume.position}",
        )
        self._supervisor.add(fixture, backlog=self._backlog.get(key, False))

    def _topic(self, key: str, *, epoch: str | None = None, seq: int = 0) -> Topic:
        """*key*'s hub topic (made if there is none), with the stream as its archive."""
        feed, fixture_id = split_key(key)
        topic = self._hub.topic(feed, fixture_id, epoch=epoch, seq=seq)
        store = self._store
        if store is not None:
            archive = self._archives.get(key)
            if archive is None:
                archive = self._archives[key] = StreamArchive(
                    store, key, lambda: self._written(key)
                )
            archive.recording = True
            topic.archive = archive
        if self._recording is not None:
            self._recording.attach(topic)
        return topic

    def _replace_topic(self, key: str, *, epoch: str | None = None, seq: int = 0) -> Topic:
        """A new topic for *key* (the old one's subscribers are told it stopped)."""
        self._hub.close_topic(*split_key(key))
        archive = self._archives.get(key)
        if archive is not None:
            archive.oldest = 0
        return self._topic(key, epoch=epoch, seq=seq)

    def _written(self, key: str) -> int:
        """The newest seq of *key* the stream holds, as far as this instance knows."""
        if key in self._owned:
            appender = self._appender
            return 0 if appender is None else appender.appended.get(key, 0)
        topic = self._hub.get(*split_key(key))
        return 0 if topic is None or key not in self._relayed else topic.seq

    def _local_point(self, key: str, topic: Topic) -> ResumePoint | None:
        """This instance's own last upstream position of *key*, if the topic still carries
        the numbering it was published under (nothing was relayed over it since)."""
        point = self._local_points.pop(key, None)
        if point is None or point[0] != topic.seq:
            return None
        return point[1]

    def _prime_from(self, key: str, start: int) -> int:
        """Where a topic taking the stream's numbering is primed from: *start*, or earlier
        when its recording misses frames after it (they are in the stream until trimmed)."""
        if self._recording is None:
            return start
        return self._recording.prime_from(*split_key(key), start)

    def _appender_or_fail(self) -> Appender:
        assert self._appender is not None
        return self._appender

    def _relayed_point(self, key: str) -> ResumePoint | None:
        sink = self._relayed.get(key)
        if sink is None or sink.position is None or sink.received_at is None:
            return None
        return ResumePoint(sink.position, sink.received_at)

    def _numbered(self, key: str, topic: Topic, epoch: str, start: int) -> Topic:
        """*key*'s topic under the stream's *epoch*: renumbered while it has no frame (its
        history to begin after seq *start*), else replaced (its subscribers are told it
        stopped, and resubscribe)."""
        if topic.epoch == epoch:
            return topic
        if topic.seq or topic.history_len:
            log.warning("cluster: %s: the stream has another epoch: topic replaced", key)
            return self._replace_topic(key, epoch=epoch, seq=start)
        topic.renumber(epoch, start)
        return topic

    async def _fill(
        self, store: RedisStore, key: str, topic: Topic, last: int, *, fan_out: bool, start: int = 0
    ) -> ResumePoint | None:
        """Bring *topic* up to seq *last* from the stream (from after seq *start* at the
        earliest): fanned out to subscribers (*fan_out*), or only held in the history. The
        last vendor position read, if any."""
        sink = RelayedTopic(self, key, topic)
        while topic.seq < last:
            entries = await store.tail(key, max(topic.seq, start), CATCH_UP_COUNT)
            if not entries:
                break
            if fan_out:
                sink.relay(entries)
            else:
                for e in entries:
                    if e.seq > topic.seq:
                        topic.keep_at(e.seq, e.data, e.position)
                        if e.position is not None:
                            sink.position, sink.received_at = e.position, e.received_at
        if sink.position is None or sink.received_at is None:
            return None
        return ResumePoint(sink.position, sink.received_at)

    def _step_down(self, key: str, why: str, *, discard: bool = True) -> None:
        """Stop owning *key* now (if owned): the upstream stops, the topic becomes a relay."""
        sink = self._owned.pop(key, None)
        if sink is None:
            return
        sink.active = False
        if sink.position is not None:
            self._local_points[key] = (sink.topic.seq, ResumePoint(sink.position, sink.received_at))
        feed, fixture_id = split_key(key)
        handle = self._supervisor.get(feed, fixture_id)
        if handle is not None:
            self._retire(handle)
        self._supervisor.remove(feed, fixture_id)
        appender = self._appender
        confirmed = sink.topic.seq
        if appender is not None:
            if discard:
                appender.discard(key)
            confirmed = min(confirmed, appender.appended.get(key, confirmed))
        log.info("cluster: %s: no longer owner (%s)", key, why)
        if key in self._fixtures:
            self._start_relay(key, sink.topic, after=confirmed)

    def _start_relay(
        self, key: str, topic: Topic, *, after: int, point: ResumePoint | None = None
    ) -> None:
        """Relay *key*'s stream into *topic* after seq *after*; *point*: the stream's last
        vendor position up to there, where known (a warm connection resumes after it)."""
        relay = self._relay
        if relay is None:
            return
        sink = RelayedTopic(self, key, topic)
        if point is not None:
            sink.position, sink.received_at = point.position, point.received_at
        self._relayed[key] = sink
        relay.follow(key, after=after, sink=sink)

    def _stop_relay(self, key: str) -> None:
        self._relayed.pop(key, None)
        if self._relay is not None:
            self._relay.unfollow(key)

    def fence(self, key: str, why: str) -> None:
        """Stop owning *key* at once (its lease cannot be trusted); the next round decides."""
        if key not in self._owned:
            return
        self.fenced += 1
        self._errors.warning("cluster: %s fenced: %s", key, why)
        self.table.released(key)
        self._step_down(key, why)
        self._wake.set()

    def _history(
        self, key: str, epoch: str, after: int, before: int
    ) -> list[tuple[int, int | None, float, bytes]]:
        """The appender's: *key*'s frames of *epoch* with ``after < seq < before`` still in
        its topic's memory history (while owned here), re-stamped with the time now."""
        sink = self._owned.get(key)
        if sink is None or sink.topic.epoch != epoch:
            return []
        topic = sink.topic
        start = max(after + 1, topic.first_held)
        if start > topic.seq:
            return []
        now = time.time()
        out: list[tuple[int, int | None, float, bytes]] = []
        for frame in topic.frames_from(start):
            if frame.seq >= before:
                break
            out.append((frame.seq, frame.position, now, frame.raw_bytes))
        return out

    def _fenced(self, key: str, result: str) -> None:
        # The appender's callback: Redis refused an append (lease or epoch not ours).
        why = "lease taken by another instance" if result == "fenced" else "epoch changed"
        self.fence(key, f"append refused: {why}")

    def conflict(self, key: str, seq: int) -> None:
        """The stream's frame *seq* differs from the one the topic published under the same
        number (a paused owner's): the topic is replaced; its subscribers resubscribe."""
        self.conflicts += 1
        log.warning("cluster: %s: frame %d differs from the stream's: topic replaced", key, seq)
        self._stop_relay(key)
        if key in self._fixtures:
            self._replace_topic(key)
            self._waiting.add(key)
            self._wake.set()
        else:
            self._hub.close_topic(*split_key(key))

    async def _refresh(self, store: RedisStore) -> None:
        """Relays: adopt each stream's epoch, start relaying new ones, show owners' states."""
        keys = list(self._fixtures)
        if not keys:
            return
        # What Redis had confirmed before this read (appends confirmed while it is under way
        # are not behind the stream it reads).
        confirmed = {} if self._appender is None else dict(self._appender.appended)
        metas = await store.metas(keys)
        self._metas.update(metas)
        for key, meta in metas.items():
            archive = self._archives.get(key)
            if archive is not None:
                archive.oldest = meta.first_seq
            owned = self._owned.get(key)
            if owned is not None and (meta.state is None or meta.last_seq < confirmed.get(key, 0)):
                # Redis lost the owner's state or frames it had confirmed (restarted empty, or
                # a replica that lacked them was promoted): write the state again for relays;
                # its append finds the stream behind and appends the missing frames again
                # (an idle fixture too).
                owned.appender.status(
                    key, owned.topic.epoch, owned.topic.state.value, owned.topic.detail
                )
            if key not in self._fixtures or key in self._owned:
                continue
            feed, fixture_id = split_key(key)
            topic = self._hub.get(feed, fixture_id)
            if topic is None:
                continue
            if meta.epoch is None:
                if key not in self._relayed:
                    self._waiting.add(key)
                self._show(topic, key, meta)
                continue
            if meta.epoch != topic.epoch or key in self._waiting:
                topic = await self._adopt(store, key, topic, meta.epoch)
            self._show(topic, key, meta)

    async def _adopt(self, store: RedisStore, key: str, topic: Topic, epoch: str) -> Topic:
        """Make *topic* relay its stream under the stream's *epoch* (primed with up to
        ``history`` frames from the stream)."""
        feed, _ = split_key(key)
        info = await store.takeover(key)
        start = self._prime_from(key, max(0, info.seq - self._hub.feeds[feed].history))
        self._stop_relay(key)
        topic = self._numbered(key, topic, epoch, start)
        # Prime the history from the stream (no fan-out: live-only subscribers asked for
        # nothing older), then relay from where the priming ended.
        primed = await self._fill(store, key, topic, info.seq, fan_out=False, start=start)
        self._waiting.discard(key)
        self._start_relay(key, topic, after=max(topic.seq, start), point=primed)
        return topic

    def _show(self, topic: Topic, key: str, meta: Meta) -> None:
        relay = self._relay
        if relay is not None and relay.failing:
            topic.set_status(FixtureState.DEGRADED, "cluster: redis unreachable")
            return
        owner = self.table.holder(key)
        if owner is None:
            topic.set_status(FixtureState.CONNECTING, "cluster: no owner yet")
            return
        if self.silent_for(owner) is not None:
            # Its lease has not run out yet, but nothing comes: the truth is a takeover ahead.
            topic.set_status(FixtureState.CONNECTING, f"cluster: owner {owner} silent: taking over")
            return
        try:
            state = FixtureState(meta.state or FixtureState.CONNECTING.value)
        except ValueError:
            state = FixtureState.CONNECTING
        topic.set_status(state, meta.detail or "")


def _latest(*points: ResumePoint | None) -> ResumePoint | None:
    """The furthest of *points* (a fixture's vendor positions only grow)."""
    known = [p for p in points if p is not None]
    return max(known, key=lambda p: p.position) if known else None


def _info(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text) if text else {}
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
