"""Bearer-token access control for the HTTP API, as a pure ASGI middleware.

Two optional token lists, read once at startup from ``[api]``:

- admin tokens: every method other than GET/HEAD needs one (``PUT``/``DELETE`` on fixtures);
- read tokens: when configured, GET/HEAD need a read or an admin token.

``/healthz`` and ``/readyz`` are always open: load balancers and systemd probes carry no token.
The dashboard's files (``GET /`` and ``GET /dashboard/...``) are open too: they hold no data, and
the page reads the API with the token its user gives it.
Without a list the matching requests are open (the default listen address is loopback).
It runs before routing, so an unauthenticated caller learns nothing about which routes exist.

A missing or unknown token gets 401 with ``WWW-Authenticate: Bearer``; a valid read token used
for a write gets 403 (RFC 6750 ``insufficient_scope``). Tokens are compared in constant time and
never echoed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

import attrs
import orjson
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.config import ApiSection, Secret, any_matches
from gateway.controlplane._dashboard import DASHBOARD_PREFIX

OPEN_PATHS: Final = frozenset({"/healthz", "/readyz"})
READ_METHODS: Final = frozenset({"GET", "HEAD"})
#: Open to GET/HEAD: the dashboard page (``/``) and its files (``/dashboard/<name>``, one
#: segment: the same paths the router serves them on, nothing that could route elsewhere).
OPEN_READ_PATHS: Final = re.compile(r"/|" + re.escape(DASHBOARD_PREFIX) + r"[^/]+")
REALM: Final = "dde-gateway"


@attrs.frozen
class ApiTokens:
    """The accepted tokens; None means that kind of access is open."""

    admin: Sequence[Secret] | None = None
    read: Sequence[Secret] | None = None

    @classmethod
    def from_config(cls, api: ApiSection) -> ApiTokens:
        """Read both token files now; :class:`~gateway.config.SecretError` names a bad one."""
        return cls(admin=api.read_admin_tokens(), read=api.read_read_tokens())


def _bearer(headers: Headers) -> str | None:
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class BearerAuthMiddleware:
    """Reject requests that lack the token their method needs; pass the rest to *app*."""

    def __init__(self, app: ASGIApp, tokens: ApiTokens) -> None:
        self._app = app
        self._tokens = tokens

    def _decide(self, scope: Scope) -> tuple[int, str] | None:
        """None when allowed, else (status, error message)."""
        path = scope["path"]
        if path in OPEN_PATHS:
            return None
        write = scope["method"] not in READ_METHODS
        if not write and OPEN_READ_PATHS.fullmatch(path):
            return None
        admin = self._tokens.admin
        read = self._tokens.read
        if write and admin is None:
            return None
        if not write and read is None:
            return None
        token = _bearer(Headers(scope=scope))
        if token is None:
            return 401, "missing bearer token"
        is_admin = admin is not None and any_matches(admin, token)
        if is_admin:
            return None
        if write:
            # Reached only with admin tokens configured: a valid read token is not enough.
            if read is not None and any_matches(read, token):
                return 403, "this token may only read"
            return 401, "invalid bearer token"
        assert read is not None
        if any_matches(read, token):
            return None
        return 401, "invalid bearer token"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        verdict = self._decide(scope)
        if verdict is None:
            await self._app(scope, receive, send)
            return
        status, message = verdict
        challenge = f'Bearer realm="{REALM}"'
        if status == 401 and message == "invalid bearer token":
            challenge += ', error="invalid_token"'
        elif status == 403:
            challenge += ', error="insufficient_scope"'
        body = orjson.dumps({"error": message})
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", challenge.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
