"""What both adapters open a connection with: token, subprotocols, TLS (one place)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from ._core import PROTOCOL, TOKEN_SUBPROTOCOL_PREFIX

TokenIn = Literal["header", "subprotocol"]
#: Seconds a connection attempt (TCP, TLS, upgrade) may take.
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
#: Seconds a closing handshake may take before the socket is dropped.
DEFAULT_CLOSE_TIMEOUT: Final = 2.0
#: The largest message accepted (bytes): the gateway's frames are far smaller.
DEFAULT_MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
#: Characters a token may have to travel as a subprotocol name (RFC 6455 token characters).
_SUBPROTOCOL_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~"
)


@dataclass(frozen=True)
class ConnectOptions:
    """How to open each connection. The token never appears in ``repr``."""

    token: str | None = field(default=None, repr=False)
    token_in: TokenIn = "header"
    ssl_context: ssl.SSLContext | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    @classmethod
    def build(
        cls,
        *,
        token: str | None,
        token_in: TokenIn,
        ssl_context: ssl.SSLContext | None,
        ca_file: str | Path | None,
        connect_timeout: float,
    ) -> ConnectOptions:
        if token is not None:
            token = token.strip()
            if not token:
                raise ValueError("the token is empty")
        if token_in not in ("header", "subprotocol"):
            raise ValueError(f"token_in must be 'header' or 'subprotocol', got {token_in!r}")
        if token is not None and token_in == "subprotocol" and not set(token) <= _SUBPROTOCOL_CHARS:
            raise ValueError(
                "this token has characters a subprotocol name cannot carry: send it as a header"
            )
        if token is not None and token_in == "header" and any(c in token for c in "\r\n\0"):
            raise ValueError("the token has a line break or NUL")
        if ssl_context is not None and ca_file is not None:
            raise ValueError("give ssl_context or ca_file, not both")
        if ca_file is not None:
            ssl_context = ssl.create_default_context(cafile=str(ca_file))
        if not connect_timeout > 0:
            raise ValueError("connect_timeout must be > 0")
        return cls(token, token_in, ssl_context, connect_timeout)

    def subprotocols(self) -> list[str]:
        """Always ``dde.v1`` (the protocol version spoken); the token too when sent that way."""
        if self.token is not None and self.token_in == "subprotocol":
            return [PROTOCOL, TOKEN_SUBPROTOCOL_PREFIX + self.token]
        return [PROTOCOL]

    def headers(self) -> list[tuple[str, str]]:
        if self.token is not None and self.token_in == "header":
            return [("Authorization", f"Bearer {self.token}")]
        return []

    def ssl_for(self, url: str) -> ssl.SSLContext | None:
        """The context for a ``wss://`` URL (the system's CAs unless one was given)."""
        if not url.startswith("wss://"):
            return None
        return self.ssl_context if self.ssl_context is not None else ssl.create_default_context()
