"""Subscriber access control for both endpoints: the current tokens and the failures.

``[subscribers] tokens_file`` (format: :mod:`gateway.config`'s ``parse_subscriber_tokens``) is
loaded at start and on every reload; :meth:`SubscriberAuth.replace` swaps it in for the
connections that come next - a connection keeps the access it was given at its handshake.
Without a file access is open, as before the file existed.

- ``/v1/stream`` authenticates at the HTTP upgrade: ``Authorization: Bearer <token>``, or, for
  browsers (which cannot set headers on a WebSocket), the subprotocol ``dde.bearer.<token>``
  offered next to ``dde.v1``; the server answers ``dde.v1``, never the token's protocol. A
  missing or unknown token gets HTTP 401. The token's feed list then bounds the subscriptions.
- The vendor drop-in keeps the vendor's wire behaviour (``{"authToken": ...}``, 1008); the
  token must also allow the endpoint's feed.

Every failure is counted per endpoint kind (:data:`AUTH_ENDPOINTS`, the metric's only label)
and logged through a :class:`~gateway.logs.LogThrottle` with the peer address and the
running count - never the token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Final

from gateway.config import SubscriberTokens, TokenGrant
from gateway.errors import BadRequest
from gateway.logs import DEFAULT_INTERVAL, LogThrottle

log = logging.getLogger("gateway.dataplane")

#: Endpoint kinds failures are counted by: the multiplexed stream and the vendor drop-in.
AUTH_ENDPOINTS: Final = ("stream", "dropin")
#: The subprotocol of ``/v1/stream``, answered when the client offers it.
STREAM_PROTOCOL: Final = "dde.v1"
#: A subprotocol that carries a token (browsers): ``dde.bearer.<token>``.
BEARER_PROTOCOL_PREFIX: Final = "dde.bearer."

_ENDPOINT_TEXT: Final = {"stream": "/v1/stream", "dropin": "a drop-in endpoint"}


def offered_tokens(
    headers: Iterable[tuple[bytes, bytes]], subprotocols: Iterable[str]
) -> list[str]:
    """Every token an upgrade request carries: Bearer ``Authorization`` headers and
    ``dde.bearer.<token>`` subprotocols (empty ones skipped)."""
    tokens: list[str] = []
    for name, value in headers:
        if name.lower() != b"authorization":
            continue
        scheme, _, token = value.decode("latin-1").partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            tokens.append(token)
    for protocol in subprotocols:
        if protocol.startswith(BEARER_PROTOCOL_PREFIX) and len(protocol) > len(
            BEARER_PROTOCOL_PREFIX
        ):
            tokens.append(protocol[len(BEARER_PROTOCOL_PREFIX) :])
    return tokens


def check_feed_allowed(feeds: frozenset[str] | None, feed: str) -> None:
    """``/v1/stream``: refuse a request (subscribe, replay) for a *feed* outside the token's
    *feeds* (None: every feed is allowed)."""
    if feeds is not None and feed not in feeds:
        raise BadRequest(f"feed {feed[:40]!r} is not allowed for this subscriber")


class SubscriberAuth:
    """The subscriber tokens in force (None: open access) and the failed attempts.

    ``failures`` maps each of :data:`AUTH_ENDPOINTS` to its count since start (monotonic; a
    reload keeps it). *clock* drives the log throttles (injectable for tests).
    """

    def __init__(
        self,
        tokens: SubscriberTokens | None = None,
        *,
        log_interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tokens = tokens
        self.failures: dict[str, int] = dict.fromkeys(AUTH_ENDPOINTS, 0)
        self._throttles = {
            e: LogThrottle(log, interval=log_interval, clock=clock) for e in AUTH_ENDPOINTS
        }

    def __repr__(self) -> str:
        return f"<SubscriberAuth {self.tokens!r} failures {self.failures}>"

    def replace(self, tokens: SubscriberTokens | None) -> None:
        """New connections use *tokens* from now on; connected ones keep their access."""
        self.tokens = tokens

    def failed(self, endpoint: str, peer: str, reason: str) -> None:
        """Count one failure of *endpoint* and log it (rate-limited). *reason* must never
        contain a token."""
        self.failures[endpoint] += 1
        self._throttles[endpoint].warning(
            "subscriber authentication failed on %s from %s: %s (%d failures there since start)",
            _ENDPOINT_TEXT[endpoint],
            peer,
            reason,
            self.failures[endpoint],
        )

    def check_stream(self, offered: list[str], peer: str) -> tuple[bool, TokenGrant | None]:
        """Authenticate a ``/v1/stream`` upgrade offering *offered* tokens.

        ``(True, grant)`` when allowed (grant None: access is open), ``(False, None)`` when
        refused (counted and logged here).
        """
        tokens = self.tokens
        if tokens is None:
            return True, None
        if not offered:
            self.failed("stream", peer, "no token")
            return False, None
        if len(offered) > 1:
            self.failed("stream", peer, "more than one token")
            return False, None
        grant = tokens.match(offered[0])
        if grant is None:
            self.failed("stream", peer, "unknown token")
            return False, None
        return True, grant

    def check_dropin(self, token: str, feed: str, peer: str) -> bool:
        """Authenticate a drop-in ``authToken`` for *feed*; a refusal is counted and logged."""
        tokens = self.tokens
        if tokens is None:
            return True
        grant = tokens.match(token)
        if grant is None:
            self.failed("dropin", peer, "unknown token")
            return False
        if not grant.allows(feed):
            self.failed("dropin", peer, f"the token of line {grant.line} may not read {feed!r}")
            return False
        return True
