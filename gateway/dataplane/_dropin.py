"""Endpoint 2: the vendor drop-in, so an existing DDE client can point at the gateway unchanged.

It speaks the vendor protocol of the feed's kind (``docs/vendor-protocol.md``):

- tracking: ``{"authToken":..}`` -> ``Authorisation accepted``; vendor heartbeats; then
  ``{"fixtureId":..,"backfill":..}`` -> the upstream frames verbatim. Unknown fixture -> the
  vendor's WARN, connection stays open; requests after an accepted one are ignored. With
  ``"replay": {"enabled": true, ..}`` the request is a replay
  (:mod:`gateway.dataplane._dropinreplay`).
- fastpath: the fixture is in the path, ``startPosition`` skips that many sequenced events of
  the history; after the auth message the frames flow. When the topic's upstream leaves
  ``live`` the client gets one ``ConnectionStateChanged``/``Disconnected`` packet, and
  ``Connected`` again before the next frame.

Tokens: ``[subscribers] tokens_file``, as loaded at start or by the last reload (SIGHUP); the
token must allow the endpoint's feed. Every failure (bad format, unknown token, a token for other
feeds, no authentication message in time) is counted and logged by :class:`SubscriberAuth`.
Slow drop-in subscribers are always disconnected (4008): vendor clients know no gap message.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
import trio

from gateway.config import FeedConfig
from gateway.dataplane import _messages as msg
from gateway.dataplane._access import SubscriberAuth
from gateway.dataplane._backfill import Backfill, leave
from gateway.dataplane._batchgroup import can_join, join_group
from gateway.dataplane._connection import Connection, DelayedConnection
from gateway.dataplane._dropinreplay import DropinReplay, parse_replay
from gateway.hub import Frame, Hub, HubError, Topic
from gateway.model import FixtureState
from gateway.replay import Replays
from gateway.wire import CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_POLICY_VIOLATION

_CSC = b'"ConnectionStateChanged"'


class DropinSubscription:
    """The one topic of a drop-in connection."""

    __slots__ = ("backfill", "conn", "disconnected", "fastpath", "topic")

    def __init__(self, conn: Connection, topic: Topic, fastpath: bool) -> None:
        self.conn = conn
        self.topic = topic
        self.fastpath = fastpath
        self.disconnected = False
        #: The backfill still running (attached to the topic in this object's place), or None.
        self.backfill: Backfill | None = None

    def on_frame(self, frame: Frame) -> None:
        group = self.conn.group
        if group is not None:
            # Written by the batch group (see _multiplex.MuxSubscription.on_frame).
            if group.last is not frame:
                group.add(frame, self.topic)
            return
        if self.disconnected:
            self.disconnected = False
            # The upstream's own state packet says it already; do not repeat it.
            if _CSC not in frame.raw_bytes:
                self.conn.send_control(msg.vendor_connection_state("Connected"))
        self.conn.send_data(frame.raw_ws, frame.seq, frame.published)

    def on_status(self, topic: Topic) -> None:
        if self.fastpath and topic.state is not FixtureState.LIVE and not self.disconnected:
            self.disconnected = True
            self.conn.send_control(msg.vendor_connection_state("Disconnected"))

    def on_closed(self, topic: Topic) -> None:
        self.conn.close(CLOSE_GOING_AWAY, "fixture no longer followed")

    def backlog(self) -> float:
        conn = self.conn
        return conn.queued_bytes / conn.budget

    def missed(self, first: int, last: int) -> bool:
        return False  # Vendor clients know no gap message: too slow (4008).

    def went_live(self, status_changed: bool) -> None:
        # As after a backfill sent at once: a fastpath client hears a state that is not live.
        topic = self.topic
        if self.fastpath and topic.state not in (FixtureState.LIVE, FixtureState.CONNECTING):
            self.on_status(topic)


class DropinHandler:
    """The vendor protocol on one connection of feed *feed*.

    *fixture* is given for fastpath (from the path) and None for tracking (it comes in the
    fixture request). *auth* holds the tokens (None: any token is accepted); *replays* the
    gateway's replay limits, counters and vendor link (None: a private set, no pass-through).
    """

    def __init__(
        self,
        conn: Connection,
        hub: Hub,
        feed: FeedConfig,
        *,
        auth: SubscriberAuth | None = None,
        fixture: str | None = None,
        start_position: int = 0,
        replays: Replays | None = None,
    ) -> None:
        self.conn = conn
        self.hub = hub
        self.feed = feed
        self.auth = auth or SubscriberAuth()
        self.fixture = fixture
        self.start_position = start_position
        self.authenticated = False
        self.sub: DropinSubscription | None = None
        self.replays = replays if replays is not None else Replays()
        #: The replay asked for, while it runs (or is being set up).
        self.replay: DropinReplay | None = None
        self._nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self._auth_deadline)
        if isinstance(self.conn, DelayedConnection):
            self.conn.on_idle = self._idle

    def _idle(self) -> None:
        """The delayed connection wrote out everything: join the batch group of its fixture
        when the subscription is live and nothing is owed to the client (see
        :mod:`gateway.dataplane._batchgroup`); the vendor's frames go as they came."""
        sub, conn = self.sub, self.conn
        if sub is None or sub.backfill is not None or sub.disconnected or sub.topic.closed:
            return
        if can_join(conn):
            join_group(conn, {sub.topic: None}, raw=True)

    async def _auth_deadline(self) -> None:
        await trio.sleep(self.conn.settings.handshake_timeout)
        if not self.authenticated and not self.conn.closing:
            self.auth.failed("dropin", self.conn.peer, "no authentication message in time")
            self.conn.close(CLOSE_POLICY_VIOLATION, "no authentication message")

    def topics(self) -> Iterable[Topic]:
        return [] if self.sub is None else [self.sub.topic]

    def subscription_names(self) -> list[str]:
        return [] if self.sub is None else [f"{self.feed.name}/{self.sub.topic.fixture}"]

    def on_binary(self) -> None:
        pass  # The vendor ignores what it does not understand; so do we.

    def on_text(self, text: str) -> None:
        if not self.authenticated:
            self._authenticate(text)
        elif self.sub is None and self.replay is None and self.fixture is None:
            self._fixture_request(text)
        # Anything else is ignored, as the vendor does.

    def _authenticate(self, text: str) -> None:
        req = _loads(text)
        token = req.get("authToken") if isinstance(req, dict) else None
        if not isinstance(token, str):
            self.auth.failed(
                "dropin", self.conn.peer, "authentication message had incorrect format"
            )
            self.conn.send_control(msg.VENDOR_AUTH_BAD_FORMAT)
            self.conn.close(CLOSE_POLICY_VIOLATION, "authentication message had incorrect format")
            return
        if not self.auth.check_dropin(token, self.feed.name, self.conn.peer):
            self.conn.send_control(msg.VENDOR_AUTH_REJECTED)
            self.conn.close(CLOSE_POLICY_VIOLATION, "authentication failed")
            return
        self.authenticated = True
        assert self._nursery is not None
        self._nursery.start_soon(
            self.conn.run_heartbeats, self.conn.settings.heartbeat_interval, msg.vendor_heartbeat
        )
        if self.fixture is None:
            self.conn.send_control(msg.VENDOR_AUTH_ACCEPTED)
            return
        try:
            topic = self.hub.open(self.feed.name, self.fixture)
        except HubError:
            self.conn.send_control(msg.VENDOR_FIXTURE_NOT_FOUND)
            self.conn.close(CLOSE_NORMAL, "fixture not found")
            return
        if self.start_position:
            self._attach(topic, topic.start_after_events(self.start_position))
        else:
            self._attach(topic, topic.backfill_start(None))

    def _fixture_request(self, text: str) -> None:
        req = _loads(text)
        fixture = req.get("fixtureId") if isinstance(req, dict) else None
        backfill = req.get("backfill", 0) if isinstance(req, dict) else None
        if (
            not isinstance(fixture, str)
            or not fixture
            or not (backfill is None or (type(backfill) is int and backfill >= -1))
        ):
            self.conn.send_control(msg.VENDOR_REQUEST_BAD_FORMAT)
            return
        replay = parse_replay(req, fixture, backfill)
        if isinstance(replay, bytes):
            self.conn.send_control(replay)
            return
        if replay is not None:
            self.replay = DropinReplay(
                self.conn,
                self.hub,
                self.feed,
                self.replays,
                replay,
                attach_live=self._attach,
                done=self._replay_refused,
            )
            self.conn.start_soon(self.replay.run)
            return
        try:
            topic = self.hub.open(self.feed.name, fixture)
        except HubError:
            self.conn.send_control(msg.vendor_unknown_fixture(fixture))
            return
        self._attach(topic, topic.backfill_start(backfill))

    def _replay_refused(self) -> None:
        self.replay = None  # not accepted: a later request is still answered

    def _attach(self, topic: Topic, start: int) -> None:
        """Backfill from seq *start* (none if past the topic's seq), then live frames."""
        sub = DropinSubscription(self.conn, topic, fastpath=self.feed.kind == "fastpath")
        self.sub = sub
        if start <= topic.seq:
            # Streamed as the connection drains; hands over to sub with no gap, no duplicate.
            Backfill(self.conn, topic, sub, start).start()
        else:
            sub.went_live(False)
            topic.attach(sub)
            # Nothing may be written after this (the fixture request has no answer): join now
            # rather than after the first frame, if nothing is owed to the client.
            self._idle()

    def finish(self) -> None:
        self.conn.leave_group()
        sub, self.sub = self.sub, None
        if sub is not None:
            leave(self.hub, sub.topic, sub)


def _loads(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
