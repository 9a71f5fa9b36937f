"""The vendor's protocol texts, encoded once (compact JSON, as the vendor sends them)."""

from __future__ import annotations

import datetime
from typing import Final

import orjson

AUTH_ACCEPTED: Final = orjson.dumps({"message": "Authorisation accepted", "level": "INFO"}).decode()
AUTH_BAD_FORMAT: Final = orjson.dumps(
    {"message": "Authentication message had incorrect format", "level": "ERROR"}
).decode()
AUTH_REJECTED: Final = orjson.dumps(
    {"errorMessage": "Supplied token could not be authenticated"}
).decode()
REQUEST_BAD_FORMAT: Final = orjson.dumps(
    {"message": "Fixture request had incorrect format", "level": "ERROR"}
).decode()
BAD_BACKFILL: Final = orjson.dumps(
    {"message": "Backfill must be null or an integer >= -1", "level": "ERROR"}
).decode()
BAD_REPLAY: Final = orjson.dumps(
    {
        "message": "Replay needs enabled (boolean), packetsPerSecond (1..1000), looped (boolean)",
        "level": "ERROR",
    }
).decode()
MALFORMED_FRAME: Final = "<<simulated malformed frame: not JSON>>"


def unknown_fixture(fixture_id: str) -> str:
    return orjson.dumps(
        {
            "message": f"Could not find fixture topic soccer.tracking.enrichment.{fixture_id}",
            "level": "WARN",
        }
    ).decode()


def http_error(reason: str, status: int) -> bytes:
    """The body of a rejected handshake (the vendor's REST error shape)."""
    return orjson.dumps({"error": reason, "status": status})


def utc_stamp(now: datetime.datetime | None = None, *, micro: bool = False) -> str:
    """``2023-05-01T00:03:11.822Z`` (or microseconds with ``micro``), UTC."""
    now = now or datetime.datetime.now(datetime.UTC)
    frac = f"{now.microsecond:06d}" if micro else f"{now.microsecond // 1000:03d}"
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + frac + "Z"


def heartbeat() -> str:
    """A heartbeat stamped with the real UTC time, millisecond precision."""
    return orjson.dumps({"message": f"Heartbeat sent at {utc_stamp()}", "level": "INFO"}).decode()


def connection_state(state: str) -> str:
    return orjson.dumps(
        {"timestamp": utc_stamp(), "eventElementType": "ConnectionStateChanged", "state": state}
    ).decode()
