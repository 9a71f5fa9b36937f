"""One published upstream frame and its lazily built, shared wire encodings."""

from __future__ import annotations

import zlib
from typing import Final

import orjson

from gateway.wire import deflate_frame_header, encode_frame, frame_header

_DATA_KEY: Final = b',"data":'
#: What a full flush ends with (an empty stored block); RFC 7692 7.2.1: left off the wire.
_DEFLATE_TAIL: Final = b"\x00\x00\xff\xff"
#: One raw-deflate compressor for the process. Each message ends with a full flush, which
#: empties its window: every message decodes alone (no context takeover), and no compressor
#: (a few hundred KB of state) is allocated per frame.
_compressor = zlib.compressobj(6, zlib.DEFLATED, -15)


def deflate_message(parts: tuple[bytes, ...]) -> bytes:
    """The permessage-deflate payload of the message *parts* joined (no context takeover)."""
    c = _compressor
    out = [c.compress(part) for part in parts]
    out.append(c.flush(zlib.Z_FULL_FLUSH))
    data = b"".join(out)
    # A full flush always ends with the empty stored block; RFC 7692 drops it on the wire.
    return data[:-4] if data.endswith(_DEFLATE_TAIL) else data


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

    Held as UTF-8 bytes only (:attr:`raw_bytes`); :attr:`raw` decodes on demand (the API's
    ``latest``, inspection). The two WebSocket encodings are built on first use and shared by
    every subscriber of the fan-out (a frame nobody asks for in one form never pays for it):

    - :attr:`envelope_ws`: the multiplexed ``{"type":"frame",...,"seq":S,"data":RAW}`` message;
      ``RAW`` is the upstream text inserted byte for byte, never re-serialised.
    - :attr:`raw_ws`: the upstream text alone, for vendor drop-in subscribers.
    - :attr:`deflate_ws`: the envelope compressed once (permessage-deflate, no context
      takeover, RSV1 set), shared by every subscriber that negotiated compression.

    The topic's history keeps only ``(seq, raw_bytes)``; a backfill or resume gets new Frame
    objects, whose encodings are built for it and freed with it.
    """

    __slots__ = (
        "_deflate_ws",
        "_envelope_ws",
        "_prefix",
        "_raw_ws",
        "position",
        "published",
        "raw_bytes",
        "seq",
    )

    def __init__(
        self,
        seq: int,
        raw: str | bytes,
        published: float,
        prefix: bytes,
        position: int | None = None,
    ) -> None:
        self.seq = seq
        #: The vendor's number for the frame (tracking ``ix``, fastpath ``fixtureSeqNum``) as
        #: the upstream classifier read it; None for a frame the vendor does not number.
        self.position = position
        #: The upstream text, UTF-8 encoded.
        self.raw_bytes = raw.encode() if isinstance(raw, str) else raw
        #: ``time.perf_counter()`` at publish, for the fan-out latency histogram.
        self.published = published
        self._prefix = prefix
        self._envelope_ws: bytes | None = None
        self._raw_ws: bytes | None = None
        self._deflate_ws: bytes | None = None

    @property
    def raw(self) -> str:
        """The upstream text (decoded on each call: not for the hot path)."""
        return self.raw_bytes.decode()

    @property
    def envelope_ws(self) -> bytes:
        ws = self._envelope_ws
        if ws is None:
            ws = self._envelope_ws = self._build_envelope()
        return ws

    @property
    def raw_ws(self) -> bytes:
        ws = self._raw_ws
        if ws is None:
            ws = self._raw_ws = encode_frame(self.raw_bytes)
        return ws

    @property
    def deflate_ws(self) -> bytes:
        ws = self._deflate_ws
        if ws is None:
            ws = self._deflate_ws = self._build_deflate()
        return ws

    def _build_deflate(self) -> bytes:
        payload = deflate_message(
            (self._prefix, str(self.seq).encode(), _DATA_KEY, self.raw_bytes, b"}")
        )
        return deflate_frame_header(len(payload)) + payload

    def _build_envelope(self) -> bytes:
        # One join, header included: the payload is never built as a separate copy.
        prefix = self._prefix
        seq = str(self.seq).encode()
        raw = self.raw_bytes
        size = len(prefix) + len(seq) + len(_DATA_KEY) + len(raw) + 1
        return b"".join((frame_header(size), prefix, seq, _DATA_KEY, raw, b"}"))

    @property
    def sequenced(self) -> bool:
        """True for a frame the vendor numbered (a fastpath event); status packets are not.

        Counted by the fastpath drop-in endpoint's ``startPosition``. Decided by the upstream
        classifier, never re-derived from the text here.
        """
        return self.position is not None
