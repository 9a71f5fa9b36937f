"""Every control message the data plane writes, as JSON payload bytes (orjson).

Control messages are rare and per subscriber, so they are built on demand; data frames are
built once per frame by the hub (:class:`gateway.hub.Frame`).
"""

from __future__ import annotations

import datetime
from typing import Final

import orjson

from gateway.replay import MAX_RATE, MIN_RATE

#: How much of a bad request is echoed back in an ``error`` message.
ERROR_REQUEST_MAX: Final = 256
#: Longest ``message`` of an ``error`` (the ids and values in it are cut much shorter).
ERROR_MESSAGE_MAX: Final = 512
#: Characters of a client-chosen value (feed, fixture id) quoted in a message.
VALUE_MAX: Final = 64

VENDOR_AUTH_ACCEPTED: Final = b'{"message":"Authorisation accepted","level":"INFO"}'
VENDOR_AUTH_BAD_FORMAT: Final = (
    b'{"message":"Authentication message had incorrect format","level":"ERROR"}'
)
VENDOR_AUTH_REJECTED: Final = b'{"errorMessage":"Supplied token could not be authenticated"}'
VENDOR_REQUEST_BAD_FORMAT: Final = (
    b'{"message":"Fixture request message had incorrect format","level":"ERROR"}'
)
VENDOR_FIXTURE_NOT_FOUND: Final = b'{"error":"fixture not found","status":404}'


def _vendor_error(message: str) -> bytes:
    return orjson.dumps({"message": message, "level": "ERROR"})


#: The drop-in's answers to a bad ``replay`` object, each naming the field (vendor style).
VENDOR_REPLAY_BAD_SHAPE: Final = _vendor_error(
    "Replay must be an object with only enabled, packetsPerSecond and looped"
)
VENDOR_REPLAY_BAD_ENABLED: Final = _vendor_error("Replay enabled must be a boolean")
VENDOR_REPLAY_BAD_RATE: Final = _vendor_error(
    f"Replay packetsPerSecond must be an integer from {MIN_RATE} to {MAX_RATE}"
)
VENDOR_REPLAY_BAD_LOOPED: Final = _vendor_error("Replay looped must be a boolean")


def vendor_replay_unavailable(reason: str) -> bytes:
    """A replay the gateway can neither serve nor pass through (*reason*: for the client)."""
    return _vendor_error(f"Replay not available: {clip(reason, ERROR_MESSAGE_MAX)}")


def clip(value: str, limit: int = VALUE_MAX) -> str:
    """*value* cut after *limit* characters (``...`` marks the cut): a client's id or value
    quoted back must not make the reply as long as the request."""
    return value if len(value) <= limit else value[:limit] + "..."


def utc_now_iso() -> str:
    """``2023-05-01T00:03:11.822Z``: UTC, millisecond precision, ``Z`` suffix (vendor style)."""
    now = datetime.datetime.now(datetime.UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def subscribed(feed: str, fixture: str, seq: int, epoch: str, recovered: bool) -> bytes:
    return orjson.dumps(
        {
            "type": "subscribed",
            "feed": feed,
            "fixture": fixture,
            "seq": seq,
            "epoch": epoch,
            "recovered": recovered,
        }
    )


def status(feed: str, fixture: str, state: str, detail: str) -> bytes:
    return orjson.dumps(
        {"type": "status", "feed": feed, "fixture": fixture, "state": state, "detail": detail}
    )


def gap(feed: str, fixture: str, from_seq: int, to_seq: int) -> bytes:
    return orjson.dumps(
        {
            "type": "gap",
            "feed": feed,
            "fixture": fixture,
            "from_seq": from_seq,
            "to_seq": to_seq,
            "reason": "slow_consumer",
        }
    )


def replay_started(
    feed: str, fixture: str, *, epoch: str, from_seq: int, rate: int, looped: bool
) -> bytes:
    return orjson.dumps(
        {
            "type": "replay_started",
            "feed": feed,
            "fixture": fixture,
            "epoch": epoch,
            "from_seq": from_seq,
            "rate": rate,
            "looped": looped,
        }
    )


def replay_frame_prefix(feed: str, fixture: str) -> bytes:
    """``{"type":"replay_frame","feed":F,"fixture":X,"seq":`` - built once per replay; never
    the live ``frame`` type, so no consumer can take a replayed frame for a live one."""
    return (
        b'{"type":"replay_frame","feed":'
        + orjson.dumps(feed)
        + b',"fixture":'
        + orjson.dumps(fixture)
        + b',"seq":'
    )


def replay_frame(prefix: bytes, seq: int, raw: bytes) -> bytes:
    """One replayed frame: the upstream text *raw* inserted verbatim, as in ``frame``."""
    return b"".join((prefix, b"%d" % seq, b',"data":', raw, b"}"))


def replay_loop(feed: str, fixture: str, pass_number: int) -> bytes:
    return orjson.dumps(
        {"type": "replay_loop", "feed": feed, "fixture": fixture, "pass": pass_number}
    )


def replay_end(feed: str, fixture: str, reason: str, last_seq: int) -> bytes:
    return orjson.dumps(
        {
            "type": "replay_end",
            "feed": feed,
            "fixture": fixture,
            "reason": reason,
            "last_seq": last_seq,
        }
    )


def error(message: str, request: str) -> bytes:
    message = clip(message, ERROR_MESSAGE_MAX)
    request = clip(request, ERROR_REQUEST_MAX)
    return orjson.dumps({"type": "error", "message": message, "request": request})


def heartbeat() -> bytes:
    return orjson.dumps({"type": "heartbeat", "time": utc_now_iso()})


def vendor_heartbeat() -> bytes:
    return orjson.dumps({"message": f"Heartbeat sent at {utc_now_iso()}", "level": "INFO"})


def vendor_unknown_fixture(fixture: str) -> bytes:
    topic = f"soccer.tracking.enrichment.{clip(fixture, 128)}"
    return orjson.dumps(
        {
            "message": f"Could not find fixture topic {topic}",
            "level": "WARN",
        }
    )


def vendor_connection_state(state: str) -> bytes:
    return orjson.dumps(
        {"timestamp": utc_now_iso(), "eventElementType": "ConnectionStateChanged", "state": state}
    )
