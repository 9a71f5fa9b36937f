"""Endpoint 1, ``/v1/stream``: many (feed, fixture) subscriptions on one connection.

Requests are JSON text messages (``subscribe``/``unsubscribe``); every bad request gets an
``error`` message and the connection stays open. Subscribing sends ``subscribed`` and
``status``, then the backfill (streamed from the topic's history as the connection drains, see
:mod:`gateway.dataplane._backfill`), then live frames, with no gap and no duplicate between
them. A subscription with ``max_rate`` is a :class:`ConflatedSubscription` (latest-wins, at most
that many frames a second, :mod:`gateway.dataplane._conflate`); the others are untouched by it.
See docs/protocol.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import orjson
import trio

from gateway.dataplane import _messages as msg
from gateway.dataplane._access import check_feed_allowed
from gateway.dataplane._backfill import Backfill, leave
from gateway.dataplane._batchgroup import can_join, join_group
from gateway.dataplane._conflate import MAX_RATE, MIN_RATE, Conflator
from gateway.dataplane._connection import Connection, DelayedConnection
from gateway.dataplane._fields import check_keys, field_str
from gateway.dataplane._replayop import StreamReplays
from gateway.errors import BadRequest
from gateway.hub import Frame, Hub, HubError, Topic
from gateway.replay import Replays

_SUBSCRIBE_KEYS: Final = frozenset(
    {"op", "feed", "fixture", "backfill", "after", "epoch", "max_rate"}
)
_UNSUBSCRIBE_KEYS: Final = frozenset({"op", "feed", "fixture"})


class MuxSubscription:
    """One (feed, fixture) of a multiplexed connection; the topic fans out to it."""

    __slots__ = ("backfill", "conn", "deflate", "gap_from", "gap_to", "topic")

    def __init__(self, conn: Connection, topic: Topic) -> None:
        self.conn = conn
        self.topic = topic
        #: The connection negotiated permessage-deflate: frames go as ``frame.deflate_ws``.
        self.deflate = conn.deflate
        # The pending gap (drop-oldest): seqs gap_from..gap_to were dropped; 0 = none.
        self.gap_from = 0
        self.gap_to = 0
        #: The backfill still running (attached to the topic in this object's place), or None.
        self.backfill: Backfill | None = None

    def on_frame(self, frame: Frame) -> None:
        group = self.conn.group
        if group is not None:
            # The group writes it to all its members: the first of them to see it adds it.
            if group.last is not frame:
                group.add(frame, self.topic)
            return
        if self.gap_to and self.conn.idle:
            self.conn.send_control(self._gap())
        data = frame.deflate_ws if self.deflate else frame.envelope_ws
        self.conn.send_data(data, frame.seq, frame.published, self)

    def on_status(self, topic: Topic) -> None:
        self.conn.send_control(
            msg.status(topic.feed.name, topic.fixture, topic.state.value, topic.detail)
        )

    def backlog(self) -> float:
        conn = self.conn
        return conn.queued_bytes / conn.budget

    def on_closed(self, topic: Topic) -> None:
        handler = self.conn.handler
        if isinstance(handler, MultiplexHandler):
            handler.forget(self)

    def dropped(self, seq: int) -> None:
        if not self.gap_to:
            self.gap_from = seq
        self.gap_to = seq
        self.topic.drops += 1

    def missed(self, first: int, last: int) -> bool:
        # The backfill fell out of the history: a gap, as for frames dropped from the queue.
        if not self.gap_to:
            self.gap_from = first
        self.gap_to = last
        n = last - first + 1
        self.topic.drops += n
        self.conn.frames_skipped += n
        return True

    def went_live(self, status_changed: bool) -> None:
        if status_changed:
            self.on_status(self.topic)

    def take_gap(self, seq: int) -> bytes | None:
        if self.gap_to and seq > self.gap_to:
            return self._gap()
        return None

    def _gap(self) -> bytes:
        g = msg.gap(self.topic.feed.name, self.topic.fixture, self.gap_from, self.gap_to)
        self.gap_from = self.gap_to = 0
        return g

    def stop(self) -> None:
        """The subscription ended (unsubscribe, topic closed, connection gone)."""


class ConflatedSubscription(MuxSubscription):
    """A subscription with ``max_rate``: at most that many frames a second, always the latest.

    Frames from the topic go through a :class:`Conflator`; the ones it lets out take the same
    path as any subscription's (the connection's byte budget and slow policy, gap messages).
    Frames replaced while held are counted in ``conn.frames_conflated``; their seqs are simply
    absent from what the client gets. A status change first sends the held frame, so the order
    of frames and status messages stays the topic's. Its timer runs in the connection's nursery
    (:meth:`run`) until :meth:`stop`.
    """

    __slots__ = ("conflator", "scope")

    def __init__(self, conn: Connection, topic: Topic, max_rate: float) -> None:
        super().__init__(conn, topic)
        self.conflator: Conflator[Frame] = Conflator(max_rate, self._deliver)
        self.scope = trio.CancelScope()

    def on_frame(self, frame: Frame) -> None:
        if self.conflator.offer(frame):
            self.conn.frames_conflated += 1

    def _deliver(self, frame: Frame) -> None:
        MuxSubscription.on_frame(self, frame)

    def on_status(self, topic: Topic) -> None:
        self.conflator.flush()
        super().on_status(topic)

    async def run(self) -> None:
        with self.scope:
            await self.conflator.run()

    def stop(self) -> None:
        self.scope.cancel()
        self.conflator.discard()


def _field_int(req: dict[str, Any], name: str, minimum: int) -> int | None:
    value = req.get(name)
    if value is None:
        return None
    if type(value) is not int or value < minimum:
        raise BadRequest(f"{name} must be null or an integer >= {minimum}")
    return value


def _field_rate(req: dict[str, Any]) -> float | None:
    value = req.get("max_rate")
    if value is None:
        return None
    # bool is an int subclass; NaN fails both comparisons; denormals and other absurdly small
    # rates (one frame, then none for ages) are under the floor.
    if type(value) not in (int, float) or not MIN_RATE <= value <= MAX_RATE:
        raise BadRequest(f"max_rate must be null or a number >= {MIN_RATE:g} and <= {MAX_RATE:g}")
    return float(value)


class MultiplexHandler:
    """The ``/v1/stream`` protocol on one connection.

    *feeds*: the feeds its subscriber token may read, fixed at the handshake (None: every feed).
    *replays*: the gateway's ``[replay]`` limits and counters (the ``replay`` op,
    :mod:`gateway.dataplane._replayop`); without it, the defaults for this connection alone.
    """

    def __init__(
        self,
        conn: Connection,
        hub: Hub,
        feeds: frozenset[str] | None = None,
        replays: Replays | None = None,
    ) -> None:
        self.conn = conn
        self.hub = hub
        self.feeds = feeds
        self.subs: dict[tuple[str, str], MuxSubscription] = {}
        self.replays = StreamReplays(conn, hub, replays or Replays(), feeds)
        #: The connection's nursery (from :meth:`start`): conflated subscriptions' timers.
        self._nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        if isinstance(self.conn, DelayedConnection):
            self.conn.on_idle = self._idle
        nursery.start_soon(
            self.conn.run_heartbeats, self.conn.settings.heartbeat_interval, msg.heartbeat
        )

    def topics(self) -> Iterable[Topic]:
        return [s.topic for s in self.subs.values()]

    def subscription_names(self) -> list[str]:
        return [f"{feed}/{fixture}" for feed, fixture in self.subs]

    def on_binary(self) -> None:
        self.conn.send_control(
            msg.error("binary messages are not supported: send JSON text", "<binary>")
        )

    def on_text(self, text: str) -> None:
        try:
            self._request(text)
        except BadRequest as exc:
            self.conn.send_control(msg.error(str(exc), text))

    def _idle(self) -> None:
        """The delayed connection wrote out everything: join the batch group of its topics if
        every subscription is plain and live (see :mod:`gateway.dataplane._batchgroup`)."""
        subs = self.subs.values()
        for sub in subs:
            if type(sub) is not MuxSubscription or sub.backfill is not None or sub.gap_to:
                return
            if sub.topic.closed:
                return
        conn = self.conn
        if subs and can_join(conn):
            join_group(conn, {sub.topic: sub for sub in subs})

    def _request(self, text: str) -> None:
        # Subscribing and unsubscribing change what this connection gets: it writes alone.
        self.conn.leave_group()
        try:
            req = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise BadRequest("invalid JSON") from None
        if not isinstance(req, dict):
            raise BadRequest("a request must be a JSON object")
        op = req.get("op")
        if op == "subscribe":
            self._subscribe(req)
        elif op == "unsubscribe":
            self._unsubscribe(req)
        elif op == "replay":
            self.replays.replay(req, text)
        elif op == "stop_replay":
            self.replays.stop(req)
        elif op is None:
            raise BadRequest("missing field 'op'")
        else:
            raise BadRequest(
                f"unknown op {str(op)[:40]!r}: expected subscribe, unsubscribe, replay or "
                "stop_replay"
            )

    def _subscribe(self, req: dict[str, Any]) -> None:
        check_keys(req, _SUBSCRIBE_KEYS)
        feed = field_str(req, "feed")
        fixture = field_str(req, "fixture")
        backfill = _field_int(req, "backfill", -1)
        after = _field_int(req, "after", 0)
        epoch = req.get("epoch")
        if after is not None:
            if type(epoch) is not str:
                raise BadRequest("epoch (a string) is required with after")
            if backfill is not None:
                raise BadRequest("use either after or backfill, not both")
        elif epoch is not None:
            raise BadRequest("epoch is only valid with after")
        elif "backfill" not in req:
            backfill = 0
        max_rate = _field_rate(req)
        if max_rate is not None and (after is not None or backfill != 0):
            # A backfill or a resume is every frame in a row: the opposite of conflation.
            raise BadRequest("max_rate cannot be combined with after or a backfill other than 0")
        if max_rate is not None and self._nursery is None:
            raise RuntimeError("MultiplexHandler.start() was not called")
        # Before hub.open: a refused subscription must not start an on-demand follow.
        check_feed_allowed(self.feeds, feed)
        key = (feed, fixture)
        if key in self.subs:
            raise BadRequest(f"already subscribed to {msg.clip(feed)}/{msg.clip(fixture)}")
        if len(self.subs) >= self.conn.settings.max_subscriptions:
            raise BadRequest(f"max_subscriptions ({self.conn.settings.max_subscriptions}) reached")
        try:
            topic = self.hub.open(feed, fixture)
        except HubError as exc:
            raise BadRequest(str(exc)) from None
        if after is not None:
            assert isinstance(epoch, str)
            start = topic.resume_start(after, epoch)
            recovered = start is not None
        else:
            start = topic.backfill_start(backfill)
            recovered = False
        conn = self.conn
        sub: MuxSubscription
        if max_rate is None:
            sub = MuxSubscription(conn, topic)
        else:
            assert self._nursery is not None
            sub = ConflatedSubscription(conn, topic, max_rate)
            self._nursery.start_soon(sub.run)
        conn.send_control(msg.subscribed(feed, fixture, topic.seq, topic.epoch, recovered))
        conn.send_control(msg.status(feed, fixture, topic.state.value, topic.detail))
        self.subs[key] = sub
        if start is None:
            topic.attach(sub)
        elif start > topic.seq:
            # Nothing to send yet; a resume ahead of this topic (a cluster relay behind)
            # joins at the frame after the client's last.
            topic.attach_after(sub, start - 1)
        else:
            # Nothing awaits from here: the backfill takes over the topic's frames up to its
            # last seq, then hands over to the subscription (no gap, no duplicate).
            Backfill(conn, topic, sub, start).start()

    def _unsubscribe(self, req: dict[str, Any]) -> None:
        check_keys(req, _UNSUBSCRIBE_KEYS)
        feed = field_str(req, "feed")
        fixture = field_str(req, "fixture")
        sub = self.subs.pop((feed, fixture), None)
        if sub is None:
            raise BadRequest(f"not subscribed to {msg.clip(feed)}/{msg.clip(fixture)}")
        sub.gap_to = 0
        self._leave(sub)

    def _leave(self, sub: MuxSubscription) -> None:
        sub.stop()
        leave(self.hub, sub.topic, sub)

    def forget(self, sub: MuxSubscription) -> None:
        """The topic closed under *sub* (it already sent status ``stopped``)."""
        self.conn.leave_group()
        sub.stop()
        key = (sub.topic.feed.name, sub.topic.fixture)
        if self.subs.get(key) is sub:
            del self.subs[key]

    def finish(self) -> None:
        self.replays.finish()
        self.conn.leave_group()
        subs = list(self.subs.values())
        self.subs.clear()
        for sub in subs:
            self._leave(sub)
