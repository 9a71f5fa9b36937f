"""The vendor's Replay Fixture Request on the drop-in endpoint (tracking).

``{"fixtureId":..,"backfill":..,"replay":{"enabled":true,"packetsPerSecond":N,"looped":b}}``
(docs/protocol.md). :func:`parse_replay` checks the ``replay`` object (each bad field gets its
own vendor-style ERROR message; nothing streams; the connection stays open).
:class:`DropinReplay` then runs it in the connection's nursery:

- **served locally** when the gateway holds the fixture from its start (``gateway.replay``:
  the recording on disk, in a cluster the instance's recording or the Redis stream, or the
  memory history): the frames verbatim at N a second, from the first frame (``backfill`` n > 0:
  from the n-th newest, as the vendor's replay covers its backfill range). Looped: the first
  frame again after the newest held, until the client closes. Not looped: at the end the
  live frames follow with no gap and no duplicate, as after the vendor's replay (the
  connection becomes an ordinary drop-in subscriber of the topic);
- **passed through** otherwise, on a dedicated vendor connection for this client
  (``gateway.replay.VendorLink``), capped by ``[replay] max_replays``;
- refused with an ERROR message when neither is possible (a limit, no vendor link), and a
  later request on the connection is still answered.

The replay never attaches to the topic while it runs: the live fan-out never sees it. Its
frames go through the connection's send queue with the replay's own budget (below the
connection's ``queue_bytes``, so the 4008 rule is never what stops it): a client that does not
read stalls the replay's reading; one that reads nothing for ``[replay] stall_timeout`` is
closed as too slow (4008, counted like any slow drop-in subscriber).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gateway.config import FeedConfig
from gateway.dataplane import _messages as msg
from gateway.dataplane._connection import Connection
from gateway.dataplane._replaybacklog import ConnectionBacklog
from gateway.hub import Hub, HubError, Topic
from gateway.logs import fields
from gateway.replay import (
    EndReason,
    HeldSource,
    LimitReached,
    Pacer,
    PassThroughEnd,
    PassThroughError,
    ReplayFrame,
    ReplayLimits,
    ReplayRequest,
    Replays,
    Start,
    open_source,
    run_replay,
    valid_rate,
)
from gateway.wire import CLOSE_GOING_AWAY, encode_frame

log = logging.getLogger("gateway.dataplane")

_REPLAY_FIELDS = frozenset({"enabled", "packetsPerSecond", "looped"})


def parse_replay(
    req: dict[str, Any], fixture: str, backfill: int | None
) -> ReplayRequest | bytes | None:
    """The request's replay (None: absent or ``enabled`` false: an ordinary request), or the
    ERROR message to answer with."""
    spec = req.get("replay")
    if spec is None:
        return None
    if not isinstance(spec, dict) or not spec.keys() <= _REPLAY_FIELDS:
        return msg.VENDOR_REPLAY_BAD_SHAPE
    enabled = spec.get("enabled")
    looped = spec.get("looped", False)
    if type(enabled) is not bool:
        return msg.VENDOR_REPLAY_BAD_ENABLED
    if type(looped) is not bool:
        return msg.VENDOR_REPLAY_BAD_LOOPED
    if not enabled:
        return None
    pps = spec.get("packetsPerSecond")
    if not valid_rate(pps):
        return msg.VENDOR_REPLAY_BAD_RATE
    assert isinstance(pps, int)
    return ReplayRequest(fixture, backfill, pps, looped)


class DropinReplay:
    """One drop-in connection's replay (module docstring). *attach_live(topic, start)* makes
    the connection an ordinary subscriber from seq *start* (the end of a non-looped replay);
    *done()* is called when the request was refused (a later one may be sent)."""

    def __init__(
        self,
        conn: Connection,
        hub: Hub,
        feed: FeedConfig,
        replays: Replays,
        request: ReplayRequest,
        *,
        attach_live: Callable[[Topic, int], None],
        done: Callable[[], None],
    ) -> None:
        self.conn = conn
        self.hub = hub
        self.feed = feed
        self.replays = replays
        self.request = request
        self._attach_live = attach_live
        self._done = done
        backlog = ConnectionBacklog(conn)
        self.backlog = backlog
        settings = replays.settings
        self.limits = ReplayLimits(backlog.budget(settings.queue_bytes), settings.stall_timeout)

    def _refuse(self, reason: str) -> None:
        self.conn.send_control(msg.vendor_replay_unavailable(reason))
        self._done()

    async def run(self) -> None:
        req = self.request
        topic = self.hub.get(self.feed.name, req.fixture)
        reason = f"no recording reaches the start of {self.feed.name}/{msg.clip(req.fixture)}"
        if topic is not None:
            n = req.newest
            start = Start.first() if n is None else Start.at_seq(max(1, topic.seq + 1 - n))
            source = await open_source(
                topic, start, chunk_bytes=min(self.conn.fill_target, self.limits.budget_bytes)
            )
            if isinstance(source, HeldSource):
                await self._local(topic, source)
                return
            reason = source.reason
        await self._pass_through(reason)

    async def _local(self, topic: Topic, source: HeldSource) -> None:
        replays = self.replays
        try:
            slot = replays.local(source.kind)
        except LimitReached as exc:
            source.close()
            self._refuse(str(exc))
            return
        conn = self.conn

        async def send(frame: ReplayFrame) -> None:
            conn.send_data(encode_frame(frame.raw), frame.seq, 0.0)

        try:
            result = await run_replay(
                source,
                Pacer(self.request.packets_per_second),
                send,
                backlog=self.backlog,
                limits=self.limits,
                looped=self.request.looped,
                counters=replays.counters,
            )
        finally:
            slot.release()
        if result.reason is EndReason.END:
            # As the vendor: the live frames follow from where the replay ended.
            try:
                live = self.hub.open(self.feed.name, topic.fixture)
            except HubError:
                live = topic
            if live is not topic or topic.closed:
                conn.close(CLOSE_GOING_AWAY, "fixture no longer followed")
                return
            self._attach_live(topic, result.last_seq + 1)
        elif result.reason is EndReason.SLOW_CONSUMER:
            conn.too_slow()
        else:
            log.info(
                "replay of %s/%s ended: %s",
                self.feed.name,
                topic.fixture,
                result.detail,
                extra=fields(feed=self.feed.name, fixture=topic.fixture),
            )
            conn.close(CLOSE_GOING_AWAY, "replay source lost")

    async def _pass_through(self, not_held: str) -> None:
        replays = self.replays
        link = replays.vendor_link
        if link is None or replays.settings.max_replays == 0:
            replays.refuse("not_held")
            self._refuse(not_held)
            return
        try:
            slot = replays.vendor()
        except LimitReached as exc:
            self._refuse(str(exc))
            return
        conn = self.conn

        async def send(text: str) -> None:
            conn.send_data(encode_frame(text.encode()), 1, 0.0)

        try:
            end = await link.pass_through(
                self.feed,
                self.request,
                send,
                backlog=self.backlog,
                limits=self.limits,
                counters=replays.counters,
            )
        except PassThroughError as exc:
            replays.refuse("vendor")
            self._refuse(str(exc))
            return
        finally:
            slot.release()
        if end is PassThroughEnd.REFUSED:
            self._done()  # the vendor's answer was relayed; another request may follow
        elif end is PassThroughEnd.SLOW_CONSUMER:
            conn.too_slow()
        else:
            conn.close(CLOSE_GOING_AWAY, f"vendor replay ended ({end})")
