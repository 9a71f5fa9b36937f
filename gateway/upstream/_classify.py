"""Classify one upstream text message: parsed once with orjson, never re-serialised.

The vendor mixes data frames, informational messages, heartbeats and several error shapes on the
same socket (see ``/work/shared/dde-protocol.md``). This module turns one raw message into a
:class:`Message` saying what it is and the one number the gateway needs from it (tracking ``ix``
or fastpath ``fixtureSeqNum``). Nothing here raises on bad input: anything unrecognised is
:attr:`Kind.MALFORMED` and the caller counts and skips it.
"""

from __future__ import annotations

import enum
from typing import Any, Final

import attrs
import orjson

ACCEPTED_TEXT: Final = "Authorisation accepted"
HEARTBEAT_PREFIX: Final = "Heartbeat sent at"
NOT_FOUND_PREFIX: Final = "Could not find fixture"
STATE_PACKET_TYPE: Final = "ConnectionStateChanged"
# Words that mark a free-text or errorMessage reply as an authentication failure.
_AUTH_WORDS: Final = ("token", "authenticat", "authoris", "authoriz", "unauthor")
# Longest vendor text copied into a status detail; vendor texts never hold our token.
_MAX_TEXT: Final = 200


class Kind(enum.Enum):
    DATA = "data"  # a sequenced data frame (tracking ix / fastpath fixtureSeqNum)
    UNSEQUENCED = "unsequenced"  # fastpath packet without a seq (ConnectionStateChanged, ...)
    ACCEPTED = "accepted"  # tracking: "Authorisation accepted"
    HEARTBEAT = "heartbeat"
    INFO = "info"  # any other INFO/WARN message: logged, otherwise ignored
    NOT_FOUND = "not_found"  # "Could not find fixture topic ..."
    AUTH_ERROR = "auth_error"  # the token was refused or the auth message was not understood
    ERROR = "error"  # another error reported by the vendor
    MALFORMED = "malformed"  # not JSON, not an object, or no shape we know


@attrs.frozen
class Message:
    kind: Kind
    seq: int | None = None  # ix (tracking) or fixtureSeqNum (fastpath) for DATA
    text: str = ""  # vendor text for INFO/ERROR kinds, shortened; never holds our token
    status: int | None = None  # HTTP-like status of ``{"error":..,"status":..}`` replies


def _short(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "..."


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is an int subclass and never a sequence number


def _mentions_auth(text: str) -> bool:
    low = text.lower()
    return any(word in low for word in _AUTH_WORDS)


def _common(obj: dict[str, Any]) -> Message | None:
    """Shapes shared by both feed kinds: vendor messages and error replies."""
    if "errorMessage" in obj:
        text = _short(obj["errorMessage"])
        return Message(Kind.AUTH_ERROR if _mentions_auth(text) else Kind.ERROR, text=text)
    if "error" in obj and "status" in obj:
        status = obj["status"] if _is_int(obj["status"]) else None
        text = _short(obj["error"])
        if status in (401, 403):
            return Message(Kind.AUTH_ERROR, text=text, status=status)
        if status == 404:
            return Message(Kind.NOT_FOUND, text=text, status=status)
        return Message(Kind.ERROR, text=text, status=status)
    message, level = obj.get("message"), obj.get("level")
    if isinstance(message, str) and isinstance(level, str):
        level = level.upper()
        if level == "INFO" and message.startswith(HEARTBEAT_PREFIX):
            return Message(Kind.HEARTBEAT)
        if level == "INFO" and message == ACCEPTED_TEXT:
            return Message(Kind.ACCEPTED, text=message)
        if message.startswith(NOT_FOUND_PREFIX):
            return Message(Kind.NOT_FOUND, text=_short(message))
        if level == "ERROR":
            kind = Kind.AUTH_ERROR if _mentions_auth(message) else Kind.ERROR
            return Message(kind, text=_short(message))
        return Message(Kind.INFO, text=_short(message))
    return None


def _parse(raw: str | bytes) -> dict[str, Any] | Message:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # Sister endpoints answer a bad token with plain text ("The supplied authentication is
        # invalid"); anything else that is not JSON is garbage.
        if isinstance(raw, str) and _mentions_auth(raw):
            return Message(Kind.AUTH_ERROR, text=_short(raw))
        return Message(Kind.MALFORMED)
    if not isinstance(obj, dict):
        return Message(Kind.MALFORMED)
    return obj


def classify_tracking(raw: str | bytes) -> Message:
    """A tracking-feed message. Data frames are objects with an integer ``ix``."""
    obj = _parse(raw)
    if isinstance(obj, Message):
        return obj
    ix = obj.get("ix")
    if _is_int(ix):
        return Message(Kind.DATA, seq=ix)
    common = _common(obj)
    return common if common is not None else Message(Kind.MALFORMED)


def _fastpath_seq(obj: dict[str, Any]) -> object:
    """``fixtureSeqNum`` at the top level or one level down (``fixtureAction`` and siblings)."""
    if "fixtureSeqNum" in obj:
        return obj["fixtureSeqNum"]
    for value in obj.values():
        if isinstance(value, dict) and "fixtureSeqNum" in value:
            return value["fixtureSeqNum"]
    return None


def classify_fastpath(raw: str | bytes) -> Message:
    """A fastpath-feed message. Data carries ``fixtureSeqNum``; status packets carry none."""
    obj = _parse(raw)
    if isinstance(obj, Message):
        return obj
    seq = _fastpath_seq(obj)
    if seq is not None:
        return Message(Kind.DATA, seq=seq) if type(seq) is int else Message(Kind.MALFORMED)
    if isinstance(obj.get("eventElementType"), str):
        return Message(Kind.UNSEQUENCED, text=_short(obj.get("state", obj["eventElementType"])))
    common = _common(obj)
    return common if common is not None else Message(Kind.MALFORMED)
