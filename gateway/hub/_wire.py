"""RFC 6455 server-to-client frame encoding, done by hand because it is on the hot path.

A server frame is never masked, so the bytes of one message are the same for every subscriber:
the hub builds them once and every subscriber's queue shares the same ``bytes`` object. The
header is 2, 4 or 10 bytes (payload length < 126, < 65536, or larger). No compression is ever
negotiated by the data plane, so the payload goes out as is.
"""

from __future__ import annotations

import os
import struct
from typing import Final

OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

_FIN: Final = 0x80
_MASK_BIT: Final = 0x80
_LEN16: Final = struct.Struct("!BBH")
_LEN64: Final = struct.Struct("!BBQ")
# Headers of short text frames are looked up, not built: most control messages are short.
_SHORT_TEXT: Final = tuple(bytes((_FIN | OP_TEXT, n)) for n in range(126))


def frame_header(length: int, opcode: int = OP_TEXT) -> bytes:
    """The header of one final (FIN set), unmasked frame carrying *length* payload bytes."""
    if length < 126:
        if opcode == OP_TEXT:
            return _SHORT_TEXT[length]
        return bytes((_FIN | opcode, length))
    if length < 65536:
        return _LEN16.pack(_FIN | opcode, 126, length)
    return _LEN64.pack(_FIN | opcode, 127, length)


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
    header[1] |= _MASK_BIT
    key = os.urandom(4)
    return bytes(header) + key + apply_mask(payload, key)
