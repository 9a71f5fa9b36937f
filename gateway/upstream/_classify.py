"""Classify one upstream text message: parsed once, never re-serialised.

The vendor mixes data frames, informational messages, heartbeats and several error shapes on the
same socket (see ``docs/vendor-protocol.md``). This module turns one raw message into a
:class:`Message` saying what it is and the one number the gateway needs from it (tracking ``ix``
or fastpath ``fixtureSeqNum``). Nothing here raises on bad input: anything unrecognised is
:attr:`Kind.MALFORMED` and the caller counts and skips it.

Parsing is the gateway's biggest per-frame cost, so it uses simdjson (about 4x faster than
orjson on a 3 KB tracking frame, which is mostly floats). simdjson still validates the whole
document, so invalid JSON is never forwarded: subscribers receive the raw text embedded in the
multiplexed envelope. What counts as valid JSON stays orjson's: any document simdjson refuses
(it also refuses integers beyond 64 bits, which orjson reads as floats) is handed to orjson, and
a leading byte-order mark, which simdjson skips but orjson and the envelope do not allow, goes
the orjson way too. The one remaining difference: in an object with a duplicated key, simdjson
reads the first occurrence where orjson reads the last (RFC 8259 leaves this undefined).

One module-level :class:`simdjson.Parser` serves every runner. Its documents are invalidated by
the next parse, so nothing here keeps a simdjson proxy beyond the call that made it: the hot
path reads one number, every rarer shape is copied into plain ``dict`` first. Classification is
synchronous, so two runners can never interleave on the parser.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Mapping
from typing import Any, Final

import attrs
import orjson
import simdjson

ACCEPTED_TEXT: Final = "Authorisation accepted"
HEARTBEAT_PREFIX: Final = "Heartbeat sent at"
NOT_FOUND_PREFIX: Final = "Could not find fixture"
STATE_PACKET_TYPE: Final = "ConnectionStateChanged"
# Words that mark a free-text or errorMessage reply as an authentication failure.
_AUTH_WORDS: Final = ("token", "authenticat", "authoris", "authoriz", "unauthor")
# Longest vendor text a Message carries: bounded (a hostile upstream may send megabytes), yet
# long enough that the runner scrubs our token out of everything it will show (it keeps the
# first 200 characters, after scrubbing: a token cut at this bound is never among them).
_MAX_TEXT: Final = 64 * 1024
# First character of a byte-order mark, as text and as UTF-8 (no valid JSON starts with 0xEF).
_BOM_STARTS: Final[frozenset[str | bytes]] = frozenset({"\ufeff", b"\xef"})

_PARSER: Final = simdjson.Parser()


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
    text: str = ""  # vendor text for INFO/ERROR kinds, bounded; may echo our token: scrub it
    status: int | None = None  # HTTP-like status of ``{"error":..,"status":..}`` replies
    # DATA: when the vendor says it sent the frame (UNIX seconds): tracking ``ut``, fastpath
    # ``timestamp``; None when the frame carries none we can read.
    sent_at: float | None = None


_MALFORMED: Final = Message(Kind.MALFORMED)
_HEARTBEAT: Final = Message(Kind.HEARTBEAT)


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
            return _HEARTBEAT
        if level == "INFO" and message == ACCEPTED_TEXT:
            return Message(Kind.ACCEPTED, text=message)
        if message.startswith(NOT_FOUND_PREFIX):
            return Message(Kind.NOT_FOUND, text=_short(message))
        if level == "ERROR":
            kind = Kind.AUTH_ERROR if _mentions_auth(message) else Kind.ERROR
            return Message(kind, text=_short(message))
        return Message(Kind.INFO, text=_short(message))
    return None


def _slow_parse(raw: str | bytes) -> dict[str, Any] | Message:
    """orjson decides what simdjson refused (or would wrongly accept)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # Sister endpoints answer a bad token with plain text ("The supplied authentication is
        # invalid"); anything else that is not JSON is garbage.
        if isinstance(raw, str) and _mentions_auth(raw):
            return Message(Kind.AUTH_ERROR, text=_short(raw))
        return _MALFORMED
    if not isinstance(obj, dict):
        return _MALFORMED
    return obj


def _parse(raw: str | bytes) -> Mapping[str, Any] | Message:
    """The message as a mapping (a simdjson proxy: use it before the next parse), or a verdict."""
    if raw[:1] in _BOM_STARTS:
        return _slow_parse(raw)
    try:
        doc = _PARSER.parse(raw)
    except (ValueError, RuntimeError):
        # Invalid JSON (ValueError, UnicodeError), or something simdjson cannot represent but
        # orjson can (RuntimeError: a big integer, or a proxy that outlived its parse).
        return _slow_parse(raw)
    if isinstance(doc, simdjson.Object):
        return doc
    return _MALFORMED  # valid JSON, but not an object


def _plain(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A plain copy, for the rare shapes that are read more than once or shown to people."""
    return obj.as_dict() if isinstance(obj, simdjson.Object) else dict(obj)


def _tracking(obj: Mapping[str, Any]) -> Message:
    ix = obj.get("ix")
    if type(ix) is int:
        ut = obj.get("ut")  # ms since the epoch; one more lookup in the parsed document
        return Message(Kind.DATA, seq=ix, sent_at=ut / 1000 if type(ut) is int else None)
    common = _common(_plain(obj))
    return common if common is not None else _MALFORMED


def classify_tracking(raw: str | bytes) -> Message:
    """A tracking-feed message. Data frames are objects with an integer ``ix``."""
    obj = _parse(raw)
    return obj if isinstance(obj, Message) else _tracking(obj)


def _fastpath_action(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The object carrying ``fixtureSeqNum``: the message itself or one level down
    (``fixtureAction`` and siblings); None when there is none."""
    if "fixtureSeqNum" in obj:
        return obj
    # simdjson's values() yields plain dicts and lists (converted one value at a time, and the
    # vendor puts fixtureAction first), so one isinstance check covers both parsers.
    for value in obj.values():
        if isinstance(value, dict) and "fixtureSeqNum" in value:
            return value
    return None


def _iso_time(value: object) -> float | None:
    """An ISO 8601 time with its offset (``2026-05-06T19:05:08.376151Z``) as UNIX seconds;
    None for anything else (no offset: the vendor's zone would be a guess)."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    return None if parsed.tzinfo is None else parsed.timestamp()


def _fastpath(obj: Mapping[str, Any]) -> Message:
    action = _fastpath_action(obj)
    seq = action["fixtureSeqNum"] if action is not None else None
    if seq is not None:
        if type(seq) is not int:
            return _MALFORMED
        assert action is not None
        return Message(Kind.DATA, seq=seq, sent_at=_iso_time(action.get("timestamp")))
    plain = _plain(obj)
    if isinstance(plain.get("eventElementType"), str):
        return Message(Kind.UNSEQUENCED, text=_short(plain.get("state", plain["eventElementType"])))
    common = _common(plain)
    return common if common is not None else _MALFORMED


def classify_fastpath(raw: str | bytes) -> Message:
    """A fastpath-feed message. Data carries ``fixtureSeqNum``; status packets carry none."""
    obj = _parse(raw)
    return obj if isinstance(obj, Message) else _fastpath(obj)


def classify_reference(raw: str | bytes, *, fastpath: bool) -> Message:
    """The same rules over orjson alone: the reference the simdjson fast path must agree with.

    Slower (about 4x on a tracking frame); for differential tests and for checking a doubtful
    frame by hand.
    """
    obj = _slow_parse(raw)
    if isinstance(obj, Message):
        return obj
    return _fastpath(obj) if fastpath else _tracking(obj)


def parser_reusable() -> bool:
    """True when the shared simdjson parser holds no live document.

    simdjson refuses to parse while a proxy of its last document is alive; a proxy leaked out of
    classification would silently send every later message down the slow path.
    """
    try:
        doc = _PARSER.parse(b"{}")
    except RuntimeError:
        return False
    del doc
    return True
