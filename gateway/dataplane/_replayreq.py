"""The ``/v1/stream`` replay requests, parsed and checked: ``replay`` and ``stop_replay``.

Pure functions, no I/O: every refusal is a :class:`~gateway.errors.BadRequest` whose text is
the ``error`` message the client gets (docs/protocol.md lists them all)::

    {"op":"replay","feed":"tracking","fixture":"F1","rate":40,"looped":false,"from":{"seq":1}}
    {"op":"stop_replay","feed":"tracking","fixture":"F1"}

``rate`` is a whole number of frames a second, 1 to 1000 (``bool`` is not a number here);
``looped`` a boolean (default false); ``from`` (default: the first frame) exactly one of
``{"seq": N}``, ``{"phase": P, "mt": MS}`` (tracking match time) or ``{"ut": MS}`` (the
vendor's unix time in ms).
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from gateway.dataplane._fields import check_keys, field_str
from gateway.errors import BadRequest
from gateway.replay import MAX_RATE, MIN_RATE, Start, valid_rate

REPLAY_KEYS: Final = frozenset({"op", "feed", "fixture", "rate", "looped", "from"})
STOP_KEYS: Final = frozenset({"op", "feed", "fixture"})
RATE_ERROR: Final = f"rate must be an integer {MIN_RATE} to {MAX_RATE}"
FROM_ERROR: Final = "from must have exactly one of seq, phase+mt, ut"
_FROM_SHAPES: Final = (frozenset({"seq"}), frozenset({"phase", "mt"}), frozenset({"ut"}))


@attrs.frozen
class ReplayRequest:
    feed: str
    fixture: str
    rate: int
    looped: bool
    start: Start


def _whole(value: object, minimum: int) -> bool:
    # bool is an int subclass: true is not a seq.
    return type(value) is int and value >= minimum


def parse_from(value: object) -> Start:
    """The ``from`` object of a replay request (None or absent: the first frame)."""
    if value is None:
        return Start.first()
    if not isinstance(value, dict) or frozenset(value) not in _FROM_SHAPES:
        raise BadRequest(FROM_ERROR)
    if "seq" in value:
        seq = value["seq"]
        if not _whole(seq, 1):
            raise BadRequest("from.seq must be an integer >= 1")
        return Start.at_seq(seq)
    if "ut" in value:
        ut = value["ut"]
        if not _whole(ut, 0):
            raise BadRequest("from.ut must be an integer >= 0 (unix time in ms)")
        return Start.at_ut(ut)
    phase, mt = value["phase"], value["mt"]
    if not _whole(phase, 0):
        raise BadRequest("from.phase must be an integer >= 0")
    if not _whole(mt, 0):
        raise BadRequest("from.mt must be an integer >= 0 (match time in ms)")
    return Start.at_match_time(phase, mt)


def parse_replay(req: dict[str, Any]) -> ReplayRequest:
    """A ``replay`` op, checked field by field (unknown fields first)."""
    check_keys(req, REPLAY_KEYS)
    feed = field_str(req, "feed")
    fixture = field_str(req, "fixture")
    if "rate" not in req:
        raise BadRequest("missing field 'rate'")
    rate = req["rate"]
    if not valid_rate(rate):
        raise BadRequest(RATE_ERROR)
    looped = req.get("looped", False)
    if type(looped) is not bool:
        raise BadRequest("looped must be true or false")
    return ReplayRequest(feed, fixture, rate, looped, parse_from(req.get("from")))


def parse_stop(req: dict[str, Any]) -> tuple[str, str]:
    """A ``stop_replay`` op: its (feed, fixture)."""
    check_keys(req, STOP_KEYS)
    return field_str(req, "feed"), field_str(req, "fixture")
