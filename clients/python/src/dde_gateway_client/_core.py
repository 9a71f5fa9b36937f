"""The sans-I/O core: the protocol's state machine, with no socket, clock or task of its own.

An adapter (trio, asyncio) owns the WebSocket and the time; it tells the core what happened
(:meth:`Core.connecting`, :meth:`Core.opened`, :meth:`Core.received`, :meth:`Core.lost`,
:meth:`Core.refused`) and does what the core asks: send :meth:`Core.take_outgoing`, wait
:meth:`Core.lost`'s delay, stop reading while :attr:`Core.wants_read` is false, and treat
:attr:`Core.dead_after` seconds without a message as a dead connection. The application's
events wait in the core's queues (:meth:`Core.pop`), at most ``max_queue`` of them in all.

What the application sees (docs/clients.md): each frame once, in order, or a :class:`Loss`
event before the next frame saying what was not recovered; never a silent skip.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ._backoff import Backoff
from ._events import (
    ConnectionState,
    Error,
    Event,
    Frame,
    Loss,
    LossReason,
    ReplayEnd,
    ReplayFrame,
    ReplayLoop,
    ReplayStarted,
    StateChanged,
    Status,
    Subscribed,
    Unsubscribed,
)

#: The WebSocket subprotocol of the gateway's protocol version this client speaks.
PROTOCOL: Final = "dde.v1"
#: The prefix of the subprotocol that carries a token (browsers; ``token_in="subprotocol"``).
TOKEN_SUBPROTOCOL_PREFIX: Final = "dde.bearer."
#: The gateway's default ``heartbeat_interval`` (seconds).
DEFAULT_HEARTBEAT_INTERVAL: Final = 10.0
#: This many heartbeat intervals without any message: the connection is dead.
DEFAULT_HEARTBEAT_MISSES: Final = 3
#: The most events waiting for the application (all subscriptions together).
DEFAULT_MAX_QUEUE: Final = 10_000
#: The gateway's own close code for a subscriber that read too slowly.
CLOSE_SLOW_CONSUMER: Final = 4008
#: How many sent requests are remembered to match an ``error`` reply to its subscription.
SENT_MEMORY: Final = 256
#: The `replay` op's rate limits (the gateway's).
REPLAY_RATE_MIN: Final = 1
REPLAY_RATE_MAX: Final = 1000

SubState = Literal["subscribing", "subscribed", "unsubscribed"]
Key = tuple[str, str]

_DATA_KEY: Final = ',"data":'


class ProtocolError(ValueError):
    """The gateway sent something this client cannot read (not JSON, not an object)."""


@dataclass
class Topic:
    """One live subscription, across connections."""

    feed: str
    fixture: str
    stream: int
    backfill: int | None
    max_rate: float | None
    state: SubState = "subscribing"
    #: The epoch of the last ``subscribed`` reply (None before the first).
    epoch: str | None = None
    #: The last seq delivered to the application (or, live only, where it started).
    last: int | None = None
    #: The ``after`` of the subscribe in flight (None: sent with the backfill option).
    sent_after: int | None = None

    def request(self) -> dict[str, Any]:
        req: dict[str, Any] = {"op": "subscribe", "feed": self.feed, "fixture": self.fixture}
        if self.max_rate is not None:
            req["max_rate"] = self.max_rate
            self.sent_after = None
        elif self.last is not None and self.epoch is not None:
            req["after"] = self.last
            req["epoch"] = self.epoch
            self.sent_after = self.last
        else:
            req["backfill"] = self.backfill
            self.sent_after = None
        return req


@dataclass
class Replay:
    feed: str
    fixture: str
    stream: int
    request: dict[str, Any]
    sent: bool = False
    last_seq: int | None = None


@dataclass
class Stream:
    """One queue of events for the application: the events of its subscriptions (and replays),
    and the connection's state changes."""

    keys: set[tuple[str, str, str]] = field(default_factory=set)
    queue: deque[Event] = field(default_factory=deque)
    ended: bool = False


@dataclass
class Counters:
    frames: int = 0
    duplicates_dropped: int = 0
    losses: int = 0
    connects: int = 0
    disconnects: int = 0
    stray_messages: int = 0


def split_frame(text: str) -> tuple[dict[str, Any], str]:
    """A ``frame``/``replay_frame`` envelope's header fields and its ``data`` text, verbatim.

    The gateway writes ``{...,"seq":S,"data":RAW}`` with ``data`` last; only the short header
    is parsed. Any other layout is parsed whole and ``data`` re-serialised.
    """
    at = text.find(_DATA_KEY)
    if at > 0 and text.endswith("}"):
        try:
            head = json.loads(text[:at] + "}")
        except ValueError:
            head = None
        if isinstance(head, dict):
            return head, text[at + len(_DATA_KEY) : -1]
    msg = _loads(text)
    return msg, json.dumps(msg.get("data"), separators=(",", ":"), ensure_ascii=False)


def _loads(text: str) -> dict[str, Any]:
    try:
        msg = json.loads(text)
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {text[:80]!r}") from exc
    if not isinstance(msg, dict):
        raise ProtocolError(f"not a JSON object: {text[:80]!r}")
    return msg


def validate_start(start: dict[str, Any] | None) -> None:
    """A replay's ``from``: None, or exactly one of ``{seq}``, ``{phase, mt}``, ``{ut}``."""
    if start is None:
        return
    if set(start) not in ({"seq"}, {"phase", "mt"}, {"ut"}):
        raise ValueError("replay start must have exactly one of seq, phase+mt, ut")


class Core:
    """The client's state machine. Single-threaded; every method returns at once."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        backoff: Backoff | None = None,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        heartbeat_misses: int = DEFAULT_HEARTBEAT_MISSES,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> None:
        if isinstance(urls, str):
            urls = [urls]
        if not urls:
            raise ValueError("at least one URL is needed")
        for url in urls:
            if not url.startswith(("ws://", "wss://")):
                raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        if not heartbeat_interval > 0 or heartbeat_misses < 1:
            raise ValueError("heartbeat_interval must be > 0 and heartbeat_misses >= 1")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.urls = list(urls)
        self.backoff = backoff if backoff is not None else Backoff()
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_misses = heartbeat_misses
        self.max_queue = max_queue
        self.state: ConnectionState = "disconnected"
        self.url = self.urls[0]
        self.counters = Counters()
        self._next_url = 0
        self._opened_at: float | None = None
        self._topics: dict[Key, Topic] = {}
        self._replays: dict[Key, Replay] = {}
        self._streams: dict[int, Stream] = {}
        self._stream_ids = 0
        self._queued = 0
        self._outgoing: list[str] = []
        #: (text sent, op, key) of recent requests, to match ``error`` replies.
        self._sent: deque[tuple[str, str, Key]] = deque(maxlen=SENT_MEMORY)

    # -- what the adapter asks -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    def is_closed(self) -> bool:
        """As :attr:`closed` (a call: type checkers do not keep it narrowed across awaits)."""
        return self.state == "closed"

    @property
    def dead_after(self) -> float:
        """Seconds without any message (while reading) after which the connection is dead."""
        return self.heartbeat_interval * self.heartbeat_misses

    @property
    def wants_read(self) -> bool:
        """False while ``max_queue`` events wait for the application: stop reading the socket
        (the gateway then applies its slow-consumer policy; the client resumes from there)."""
        return self._queued < self.max_queue

    @property
    def queued(self) -> int:
        return self._queued

    def take_outgoing(self) -> list[str]:
        """The messages to send now, in order (taken: each is returned once)."""
        out, self._outgoing = self._outgoing, []
        return out

    def topics(self) -> list[Topic]:
        return list(self._topics.values())

    # -- the application's side ----------------------------------------------------------------

    def open_stream(self) -> int:
        self._stream_ids += 1
        self._streams[self._stream_ids] = Stream()
        return self._stream_ids

    def pop(self, stream: int) -> Event | None:
        """The next event of *stream*, or None when none waits."""
        s = self._streams.get(stream)
        if s is None or not s.queue:
            return None
        self._queued -= 1
        return s.queue.popleft()

    def stream_done(self, stream: int) -> bool:
        """Nothing waits in *stream* and nothing more will come (its subscriptions and replays
        ended, or the client closed)."""
        s = self._streams.get(stream)
        if s is None:
            return True
        return not s.queue and (s.ended or not s.keys or self.closed)

    def close_stream(self, stream: int) -> None:
        """The application stopped reading *stream*: unsubscribe what it holds, drop its queue."""
        s = self._streams.pop(stream, None)
        if s is None:
            return
        self._queued -= len(s.queue)
        for kind, feed, fixture in list(s.keys):
            if kind == "live":
                self._end_topic((feed, fixture), None, send=True)
            else:
                self._end_replay((feed, fixture), None, send=True)

    def subscribe(
        self,
        stream: int,
        feed: str,
        fixture: str,
        *,
        backfill: int | None = 0,
        max_rate: float | None = None,
    ) -> None:
        """Subscribe (now if connected, else on connecting). ``backfill``: ``0`` live only,
        ``n`` the last n frames first, ``None`` or ``-1`` every frame the gateway holds."""
        if self.closed:
            raise RuntimeError("the client is closed")
        key = (feed, fixture)
        if key in self._topics:
            raise ValueError(f"already subscribed to {feed}/{fixture}")
        if backfill is not None and (isinstance(backfill, bool) or backfill < -1):
            raise ValueError("backfill must be None or an integer >= -1")
        if max_rate is not None and backfill != 0:
            raise ValueError("max_rate cannot be combined with a backfill other than 0")
        topic = Topic(feed, fixture, stream, backfill, max_rate)
        self._topics[key] = topic
        self._streams[stream].keys.add(("live", feed, fixture))
        if self.state == "connected":
            self._send_subscribe(topic)

    def unsubscribe(self, feed: str, fixture: str) -> None:
        self._end_topic((feed, fixture), "unsubscribe", send=True)

    def replay(
        self,
        stream: int,
        feed: str,
        fixture: str,
        *,
        rate: int,
        looped: bool = False,
        start: dict[str, Any] | None = None,
    ) -> None:
        """Ask for a replay of what the gateway holds (op ``replay``): *rate* frames a second,
        from *start* (``{"seq": N}``, ``{"phase": P, "mt": MS}`` or ``{"ut": MS}``)."""
        if self.closed:
            raise RuntimeError("the client is closed")
        if isinstance(rate, bool) or not isinstance(rate, int):
            raise ValueError("rate must be an integer 1 to 1000")
        if not REPLAY_RATE_MIN <= rate <= REPLAY_RATE_MAX:
            raise ValueError("rate must be an integer 1 to 1000")
        validate_start(start)
        key = (feed, fixture)
        if key in self._replays:
            raise ValueError(f"already replaying {feed}/{fixture}")
        req: dict[str, Any] = {
            "op": "replay",
            "feed": feed,
            "fixture": fixture,
            "rate": rate,
            "looped": looped,
        }
        if start is not None:
            req["from"] = start
        rep = Replay(feed, fixture, stream, req)
        self._replays[key] = rep
        self._streams[stream].keys.add(("replay", feed, fixture))
        if self.state == "connected":
            self._send_replay(rep)

    def stop_replay(self, feed: str, fixture: str) -> None:
        self._end_replay((feed, fixture), "stopped", send=True)

    def close(self, reason: str = "closed by the application") -> None:
        """Terminal: no more connections; every stream ends after what it holds."""
        if self.closed:
            return
        self.state = "closed"
        self._broadcast(StateChanged("closed", self.url, reason))

    # -- the connection's side -----------------------------------------------------------------

    def connecting(self) -> str:
        """A connection attempt begins: the URL to open (the next one in turn)."""
        if self.closed:
            raise RuntimeError("the client is closed")
        self.url = self.urls[self._next_url % len(self.urls)]
        self._next_url += 1
        self.state = "connecting"
        self._broadcast(StateChanged("connecting", self.url))
        return self.url

    def opened(self, now: float) -> None:
        """The WebSocket is open: (re)subscribe everything (see :meth:`take_outgoing`)."""
        self.state = "connected"
        self._opened_at = now
        self.counters.connects += 1
        self._sent.clear()
        self._outgoing.clear()
        self._broadcast(StateChanged("connected", self.url))
        for topic in self._topics.values():
            self._send_subscribe(topic)
        for rep in self._replays.values():
            if not rep.sent:
                self._send_replay(rep)

    def lost(self, reason: str, now: float) -> float:
        """The connection (or the attempt) ended: the seconds to wait before the next attempt
        (to the next URL)."""
        if self.closed:
            return 0.0
        if self._opened_at is not None:
            self.backoff.connection_lived(now - self._opened_at)
            self._opened_at = None
            self.counters.disconnects += 1
        self.state = "disconnected"
        self._outgoing.clear()
        for topic in self._topics.values():
            topic.state = "subscribing"
        self._broadcast(StateChanged("disconnected", self.url, reason))
        for key, rep in list(self._replays.items()):
            if rep.sent:
                self._end_replay(key, "disconnected", send=False)
        return self.backoff.next_delay()

    def refused(self, status: int, now: float) -> float | None:
        """The upgrade was answered with HTTP *status*: 401 (token refused) is fatal (None:
        the client is closed); any other status is retried (the delay)."""
        if status == 401:
            self.fatal(f"{self.url}: the subscriber token was refused (HTTP 401)")
            return None
        return self.lost(f"HTTP {status} at the upgrade", now)

    def fatal(self, message: str) -> None:
        """An error that ends the client (no retry)."""
        if self.closed:
            return
        self._broadcast(Error(message, fatal=True))
        self.close(message)

    def received(self, text: str | bytes) -> bool:
        """One message from the gateway; False when it was a frame dropped as a duplicate
        (the application saw it already), True otherwise."""
        if isinstance(text, bytes):
            raise ProtocolError("the gateway sent a binary message")
        if text.startswith('{"type":"frame"') or text.startswith('{"type":"replay_frame"'):
            head, data = split_frame(text)
            if head.get("type") == "frame":
                return self._frame(head, data)
            self._replay_frame(head, data)
            return True
        msg = _loads(text)
        kind = msg.get("type")
        if kind == "heartbeat":
            return True
        if kind == "frame":
            return self._frame(msg, json.dumps(msg.get("data"), separators=(",", ":")))
        if kind == "subscribed":
            self._subscribed(msg)
        elif kind == "status":
            self._status(msg)
        elif kind == "gap":
            self._gap(msg)
        elif kind == "error":
            self._error(msg)
        elif kind == "replay_started":
            self._replay_started(msg)
        elif kind == "replay_loop":
            self._replay_loop(msg)
        elif kind == "replay_end":
            self._replay_end(msg)
        else:
            self.counters.stray_messages += 1
        return True

    # -- messages ------------------------------------------------------------------------------

    def _live(self, msg: dict[str, Any]) -> Topic | None:
        topic = self._topics.get((str(msg.get("feed")), str(msg.get("fixture"))))
        if topic is None:
            self.counters.stray_messages += 1
        return topic

    def _subscribed(self, msg: dict[str, Any]) -> None:
        topic = self._live(msg)
        if topic is None:
            return
        epoch, seq, recovered = str(msg["epoch"]), int(msg["seq"]), bool(msg["recovered"])
        self._forget_sent("subscribe", (topic.feed, topic.fixture))
        topic.state = "subscribed"
        after = topic.sent_after
        before = topic.epoch
        resumed = after is not None
        self._emit(
            topic.stream, Subscribed(topic.feed, topic.fixture, epoch, seq, recovered, resumed)
        )
        if after is None:
            # Sent without a position (a first subscribe, a backfill that delivered nothing
            # yet, a max_rate one): live only starts at the topic's seq, a backfill at its
            # first frame; nothing had been delivered, so nothing is lost.
            topic.epoch = epoch
            topic.last = seq if topic.backfill == 0 else None
            return
        assert before is not None
        topic.epoch = epoch
        if recovered:
            return  # frames continue from after + 1 (a new epoch continues the numbering)
        if epoch != before:
            self._loss(topic, after + 1, seq if seq > 0 else None, before, "epoch_changed")
            topic.last = seq
        elif seq > after:
            self._loss(topic, after + 1, seq, before, "not_recovered")
            topic.last = seq
        # else: the instance is behind what this client already has (a failover to an
        # instance still catching up): the frames after `after` come live; the ones up to it
        # are duplicates. Nothing lost, and `last` never moves back.

    def _frame(self, head: dict[str, Any], data: str) -> bool:
        topic = self._live(head)
        if topic is None or topic.state != "subscribed" or topic.epoch is None:
            if topic is not None:
                self.counters.stray_messages += 1
            return True
        seq = int(head["seq"])
        last = topic.last
        if last is not None and seq <= last:
            self.counters.duplicates_dropped += 1
            return False
        if last is not None and seq != last + 1 and topic.max_rate is None:
            self._loss(topic, last + 1, seq - 1, topic.epoch, "sequence_gap")
        topic.last = seq
        self.counters.frames += 1
        self._emit(topic.stream, Frame(topic.feed, topic.fixture, topic.epoch, seq, data))
        return True

    def _gap(self, msg: dict[str, Any]) -> None:
        topic = self._live(msg)
        if topic is None or topic.epoch is None:
            return
        first, last = int(msg["from_seq"]), int(msg["to_seq"])
        if topic.last is not None:
            if last <= topic.last:
                self.counters.duplicates_dropped += 1
                return  # nothing the application has not seen
            if first > topic.last + 1 and topic.max_rate is None:
                self._loss(topic, topic.last + 1, first - 1, topic.epoch, "sequence_gap")
            first = max(first, topic.last + 1)
        self._loss(topic, first, last, topic.epoch, "slow_consumer")
        topic.last = last

    def _status(self, msg: dict[str, Any]) -> None:
        topic = self._live(msg)
        if topic is None:
            return
        state = str(msg.get("state"))
        self._emit(
            topic.stream, Status(topic.feed, topic.fixture, state, str(msg.get("detail", "")))
        )
        if state == "stopped":
            self._end_topic((topic.feed, topic.fixture), "stopped", send=False)

    def _error(self, msg: dict[str, Any]) -> None:
        message, request = str(msg.get("message", "")), str(msg.get("request", ""))
        match = self._match_sent(request)
        if match is not None:
            op, key = match
            if op == "subscribe" and key in self._topics:
                topic = self._topics[key]
                self._emit(topic.stream, Error(message, request, key[0], key[1]))
                self._end_topic(key, message, send=False)
                return
            if op == "replay" and key in self._replays:
                rep = self._replays[key]
                self._emit(rep.stream, Error(message, request, key[0], key[1]))
                self._end_replay(key, None, send=False)
                return
            self._broadcast(Error(message, request, key[0], key[1]))
            return
        self._broadcast(Error(message, request))

    def _replay(self, msg: dict[str, Any]) -> Replay | None:
        rep = self._replays.get((str(msg.get("feed")), str(msg.get("fixture"))))
        if rep is None:
            self.counters.stray_messages += 1
        return rep

    def _replay_started(self, msg: dict[str, Any]) -> None:
        rep = self._replay(msg)
        if rep is None:
            return
        self._forget_sent("replay", (rep.feed, rep.fixture))
        event = ReplayStarted(
            rep.feed,
            rep.fixture,
            str(msg.get("epoch", "")),
            int(msg.get("from_seq", 0)),
            int(msg.get("rate", rep.request["rate"])),
            bool(msg.get("looped", rep.request["looped"])),
        )
        self._emit(rep.stream, event)

    def _replay_frame(self, head: dict[str, Any], data: str) -> None:
        rep = self._replay(head)
        if rep is None:
            return
        rep.last_seq = int(head["seq"])
        self._emit(rep.stream, ReplayFrame(rep.feed, rep.fixture, rep.last_seq, data))

    def _replay_loop(self, msg: dict[str, Any]) -> None:
        rep = self._replay(msg)
        if rep is not None:
            self._emit(rep.stream, ReplayLoop(rep.feed, rep.fixture, int(msg.get("pass", 0))))

    def _replay_end(self, msg: dict[str, Any]) -> None:
        rep = self._replay(msg)
        if rep is None:
            return
        last = msg.get("last_seq")
        if isinstance(last, int) and not isinstance(last, bool):
            rep.last_seq = last
        self._end_replay((rep.feed, rep.fixture), str(msg.get("reason", "end")), send=False)

    # -- helpers -------------------------------------------------------------------------------

    def _send(self, req: dict[str, Any], op: str, key: Key) -> None:
        text = json.dumps(req, separators=(",", ":"), ensure_ascii=False)
        self._outgoing.append(text)
        self._sent.append((text, op, key))

    def _send_subscribe(self, topic: Topic) -> None:
        topic.state = "subscribing"
        self._send(topic.request(), "subscribe", (topic.feed, topic.fixture))

    def _send_replay(self, rep: Replay) -> None:
        rep.sent = True
        self._send(rep.request, "replay", (rep.feed, rep.fixture))

    def _match_sent(self, request: str) -> tuple[str, Key] | None:
        """Which request an ``error`` answers: the gateway quotes it (cut to 256 characters
        and ``...``)."""
        for i, (text, op, key) in enumerate(self._sent):
            if text == request or (
                request.endswith("...") and len(request) > 3 and text.startswith(request[:-3])
            ):
                del self._sent[i]
                return op, key
        return None

    def _forget_sent(self, op: str, key: Key) -> None:
        for i, (_, sent_op, sent_key) in enumerate(self._sent):
            if sent_op == op and sent_key == key:
                del self._sent[i]
                return

    def _loss(
        self, topic: Topic, first: int, last: int | None, before: str, reason: LossReason
    ) -> None:
        self.counters.losses += 1
        assert topic.epoch is not None
        self._emit(
            topic.stream,
            Loss(topic.feed, topic.fixture, first, last, before, topic.epoch, reason),
        )

    def _end_topic(self, key: Key, reason: str | None, *, send: bool) -> None:
        topic = self._topics.pop(key, None)
        if topic is None:
            return
        topic.state = "unsubscribed"
        if send and self.state == "connected":
            self._send({"op": "unsubscribe", "feed": key[0], "fixture": key[1]}, "unsubscribe", key)
        if reason is not None:
            self._emit(topic.stream, Unsubscribed(key[0], key[1], reason))
        s = self._streams.get(topic.stream)
        if s is not None:
            s.keys.discard(("live", *key))

    def _end_replay(self, key: Key, reason: str | None, *, send: bool) -> None:
        rep = self._replays.pop(key, None)
        if rep is None:
            return
        if send and rep.sent and self.state == "connected":
            self._send({"op": "stop_replay", "feed": key[0], "fixture": key[1]}, "stop_replay", key)
        if reason is not None:
            self._emit(rep.stream, ReplayEnd(key[0], key[1], reason, rep.last_seq))
        s = self._streams.get(rep.stream)
        if s is not None:
            s.keys.discard(("replay", *key))

    def _emit(self, stream: int, event: Event) -> None:
        s = self._streams.get(stream)
        if s is None:
            return
        s.queue.append(event)
        self._queued += 1

    def _broadcast(self, event: Event) -> None:
        for sid, s in self._streams.items():
            if s.keys or s.queue or self.closed:
                self._emit(sid, event)
