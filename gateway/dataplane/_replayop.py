"""The ``/v1/stream`` replay op: a fixture's frames again, paced, beside the live ones.

One :class:`StreamReplays` per multiplexed connection keeps its replays, at most one per
(feed, fixture) at a time, independent of a live subscription to the same fixture::

    {"op":"replay","feed":"tracking","fixture":"F1","rate":40,"looped":false,"from":{"seq":1}}
    {"op":"stop_replay","feed":"tracking","fixture":"F1"}

A request is checked at once (:mod:`gateway.dataplane._replayreq`, the token's feeds, the
feed's kind, one replay per fixture); a bad one gets an ``error`` message. The replay then runs
in a task of the connection: it opens a source over what the gateway holds of the topic
(:func:`gateway.replay.open_source`: the recording on disk, the Redis stream, the memory
history; refused with an ``error`` when that does not reach the start), takes a slot under the
``[replay]`` limits, sends ``replay_started``, then the frames as ``replay_frame`` messages
(never ``frame``: no consumer can take them for live ones) at the requested rate
(:func:`gateway.replay.run_replay`), ``replay_loop`` at each new pass of a looped replay, and
``replay_end`` with the reason and the last seq sent. Its messages reach the socket through its
own :class:`~gateway.dataplane._replayoutlet.ReplayOutlet` (its own byte budget and
slow-consumer rule, see there). ``stop_replay`` ends it at once (``replay_end`` ``stopped``);
the connection's end cancels every replay without a word.
"""

from __future__ import annotations

from typing import Any, Final

import trio

from gateway.dataplane import _messages as msg
from gateway.dataplane._access import check_feed_allowed
from gateway.dataplane._connection import Connection
from gateway.dataplane._replayoutlet import ReplayOutlet
from gateway.dataplane._replayreq import ReplayRequest, parse_replay, parse_stop
from gateway.errors import BadRequest
from gateway.hub import Hub, HubError
from gateway.replay import (
    EndReason,
    LimitReached,
    NotHeld,
    Pacer,
    ReplayFrame,
    ReplayLimits,
    ReplayResult,
    Replays,
    ReplaySource,
    open_source,
    run_replay,
)

#: Feed kinds whose frames carry the match time (``ph``, ``mt``) a replay can start from.
MATCH_TIME_KINDS: Final = frozenset({"tracking"})


class StreamReplay:
    """One replay of a connection: its request, the task's cancel scope, its outlet."""

    __slots__ = ("ended", "key", "on_connection", "outlet", "prefix", "request", "scope", "text")

    def __init__(
        self, conn: Connection, request: ReplayRequest, text: str, on_connection: int
    ) -> None:
        self.request = request
        self.key = (request.feed, request.fixture)
        #: The request as sent (quoted back in a late ``error``).
        self.text = text
        #: Replays its connection ran when this one was asked for (``max_per_connection``).
        self.on_connection = on_connection
        self.prefix = msg.replay_frame_prefix(request.feed, request.fixture)
        self.outlet = ReplayOutlet(conn)
        self.scope = trio.CancelScope()
        #: ``replay_end`` went out (or the connection is gone): nothing more is sent.
        self.ended = False

    def __repr__(self) -> str:
        return f"<StreamReplay {self.key[0]}/{self.key[1]} at {self.request.rate}/s>"

    def end(self, reason: str, last_seq: int | None = None) -> None:
        """Send ``replay_end`` once: after the pending frames, the last of them *last_seq*;
        or (None) instead of them, after the last frame the connection took."""
        if self.ended:
            return
        self.ended = True
        self.scope.cancel()
        feed, fixture = self.key
        outlet = self.outlet
        if last_seq is None:
            outlet.discard(msg.replay_end(feed, fixture, reason, outlet.last_seq))
        else:
            outlet.end(msg.replay_end(feed, fixture, reason, last_seq))

    def drop(self) -> None:
        """The connection is gone: stop without a message."""
        self.ended = True
        self.scope.cancel()
        self.outlet.discard()


class StreamReplays:
    """The replays of one ``/v1/stream`` connection.

    *feeds*: the feeds its subscriber token may read (None: every feed). *replays*: the
    gateway's ``[replay]`` limits and counters, shared by every connection.
    """

    def __init__(
        self, conn: Connection, hub: Hub, replays: Replays, feeds: frozenset[str] | None
    ) -> None:
        self.conn = conn
        self.hub = hub
        self.replays = replays
        self.feeds = feeds
        self.running: dict[tuple[str, str], StreamReplay] = {}

    def replay(self, req: dict[str, Any], text: str) -> None:
        """A ``replay`` op: checked now, run in a task of the connection."""
        request = parse_replay(req)
        feed, fixture = request.feed, request.fixture
        check_feed_allowed(self.feeds, feed)
        try:
            cfg = self.hub.feed(feed)
        except HubError as exc:
            raise BadRequest(str(exc)) from None
        if request.start.phase is not None and cfg.kind not in MATCH_TIME_KINDS:
            raise BadRequest(f"from phase+mt needs a tracking feed; {msg.clip(feed)!r} is not")
        key = (feed, fixture)
        if key in self.running:
            raise BadRequest(f"already replaying {msg.clip(feed)}/{msg.clip(fixture)}")
        replay = StreamReplay(self.conn, request, text, len(self.running))
        if not self.conn.start_soon(self._run, replay):
            return
        self.running[key] = replay

    def stop(self, req: dict[str, Any]) -> None:
        """A ``stop_replay`` op: ``replay_end`` ``stopped`` at once, nothing of it after."""
        feed, fixture = parse_stop(req)
        replay = self.running.pop((feed, fixture), None)
        if replay is None:
            raise BadRequest(f"not replaying {msg.clip(feed)}/{msg.clip(fixture)}")
        replay.end(EndReason.STOPPED)

    def finish(self) -> None:
        """The connection is gone."""
        replays = list(self.running.values())
        self.running.clear()
        for replay in replays:
            replay.drop()

    def _refuse(self, replay: StreamReplay, message: str, *, not_held: bool = False) -> None:
        """Answer the request with an ``error`` (*not_held*: counted as such), unless it was
        stopped meanwhile: then its ``replay_end`` was all there is to say."""
        self._forget(replay)
        if replay.ended:
            return
        replay.ended = True
        if not_held:
            self.replays.refuse("not_held")
        self.conn.send_control(msg.error(message, replay.text))

    def _forget(self, replay: StreamReplay) -> None:
        if self.running.get(replay.key) is replay:
            del self.running[replay.key]

    async def _run(self, replay: StreamReplay) -> None:
        try:
            with replay.scope:
                await self._serve(replay)
        finally:
            self._forget(replay)

    async def _serve(self, replay: StreamReplay) -> None:
        """Open the source, take a slot, run the replay, end it."""
        request = replay.request
        feed, fixture = replay.key
        replays = self.replays
        topic = self.hub.get(feed, fixture)
        if topic is None:
            name = f"{msg.clip(feed)}/{msg.clip(fixture)}"
            self._refuse(replay, f"no recording reaches the start of {name}", not_held=True)
            return
        # Chunks no larger than what the connection queues of a backfill at a time.
        chunk = min(self.conn.fill_target, self.replays.settings.queue_bytes)
        source = await open_source(topic, request.start, chunk_bytes=chunk)
        if isinstance(source, NotHeld):
            self._refuse(replay, source.reason, not_held=True)
            return
        try:
            slot = replays.local(source.kind, on_connection=replay.on_connection)
        except LimitReached as exc:
            source.close()
            self._refuse(replay, str(exc))
            return
        try:
            result = await self._paced(replay, source)
        finally:
            slot.release()
        self._forget(replay)
        if result.reason is EndReason.SLOW_CONSUMER:
            # A client too slow for its replay does not get the frames it left unread.
            replay.end(result.reason)
        else:
            replay.end(result.reason, result.last_seq)

    async def _paced(self, replay: StreamReplay, source: ReplaySource) -> ReplayResult:
        request = replay.request
        feed, fixture = replay.key
        outlet = replay.outlet
        outlet.open()
        outlet.push(
            msg.replay_started(
                feed,
                fixture,
                epoch=source.epoch,
                from_seq=source.first_seq,
                rate=request.rate,
                looped=request.looped,
            )
        )
        prefix = replay.prefix

        async def send(frame: ReplayFrame) -> None:
            outlet.push(msg.replay_frame(prefix, frame.seq, frame.raw), frame.seq)

        async def on_loop(n: int) -> None:
            outlet.push(msg.replay_loop(feed, fixture, n))

        replays = self.replays
        settings = replays.settings
        return await run_replay(
            source,
            Pacer(request.rate),
            send,
            backlog=outlet,
            limits=ReplayLimits(settings.queue_bytes, settings.stall_timeout),
            looped=request.looped,
            on_loop=on_loop,
            counters=replays.counters,
        )
