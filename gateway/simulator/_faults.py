"""Fault switches and the record of connection attempts.

Both are plain mutable data: tests flip :class:`Faults` fields while the simulator runs and the
connection handlers read them at the moment they matter (before the handshake, at auth, before
every data frame), so a change takes effect on the next such moment of every open connection.
"""

from __future__ import annotations

import enum
import math
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    _Attr = attrs.Attribute[Any]  # validators only read .name (not subscriptable at runtime)


def _count(inst: object, attribute: _Attr, value: int) -> None:
    if type(value) is not int or value < 0:
        raise ValueError(f"{attribute.name} must be an integer >= 0, got {value!r}")


def _optional_count(inst: object, attribute: _Attr, value: int | None) -> None:
    if value is not None:
        _count(inst, attribute, value)


def _probability(inst: object, attribute: _Attr, value: float) -> None:
    if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be a number in 0..1, got {value!r}")


def _seconds(inst: object, attribute: _Attr, value: float) -> None:
    if not isinstance(value, int | float) or not (0.0 <= value < math.inf):
        raise ValueError(f"{attribute.name} must be a finite number >= 0, got {value!r}")


def _close_code(inst: object, attribute: _Attr, value: int | None) -> None:
    # 1004-1006 and 1015 are reserved: they must never appear in a close frame (RFC 6455 7.4).
    if value is None:
        return
    if (
        type(value) is not int
        or not (1000 <= value <= 1014 or 3000 <= value <= 4999)
        or (value in (1004, 1005, 1006))
    ):
        raise ValueError(
            f"{attribute.name} must be None or a sendable close code "
            f"(1000-1003, 1007-1014, 3000-4999), got {value!r}"
        )


@attrs.define
class Faults:
    """What to break on the connections of one fixture.

    ``drop_after_frames``: drop every connection once it has sent this many data frames.
    ``drop_probability``: per data frame, the chance that the connection is dropped instead.
    ``drop_close_code``: how drops happen: None closes the TCP socket without a WebSocket close
    frame (what a crashed vendor or a cut network looks like); a number sends that close code.
    ``stall``: while True nothing at all is sent (heartbeats included); the socket stays open.
    ``reject_auth``: every token is treated as wrong.
    ``malformed_frames``: this many non-JSON text frames are sent, one before each of the next
    data frames (the counter is shared by the fixture's connections and counts down).
    ``handshake_delay``: seconds to wait before accepting the WebSocket handshake.
    ``close_after_auth_code``: close with this code right after a successful auth (a vendor
    restart).

    Fields are checked when set (ValueError), so a typo in a test fails at once.

    A tracking connection names its fixture only in its fixture request, after the handshake and
    the auth: for it ``reject_auth`` and ``close_after_auth_code`` of the fixture act when that
    request arrives, and ``handshake_delay`` is read from ``Simulator.connection_faults``.
    """

    drop_after_frames: int | None = attrs.field(default=None, validator=_optional_count)
    drop_probability: float = attrs.field(default=0.0, validator=_probability)
    drop_close_code: int | None = attrs.field(default=None, validator=_close_code)
    stall: bool = False
    reject_auth: bool = False
    malformed_frames: int = attrs.field(default=0, validator=_count)
    handshake_delay: float = attrs.field(default=0.0, validator=_seconds)
    close_after_auth_code: int | None = attrs.field(default=None, validator=_close_code)


FAULT_NAMES: tuple[str, ...] = tuple(a.name for a in attrs.fields(Faults))


class Outcome(enum.StrEnum):
    """How far one connection attempt got (updated as it progresses; the last value stays)."""

    PENDING = "pending"  # TCP accepted, WebSocket request not answered yet
    NOT_ACCEPTABLE = "not_acceptable"  # fastpath handshake rejected: HTTP 406
    NOT_FOUND = "not_found"  # fastpath handshake rejected: HTTP 404
    BAD_REQUEST = "bad_request"  # fastpath handshake rejected: HTTP 400 (bad startPosition)
    ACCEPTED = "accepted"  # WebSocket open, waiting for the auth message
    BAD_AUTH_FORMAT = "bad_auth_format"  # first message was not a valid auth message
    UNAUTHORIZED = "unauthorized"  # wrong token (or the reject_auth fault)
    AUTHORIZED = "authorized"  # token accepted (tracking: no fixture requested yet)
    UNKNOWN_FIXTURE = "unknown_fixture"  # tracking: WARN sent for an unknown fixture
    CLOSED_AFTER_AUTH = "closed_after_auth"  # the close_after_auth_code fault closed it
    STREAMING = "streaming"  # data is being sent for fixture_id
    DROPPED = "dropped"  # a drop fault ended it


@attrs.define
class Attempt:
    """One WebSocket connection attempt. ``at`` is ``trio.current_time()`` when TCP was accepted."""

    at: float
    path: str
    fixture_id: str | None
    outcome: Outcome = Outcome.PENDING
