"""Just enough RFC 6455 for the feeder and the load generator, written for speed.

The benchmark's own processes must not be the bottleneck, so they skip a WebSocket library:
the handshake is done by hand, server-to-client frames are built once and shared, and the
reader parses frame headers only (payloads stay in the receive buffer as index ranges).
Fragmented messages and extensions are never negotiated, so they are not handled.
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Final

from gateway.wire import apply_mask, mask_frame, read_header
from gateway.wire import encode_frame as wire_encode_frame

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class ProtocolError(Exception):
    """The peer sent something this minimal codec does not accept."""


def accept_key(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


#: The permessage-deflate offer of a client that compresses nothing itself and asks the
#: server to compress every message on its own (what the gateway's shared encoding needs).
DEFLATE_OFFER: Final = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


def client_handshake(
    host: str, port: int, path: str, *, extensions: str | None = None
) -> tuple[bytes, bytes]:
    """An upgrade request (offering *extensions*, if given) and the accept value the server
    must answer with."""
    key = base64.b64encode(os.urandom(16))
    offer = f"Sec-WebSocket-Extensions: {extensions}\r\n" if extensions else ""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{offer}"
        f"Sec-WebSocket-Key: {key.decode()}\r\n\r\n"
    ).encode()
    return request, accept_key(key)


def check_server_handshake(response: bytes, expected_accept: bytes) -> None:
    """Raise :class:`ProtocolError` unless *response* (headers only) accepts the upgrade."""
    head, *lines = response.split(b"\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ProtocolError(f"upgrade refused: {head.decode(errors='replace')}")
    for line in lines:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-accept" and value.strip() == expected_accept:
            return
    raise ProtocolError("upgrade response without the right Sec-WebSocket-Accept")


def server_handshake(request: bytes) -> tuple[str, bytes]:
    """Parse an upgrade request (headers only); return its path and the 101 response."""
    head, *lines = request.split(b"\r\n")
    parts = head.split()
    if len(parts) != 3 or parts[0] != b"GET":
        raise ProtocolError("not a GET request")
    key = None
    for line in lines:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    if key is None:
        raise ProtocolError("no Sec-WebSocket-Key")
    response = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n"
    )
    return parts[1].decode(errors="replace"), response


def encode_frame(opcode: int, payload: bytes, *, mask: bool = False) -> bytes:
    """One final frame. Clients must mask (``mask=True``); servers must not.

    The gateway's own frame codec (:mod:`gateway.wire`) builds it, so the harness and the
    gateway cannot disagree on the wire format.
    """
    return mask_frame(payload, opcode) if mask else wire_encode_frame(payload, opcode)


def parse_frames(buf: bytearray | bytes, pos: int = 0) -> tuple[list[tuple[int, int, int]], int]:
    """Complete frames in *buf* from *pos*: ``([(opcode, start, end), ...], next_pos)``.

    The opcode keeps the RSV1 bit (0x40): a compressed text message (permessage-deflate) is
    ``0x41``, never equal to ``OP_TEXT``.

    ``start:end`` is the payload's range in *buf*. Masked payloads (client frames) are left
    masked; call :func:`payload` to read one. Stops at the first incomplete frame.
    """
    frames: list[tuple[int, int, int]] = []
    size = len(buf)
    while (header := read_header(buf, pos)) is not None:
        b0, _, start, n = header
        end = start + n
        if end > size:
            break
        frames.append((b0 & 0x4F, start, end))
        pos = end
    return frames, pos


def payload(buf: bytearray | bytes, start: int, end: int) -> bytes:
    """The payload ``buf[start:end]`` of a frame found by :func:`parse_frames`, unmasked."""
    # The mask key, when there is one, is the 4 bytes before the payload; the caller knows
    # whether frames are masked from who sent them (clients always mask).
    return bytes(buf[start:end])


def unmask(buf: bytearray | bytes, start: int, end: int) -> bytes:
    """The payload of a masked (client) frame found by :func:`parse_frames`."""
    return apply_mask(bytes(buf[start:end]), bytes(buf[start - 4 : start]))
