"""One published upstream frame and its lazily built, shared wire encodings."""

from __future__ import annotations

from typing import Final

import orjson

from gateway.hub._wire import encode_frame

_DATA_KEY: Final = b',"data":'


def envelope_prefix(feed: str, fixture: str) -> bytes:
    """``{"type":"frame","feed":F,"fixture":X,"seq":`` - built once per topic."""
    return (
        b'{"type":"frame","feed":'
        + orjson.dumps(feed)
        + b',"fixture":'
        + orjson.dumps(fixture)
        + b',"seq":'
    )


class Frame:
    """A frame as the hub keeps it: ``seq``, the upstream text and when it was published.

    The two WebSocket encodings are built on first use and then shared by every subscriber (a
    frame nobody asks for in one form never pays for it):

    - :attr:`envelope_ws`: the multiplexed ``{"type":"frame",...,"seq":S,"data":RAW}`` message;
      ``RAW`` is the upstream text inserted byte for byte, never re-serialised.
    - :attr:`raw_ws`: the upstream text alone, for vendor drop-in subscribers.
    """

    __slots__ = (
        "_envelope_ws",
        "_prefix",
        "_raw_bytes",
        "_raw_ws",
        "_sequenced",
        "published",
        "raw",
        "seq",
    )

    def __init__(self, seq: int, raw: str, published: float, prefix: bytes) -> None:
        self.seq = seq
        self.raw = raw
        #: ``time.perf_counter()`` at publish, for the fan-out latency histogram.
        self.published = published
        self._prefix = prefix
        self._raw_bytes: bytes | None = None
        self._envelope_ws: bytes | None = None
        self._raw_ws: bytes | None = None
        self._sequenced: bool | None = None

    @property
    def raw_bytes(self) -> bytes:
        b = self._raw_bytes
        if b is None:
            b = self._raw_bytes = self.raw.encode()
        return b

    @property
    def envelope_ws(self) -> bytes:
        ws = self._envelope_ws
        if ws is None:
            payload = b"".join(
                (self._prefix, str(self.seq).encode(), _DATA_KEY, self.raw_bytes, b"}")
            )
            ws = self._envelope_ws = encode_frame(payload)
        return ws

    @property
    def raw_ws(self) -> bytes:
        ws = self._raw_ws
        if ws is None:
            ws = self._raw_ws = encode_frame(self.raw_bytes)
        return ws

    @property
    def sequenced(self) -> bool:
        """True for a fastpath event (it carries ``fixtureSeqNum``); status packets are not.

        Counted by the fastpath drop-in endpoint's ``startPosition``. Parsed once, on demand.
        """
        s = self._sequenced
        if s is None:
            s = self._sequenced = _has_seqnum(self.raw)
        return s


def _has_seqnum(raw: str) -> bool:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(obj, dict):
        return False
    if "fixtureSeqNum" in obj:
        return True
    action = obj.get("fixtureAction")
    return isinstance(action, dict) and "fixtureSeqNum" in action
