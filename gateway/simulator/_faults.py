"""Fault switches and the record of connection attempts.

Both are plain mutable data: tests flip :class:`Faults` fields while the simulator runs and the
connection handlers read them at the moment they matter (before the handshake, at auth, before
every data frame), so a change takes effect on the next such moment of every open connection.
"""

from __future__ import annotations

import enum

import attrs


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

    A tracking connection names its fixture only in its fixture request, after the handshake and
    the auth: for it ``reject_auth`` and ``close_after_auth_code`` of the fixture act when that
    request arrives, and ``handshake_delay`` is read from ``Simulator.connection_faults``.
    """

    drop_after_frames: int | None = None
    drop_probability: float = 0.0
    drop_close_code: int | None = None
    stall: bool = False
    reject_auth: bool = False
    malformed_frames: int = 0
    handshake_delay: float = 0.0
    close_after_auth_code: int | None = None


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
