"""The WebSocket wire format (RFC 6455), done by hand where it is on the hot path; close codes.

A leaf module: it imports nothing of the gateway, and every package that writes or reads
WebSocket frames by hand (the data plane, the lean upstream client, the benchmark's feeder and
load generator) uses it, so they cannot disagree on the format. Each close code the gateway,
its simulator or its tests speak is named here once.

Encoding: a server frame is never masked, so the bytes of one message are the same for every
subscriber: the hub builds them once and every subscriber's queue shares the same ``bytes``.
The header is 2, 4 or 10 bytes (payload length < 126, < 65536, or larger). Payloads go out as
they are, except to subscribers that negotiated permessage-deflate (``[subscribers] compression``):
their data frames carry a payload compressed once per frame and the RSV1 bit
(:func:`deflate_frame_header`). Clients must mask (:func:`mask_frame`).

Decoding: :func:`read_header` parses one frame header from a receive buffer; each reader
decides what it accepts (the upstream client refuses masked frames, the benchmark's server
expects them) and where the payload goes.

Example::

    >>> encode_frame(b"hi")
    b'\\x81\\x02hi'
    >>> read_header(encode_frame(b"hi"), 0)
    (129, 0, 2, 2)
"""

from __future__ import annotations

import os
import struct
from typing import Final

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

#: FIN bit of a frame's first byte: the last frame of a message.
FIN: Final = 0x80
#: RSV1-3 bits of the first byte: set only by a negotiated extension.
RSV_BITS: Final = 0x70
#: RSV1: the message is compressed (permessage-deflate, RFC 7692), set on its first frame.
RSV1: Final = 0x40
#: MASK bit of the second byte: set on every client frame, never on a server frame.
MASK_BIT: Final = 0x80
#: Longest payload of a control frame (close, ping, pong).
MAX_CONTROL_PAYLOAD: Final = 125
#: Longest close reason: the control payload less the 2-byte code.
MAX_CLOSE_REASON_BYTES: Final = MAX_CONTROL_PAYLOAD - 2

# -- close codes (RFC 6455 7.4.1, plus the gateway's own in the 4000 range) -----------------
CLOSE_NORMAL: Final = 1000
#: Server shutting down (drain), or the fixture a connection was for stopped being followed.
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
#: Never sent: what a close frame without a code reports.
CLOSE_NO_STATUS: Final = 1005
#: Never sent: the connection ended without a close frame.
CLOSE_ABNORMAL: Final = 1006
CLOSE_INVALID_DATA: Final = 1007
#: Authentication refused or missing (the vendor's and the drop-in endpoint's); a subscriber
#: sending frames faster than its limit.
CLOSE_POLICY_VIOLATION: Final = 1008
#: A message larger than the receiver accepts.
CLOSE_TOO_BIG: Final = 1009
#: The server hit an unexpected condition; the data plane sends it when a ping gets no pong.
CLOSE_INTERNAL_ERROR: Final = 1011
#: The gateway's own: a subscriber's queue passed its byte budget (too slow to keep up).
CLOSE_TOO_SLOW: Final = 4008
#: The gateway's own: an operator disconnected this subscriber (``DELETE /v1/subscribers/{id}``);
#: the close reason is the operator's, after :data:`DISCONNECTED_REASON_PREFIX`.
CLOSE_DISCONNECTED: Final = 4009
DISCONNECTED_REASON_PREFIX: Final = "disconnected by an operator"
#: The reason sent with :data:`CLOSE_GOING_AWAY` by a drain: resume on another instance.
DRAIN_REASON: Final = "going away: draining, resume on another instance"

_LEN16: Final = struct.Struct("!BBH")
_LEN64: Final = struct.Struct("!BBQ")
_U16: Final = struct.Struct("!H")
_U64: Final = struct.Struct("!Q")
_CODE: Final = struct.Struct("!H")
# Headers of short text frames are looked up, not built: most control messages are short.
_SHORT_TEXT: Final = tuple(bytes((FIN | OP_TEXT, n)) for n in range(126))


def frame_header(length: int, opcode: int = OP_TEXT) -> bytes:
    """The header of one final (FIN set), unmasked frame carrying *length* payload bytes."""
    if length < 126:
        if opcode == OP_TEXT:
            return _SHORT_TEXT[length]
        return bytes((FIN | opcode, length))
    if length < 65536:
        return _LEN16.pack(FIN | opcode, 126, length)
    return _LEN64.pack(FIN | opcode, 127, length)


def deflate_frame_header(length: int) -> bytes:
    """The header of one final, unmasked text frame whose *length* payload bytes are
    compressed with permessage-deflate (RSV1 set)."""
    header = frame_header(length)
    return bytes((header[0] | RSV1,)) + header[1:]


def encode_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """Header plus *payload*: one complete server frame, ready for the socket."""
    return frame_header(len(payload), opcode) + payload


def apply_mask(data: bytes, key: bytes) -> bytes:
    """XOR *data* with the 4-byte masking *key* (RFC 6455 5.3); masking is its own inverse.

    The XOR runs over the whole buffer at once as one big integer, not byte by byte.
    """
    n = len(data)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def mask_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One final client frame: *payload* masked with a fresh random key (clients must mask)."""
    header = bytearray(frame_header(len(payload), opcode))
    header[1] |= MASK_BIT
    key = os.urandom(4)
    return bytes(header) + key + apply_mask(payload, key)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    """The payload of a close frame: *code* and *reason*; none at all for 1005 (no status)."""
    return b"" if code == CLOSE_NO_STATUS else _CODE.pack(code) + reason


def read_header(buf: bytes | bytearray, pos: int) -> tuple[int, int, int, int] | None:
    """The header of the frame at ``buf[pos:]``, or None while it is incomplete.

    Returns ``(first_byte, mask_key_at, payload_at, length)``: the first byte (FIN, RSV,
    opcode), where the 4-byte masking key starts (0 for an unmasked frame), where the payload
    starts and how long it is. The payload itself may not have arrived yet: the caller checks
    ``payload_at + length`` against what it holds, after judging *length* (so an oversized frame
    is refused from its header, before its payload is buffered).
    """
    size = len(buf)
    if size - pos < 2:
        return None
    b0 = buf[pos]
    b1 = buf[pos + 1]
    length = b1 & 0x7F
    head = pos + 2
    if length == 126:
        if size - head < 2:
            return None
        length = _U16.unpack_from(buf, head)[0]
        head += 2
    elif length == 127:
        if size - head < 8:
            return None
        length = _U64.unpack_from(buf, head)[0]
        head += 8
    if b1 & MASK_BIT:
        return b0, head, head + 4, length
    return b0, 0, head, length


def read_close(payload: bytes | bytearray) -> tuple[int, str]:
    """``(code, reason)`` of a close frame's payload; ValueError if it is malformed.

    An empty payload is :data:`CLOSE_NO_STATUS`; one byte, or a reason that is not UTF-8, is a
    protocol violation the caller answers with its own close code.
    """
    if not payload:
        return CLOSE_NO_STATUS, ""
    if len(payload) == 1:
        raise ValueError("close frame with a one-byte payload")
    code = _CODE.unpack_from(payload)[0]
    return code, bytes(payload[2:]).decode("utf-8")  # UnicodeDecodeError is a ValueError
