"""Every connected subscriber, for the API, the connection limit and the drain on shutdown."""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Iterable

import attrs
import trio

from gateway.dataplane._connection import Connection
from gateway.dataplane._lameduck import close_spread
from gateway.dataplane._subquery import (
    QUERY_STEP,
    Facts,
    Page,
    SubscriberQuery,
    is_slow,
    run_query,
    subscriber_order,
)
from gateway.logs import LogThrottle, fields
from gateway.wire import (
    CLOSE_DISCONNECTED,
    CLOSE_GOING_AWAY,
    DISCONNECTED_REASON_PREFIX,
    DRAIN_REASON,
    MAX_CLOSE_REASON_BYTES,
)

log = logging.getLogger("gateway.dataplane")


@attrs.frozen
class SubscriberView:
    """One subscriber as the API shows it (``GET /v1/subscribers``); a frozen snapshot.

    ``subscriptions`` holds ``"feed/fixture"`` strings. ``conflated``: frames its ``max_rate``
    subscriptions skipped (latest-wins), see docs/protocol.md. ``write_delay_ms``: its write
    delay (0: every frame written at once); ``batched``: written as part of a batch group now
    (docs/dataplane.md).
    """

    id: str
    peer: str
    endpoint: str
    subscriptions: tuple[str, ...]
    queued_bytes: int
    frames_sent: int
    frames_dropped: int
    connected_at: float
    conflated: int = 0
    write_delay_ms: int = 0
    batched: bool = False
    #: Falling behind now: a quarter or more of its queue budget unsent
    #: (:func:`gateway.dataplane._subquery.is_slow`).
    slow: bool = False


@attrs.frozen
class RegistryStats:
    """A snapshot of the registry: ``connections``, ``batched`` (subscribers written as part
    of a batch group) and ``batch_groups`` now, the rest monotonic since start."""

    connections: int
    accepted: int
    rejected: int
    frames_sent: int
    frames_dropped: int
    slow_disconnects: int
    rate_limited: int = 0
    ping_timeouts: int = 0
    disconnected: int = 0
    batched: int = 0
    batch_groups: int = 0
    bytes_sent: int = 0


def disconnect_reason(reason: str) -> str:
    """The close reason of an operator's disconnect: the fixed prefix, then *reason*, cut to
    what a close frame holds (whole characters)."""
    text = f"{DISCONNECTED_REASON_PREFIX}: {reason}" if reason else DISCONNECTED_REASON_PREFIX
    data = text.encode()[:MAX_CLOSE_REASON_BYTES]
    return data.decode(errors="ignore")


def view_facts(v: SubscriberView) -> Facts:
    """What a query filters and sorts a view by (for a list of views, as a test facade has)."""
    return Facts(
        id=v.id,
        endpoint=v.endpoint,
        subscriptions=v.subscriptions,
        queued_bytes=v.queued_bytes,
        frames_dropped=v.frames_dropped,
        frames_sent=v.frames_sent,
        connected_at=v.connected_at,
        slow=v.slow,
    )


def _facts(c: Connection) -> Facts:
    return Facts(
        id=c.id,
        endpoint=c.endpoint,
        subscriptions=() if c.handler is None else c.handler.subscription_names(),
        queued_bytes=c.queued_bytes,
        frames_dropped=c.frames_dropped,
        frames_sent=c.frames_sent,
        connected_at=c.connected_at,
        slow=is_slow(c.queued_bytes, c.budget),
    )


def _view(c: Connection) -> SubscriberView:
    return SubscriberView(
        id=c.id,
        peer=c.peer,
        endpoint=c.endpoint,
        subscriptions=() if c.handler is None else tuple(c.handler.subscription_names()),
        queued_bytes=c.queued_bytes,
        frames_sent=c.frames_sent,
        frames_dropped=c.frames_dropped,
        connected_at=c.connected_at,
        conflated=c.frames_conflated,
        write_delay_ms=round(c.write_delay * 1000),
        batched=c.group is not None,
        slow=is_slow(c.queued_bytes, c.budget),
    )


class SubscriberRegistry:
    """Connected subscribers plus monotonic totals that survive their disconnection.

    Totals: ``frames_sent``, ``bytes_sent`` (all bytes written), ``drops`` (dropped frames),
    ``slow_disconnects`` (see :meth:`count_slow_disconnect`), ``rate_limited`` (closed with
    1008 for sending frames too fast), ``ping_timeouts``, ``rejected`` (handshakes refused with
    503: connection limit or draining), ``accepted`` (connections accepted since start).
    :meth:`stats` returns them all at once.

    It is every connection's :class:`~gateway.dataplane._connection.ConnectionMonitor`. Any
    client can cause these events at any rate, so each kind is counted every time but logged
    through a :class:`~gateway.logs.LogThrottle` (at most one line per interval).
    """

    def __init__(self) -> None:
        self._conns: dict[str, Connection] = {}
        self._ids = itertools.count(1)
        self._retired_frames_sent = 0
        self._retired_bytes_sent = 0
        self._retired_drops = 0
        self.slow_disconnects = 0
        self.rate_limited = 0
        self.ping_timeouts = 0
        self.rejected = 0
        self.accepted = 0
        #: Subscribers closed by an operator (``DELETE /v1/subscribers/{id}``).
        self.disconnected = 0
        self.draining = False
        self._empty = trio.Event()
        self._empty.set()
        self._slow_log = LogThrottle(log)
        self._rate_log = LogThrottle(log)
        self._ping_log = LogThrottle(log)
        self._rejected_log = LogThrottle(log)

    def __len__(self) -> int:
        return len(self._conns)

    def new_id(self) -> str:
        return str(next(self._ids))

    def add(self, conn: Connection) -> None:
        self._conns[conn.id] = conn
        self.accepted += 1
        if self._empty.is_set():
            self._empty = trio.Event()

    def remove(self, conn: Connection) -> None:
        if self._conns.pop(conn.id, None) is None:
            return
        self._retired_frames_sent += conn.frames_sent
        self._retired_bytes_sent += conn.bytes_sent
        self._retired_drops += conn.frames_dropped
        if not self._conns:
            self._empty.set()

    def count_slow_disconnect(self, conn: Connection) -> None:
        """*conn* is being closed as too slow: count it here and in each of its topics."""
        self.slow_disconnects += 1
        if conn.handler is not None:
            for topic in conn.handler.topics():
                topic.slow_disconnects += 1
        # Explicit fields: this runs in the fan-out (the fixture's task, whose feed and fixture
        # the line carries), not in the subscriber's task.
        self._slow_log.info(
            "subscriber %s (%s) too slow: disconnecting", conn.id, conn.peer, extra=_about(conn)
        )

    def count_rate_limited(self, conn: Connection) -> None:
        """*conn* is being closed (1008) for sending frames too fast."""
        self.rate_limited += 1
        self._rate_log.warning(
            "subscriber %s (%s) sent more than %g frames per second: closing",
            conn.id,
            conn.peer,
            conn.settings.max_client_frames_per_second,
            extra=_about(conn),
        )

    def count_ping_timeout(self, conn: Connection) -> None:
        """*conn* did not answer a ping in time and is being closed (1011)."""
        self.ping_timeouts += 1
        self._ping_log.info(
            "subscriber %s (%s): no pong within %ss, closing",
            conn.id,
            conn.peer,
            conn.settings.ping_timeout,
            extra=_about(conn),
        )

    def count_rejected(self, peer: str, reason: str) -> None:
        """A handshake from *peer* was refused with 503 (*reason*); expected while draining."""
        self.rejected += 1
        level = logging.INFO if self.draining else logging.WARNING
        self._rejected_log.log(
            level, "subscriber from %s refused: %s", peer, reason, extra=fields(peer=peer)
        )

    def connections_now(self) -> list[Connection]:
        return list(self._conns.values())

    @property
    def frames_sent(self) -> int:
        return self._retired_frames_sent + sum(c.frames_sent for c in self._conns.values())

    @property
    def bytes_sent(self) -> int:
        return self._retired_bytes_sent + sum(c.bytes_sent for c in self._conns.values())

    @property
    def drops(self) -> int:
        return self._retired_drops + sum(c.frames_dropped for c in self._conns.values())

    def stats(self) -> RegistryStats:
        groups = [c.group for c in self._conns.values() if c.group is not None]
        return RegistryStats(
            connections=len(self._conns),
            accepted=self.accepted,
            rejected=self.rejected,
            frames_sent=self.frames_sent,
            frames_dropped=self.drops,
            slow_disconnects=self.slow_disconnects,
            rate_limited=self.rate_limited,
            ping_timeouts=self.ping_timeouts,
            disconnected=self.disconnected,
            batched=len(groups),
            batch_groups=len(set(map(id, groups))),
            bytes_sent=self.bytes_sent,
        )

    def views(self, after: str | None = None, limit: int | None = None) -> list[SubscriberView]:
        """The subscribers in id order (:func:`subscriber_order`): those after the id *after*,
        at most *limit*. Views are built for the returned ones only."""
        conns: Iterable[Connection] = self._conns.values()
        if after is not None:
            cursor = subscriber_order(after)
            conns = [c for c in conns if subscriber_order(c.id) > cursor]
        chosen = (
            sorted(conns, key=lambda c: subscriber_order(c.id))
            if limit is None
            else heapq.nsmallest(limit, conns, key=lambda c: subscriber_order(c.id))
        )
        return [_view(c) for c in chosen]

    async def query(self, query: SubscriberQuery) -> Page[SubscriberView]:
        """The page of subscribers *query* selects (:mod:`gateway.dataplane._subquery`),
        yielding to the event loop as it goes; views are built for the page only."""
        page = await run_query(list(self._conns.values()), _facts, query)
        views: list[SubscriberView] = []
        for start in range(0, len(page.items), QUERY_STEP):
            await trio.lowlevel.checkpoint()
            views += [_view(c) for c in page.items[start : start + QUERY_STEP]]
        return Page(views, page.total, page.next_page)

    def disconnect(self, ident: str, reason: str = "") -> bool:
        """Close subscriber *ident* with :data:`~gateway.wire.CLOSE_DISCONNECTED` and the
        operator's *reason* (counted in ``disconnected``). False: no such subscriber."""
        conn = self._conns.get(ident)
        if conn is None:
            return False
        self.disconnected += 1
        log.info(
            "subscriber %s (%s) disconnected by an operator: %s", conn.id, conn.peer, reason or "-"
        )
        conn.close(CLOSE_DISCONNECTED, disconnect_reason(reason))
        return True

    async def drain(
        self, code: int = CLOSE_GOING_AWAY, reason: str = DRAIN_REASON, *, period: float = 0.0
    ) -> None:
        """Refuse new subscribers, close every connected one with *code*, wait until all left.

        The closes are spread evenly over *period* seconds (lame duck, :func:`close_spread`).
        Each connection is bounded by its close timeout (then aborted), so this returns within
        about *period* plus that time; wrap it in ``trio.move_on_after`` for a harder limit.
        """
        self.draining = True
        conns = list(self._conns.values())
        if conns:
            log.info("draining: closing %d subscriber(s) over %.1f s", len(conns), period)
        await close_spread(conns, period, code, reason)
        await self._empty.wait()


def _about(conn: Connection) -> dict[str, object]:
    """The fields of a line about *conn*: its id and address."""
    return fields(subscriber=conn.id, peer=conn.peer)
