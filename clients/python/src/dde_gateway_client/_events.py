"""What the application sees: one event class per kind, each with the JSON line of the spec.

``event.to_json()`` is the line ``dde-gateway watch --events`` prints (keys exactly as
docs/clients.md lists them); a frame's ``data`` goes out verbatim, as the gateway sent it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

ConnectionState = Literal["disconnected", "connecting", "connected", "closed"]
LossReason = Literal["not_recovered", "epoch_changed", "slow_consumer", "sequence_gap"]


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _with_data(head: dict[str, Any], text: str) -> str:
    """*head* as JSON with ``"data": text`` (already JSON, verbatim) as its last key."""
    return _dumps(head)[:-1] + ',"data":' + text + "}"


@dataclass(frozen=True, slots=True)
class StateChanged:
    """The connection's state changed (``url``: the gateway it concerns; ``reason``: why)."""

    kind: ClassVar[str] = "state"
    state: ConnectionState
    url: str
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.kind, "state": self.state, "url": self.url, "reason": self.reason}

    def to_json(self) -> str:
        return _dumps(self.to_dict())


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The gateway accepted a (re)subscription. ``resumed``: sent with ``after`` + ``epoch``;
    ``recovered``: the gateway's answer (on a resume, true means nothing was missed)."""

    kind: ClassVar[str] = "subscribed"
    feed: str
    fixture: str
    epoch: str
    seq: int
    recovered: bool
    resumed: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.kind,
            "feed": self.feed,
            "fixture": self.fixture,
            "epoch": self.epoch,
            "seq": self.seq,
            "recovered": self.recovered,
            "resumed": self.resumed,
        }

    def to_json(self) -> str:
        return _dumps(self.to_dict())


@dataclass(frozen=True, slots=True)
class Frame:
    """One upstream frame: ``text`` is its JSON exactly as the vendor sent it, ``data`` that
    text parsed (on first use)."""

    kind: ClassVar[str] = "frame"
    feed: str
    fixture: str
    epoch: str
    seq: int
    text: str
    _parsed: list[Any] = field(default_factory=list, repr=False, compare=False)

    @property
    def data(self) -> Any:
        if not self._parsed:
            self._parsed.append(json.loads(self.text))
        return self._parsed[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.kind,
            "feed": self.feed,
            "fixture": self.fixture,
            "epoch": self.epoch,
            "seq": self.seq,
            "data": self.data,
        }

    def to_json(self) -> str:
        head = {
            "event": self.kind,
            "feed": self.feed,
            "fixture": self.fixture,
            "epoch": self.epoch,
            "seq": self.seq,
        }
        return _with_data(head, self.text)


@dataclass(frozen=True, slots=True)
class Loss:
    """Frames ``from_seq..to_seq`` (``to_seq`` None: up to an unknown seq) were not delivered
    and will not be: always before the next frame of that subscription."""

    kind: ClassVar[str] = "loss"
    feed: str
    fixture: str
    from_seq: int
    to_seq: int | None
    epoch_before: str
    epoch_after: str
    reason: LossReason

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.kind,
            "feed": self.feed,
            "fixture": self.fixture,
            "from_seq": self.from_seq,
            "to_seq": self.to_seq,
            "epoch_before": self.epoch_before,
            "epoch_after": self.epoch_after,
            "reason": self.reason,
        }

    def to_json(self) -> str:
        return _dumps(self.to_dict())


@dataclass(frozen=True, slots=True)
class Status:
    """The fixture's upstream state, as the gateway reports it (``stopped`` ends it)."""

    kind: ClassVar[str] = "status"
    feed: str
    fixture: str
    state: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.kind,
            "feed": self.feed,
            "fixture": self.fixture,
            "state": self.state,
            "detail": self.detail,
        }

    def to_json(self) -> str:
        return _dumps(self.to_dict())


@dataclass(frozen=True, slots=True)
class Error:
    """An error: the gateway's text verbatim (``request``: what it answered), or the client's
    own (a refused token: ``fatal``, the client is closed)."""

    kind: ClassVar[str] = "error"
    message: str
    request: str = ""
    feed: str | None = None
    fixture: str | None = None
    fatal: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.kind,
            "message": self.message,
            "request": self.request,
            "feed": self.feed,
            "fixture": self.fixture,
            "fatal": self.fatal,
        }

    def to_json(self) -> str:
        return _dumps(self.to_dict())


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    """The subscription ended (``reason``: ``unsubscribe``, ``stopped``, an error's text,
    ``closed``); nothing more comes for it."""

    kind: ClassVar[str] = "unsubscribed"
    feed: str
    fixture: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.kind,
            "feed": self.feed,
            "fixture": self.fixture,
            "reason": self.reason,
        }

    def to_json(self) -> str:
        return _dumps(self.to_dict())


@dataclass(frozen=True, slots=True)
class ReplayStarted:
    kind: ClassVar[str] = "replay_started"
    feed: str
    fixture: str
    epoch: str
    from_seq: int
    rate: int
    looped: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.kind,
            "feed": self.feed,
            "fixture": self.fixture,
            "epoch": self.epoch,
            "from_seq": self.from_seq,
            "rate": self.rate,
            "looped": self.looped,
        }

    def to_json(self) -> str:
        return _dumps(self.to_dict())


@dataclass(frozen=True, slots=True)
class ReplayFrame:
    """A replayed frame (never a live one): ``text`` verbatim, ``data`` parsed."""

    kind: ClassVar[str] = "replay_frame"
    feed: str
    fixture: str
    seq: int
    text: str

    @property
    def data(self) -> Any:
        return json.loads(self.text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.kind,
            "feed": self.feed,
            "fixture": self.fixture,
            "seq": self.seq,
            "data": self.data,
        }

    def to_json(self) -> str:
        head = {"event": self.kind, "feed": self.feed, "fixture": self.fixture, "seq": self.seq}
        return _with_data(head, self.text)


@dataclass(frozen=True, slots=True)
class ReplayLoop:
    kind: ClassVar[str] = "replay_loop"
    feed: str
    fixture: str
    pass_: int

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.kind, "feed": self.feed, "fixture": self.fixture, "pass": self.pass_}

    def to_json(self) -> str:
        return _dumps(self.to_dict())


@dataclass(frozen=True, slots=True)
class ReplayEnd:
    """The replay ended: ``end``, ``stopped``, ``slow_consumer``, ``source_lost`` (the
    gateway's reasons) or ``disconnected`` (the connection was lost: replays do not resume)."""

    kind: ClassVar[str] = "replay_end"
    feed: str
    fixture: str
    reason: str
    last_seq: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.kind,
            "feed": self.feed,
            "fixture": self.fixture,
            "reason": self.reason,
            "last_seq": self.last_seq,
        }

    def to_json(self) -> str:
        return _dumps(self.to_dict())


Event = (
    StateChanged
    | Subscribed
    | Frame
    | Loss
    | Status
    | Error
    | Unsubscribed
    | ReplayStarted
    | ReplayFrame
    | ReplayLoop
    | ReplayEnd
)
