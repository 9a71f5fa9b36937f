"""Serve the control plane: hypercorn's trio worker on ``config.gateway.http_listen``.

hypercorn is fine for short HTTP requests (see docs/design.md: its shielded writes only hurt
long-lived streams, which live on the data plane instead). No signal handling here: the
service's root nursery owns signals, and cancelling :func:`run` (or setting *shutdown*) stops it.

The listening socket is made by :func:`gateway.listen.open_listen_sockets`, as the data plane's
is, and handed to hypercorn: hypercorn binds its own only from ``Config.bind`` and sets
``SO_REUSEPORT`` only for several workers of its own process manager, which ``serve`` does not
run, so ``[gateway] reuse_port`` could not reach it otherwise.
"""

from __future__ import annotations

import logging
import socket
from functools import partial
from pathlib import Path
from typing import Final

import h11
import hypercorn.protocol
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.events import Closed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio import serve

from gateway.config import Config, ListenAddress, expand_path
from gateway.controlplane._app import BODY_TIMEOUT, build_app
from gateway.controlplane._auth import ApiTokens
from gateway.controlplane._downloads import DownloadSlots
from gateway.controlplane._rates import DEFAULT_SAMPLE_INTERVAL, RateSampler
from gateway.controlplane._target import ControlTarget
from gateway.listen import open_listen_sockets

logger: Final = logging.getLogger("gateway.http")

# In-flight requests are short; after a shutdown request this bounds the wait for them.
GRACEFUL_TIMEOUT: Final = 5.0
KEEP_ALIVE_TIMEOUT: Final = 5.0
#: The HTTP versions the API speaks (h11's spelling); anything else is answered 505.
HTTP_VERSIONS: Final = frozenset({b"1.0", b"1.1"})
#: A TLS handshake not done by then is dropped (hypercorn's default is 60 s).
TLS_HANDSHAKE_TIMEOUT: Final = 10.0


class _Http11Only(H11Protocol):
    """hypercorn's HTTP/1.1 protocol without its switches to HTTP/2.

    hypercorn has no setting for HTTP/2 over cleartext (``alpn_protocols`` applies to TLS only):
    its ``H11Protocol._check_protocol`` answers any request with ``Upgrade: h2c`` (and no body)
    ``101 Switching Protocols`` and hands the connection to its HTTP/2 protocol, and takes a
    ``PRI * HTTP/2.0`` request line (the HTTP/2 preface, "prior knowledge") as HTTP/2 - with TLS
    too. The API was built and tested for HTTP/1.1 (its request limits, the recording
    downloads), so here an ``Upgrade: h2c`` header is ignored, as HTTP/1.1 allows (the request
    is answered in HTTP/1.1), and a request of any version but 1.0 and 1.1 (the preface) is
    answered 505 and its connection closed, before any app sees it.
    """

    async def _check_protocol(self, event: h11.Request) -> None:
        return None

    async def _create_stream(self, request: h11.Request) -> None:
        if request.http_version not in HTTP_VERSIONS:
            await self._send_error_response(505)
            await self.send(Closed())
            return
        await super()._create_stream(request)


# hypercorn's ProtocolWrapper makes each connection's protocol from this name: the one place
# where it can be replaced (the gateway runs no other hypercorn server).
hypercorn.protocol.H11Protocol = _Http11Only  # type: ignore[attr-defined]


class _GivenSockets(HypercornConfig):
    """hypercorn settings whose listening sockets are made by the gateway, not from ``bind``.

    hypercorn's trio worker asks its config for the sockets (``create_sockets``) once the ASGI
    lifespan has started, then listens on them (with ``backlog``) and serves; with TLS they are
    its "secure" sockets. It owns them from then on and closes them when it stops.
    """

    def __init__(self, sockets: list[socket.socket]) -> None:
        super().__init__()
        self.given_sockets = sockets

    def create_sockets(self) -> Sockets:
        given = list(self.given_sockets)
        if self.ssl_enabled:
            return Sockets(secure_sockets=given, insecure_sockets=[], quic_sockets=[])
        return Sockets(secure_sockets=[], insecure_sockets=given, quic_sockets=[])


def hypercorn_config(
    listen: ListenAddress,
    *,
    sockets: list[socket.socket] | None = None,
    access_log: bool = False,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> HypercornConfig:
    """hypercorn settings: one bind, logs to ``gateway.http``, access log off by default.

    With *sockets* (listening, from :func:`gateway.listen.open_listen_sockets`) hypercorn
    serves on those instead of binding *listen* itself; *listen* is then only what it names.
    With *cert_file* and *key_file* (PEM; ``$VARS`` expanded) it serves HTTPS, HTTP/1.1 only:
    the API's request limits were built and tested for HTTP/1.1, and it needs nothing of h2.
    """
    hc = HypercornConfig() if sockets is None else _GivenSockets(sockets)
    hc.bind = [str(listen)]
    hc.errorlog = logger
    hc.accesslog = logger if access_log else None
    hc.graceful_timeout = GRACEFUL_TIMEOUT
    hc.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    # No product banner: it helps only someone probing for known hypercorn bugs.
    hc.include_server_header = False
    if cert_file is not None and key_file is not None:
        hc.certfile = str(expand_path(cert_file))
        hc.keyfile = str(expand_path(key_file))
        hc.alpn_protocols = ["http/1.1"]
        hc.ssl_handshake_timeout = TLS_HANDSHAKE_TIMEOUT
    return hc


def _bound_address(binds: list[str]) -> ListenAddress:
    """hypercorn reports ``http://HOST:PORT`` (``http://[v6]:PORT``); we return the address."""
    scheme, sep, rest = binds[0].partition("://")
    return ListenAddress.parse(rest if sep else scheme)


async def run(
    config: Config,
    target: ControlTarget,
    *,
    shutdown: trio.Event | None = None,
    access_log: bool = False,
    sample_interval: float = DEFAULT_SAMPLE_INTERVAL,
    body_timeout: float = BODY_TIMEOUT,
    task_status: trio.TaskStatus[ListenAddress] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the HTTP API until cancelled or until *shutdown* is set.

    Reads the API token files first: a :class:`~gateway.config.SecretError` (missing, unreadable
    or empty file) is raised before anything is bound. A listener that cannot be opened
    (address in use) raises :class:`~gateway.listen.ListenError` before ``started()``; with
    ``[gateway] reuse_port`` the socket sets ``SO_REUSEPORT``. Calls
    ``task_status.started(address)`` with the address actually bound (port 0 resolved) once
    the socket is listening. On *shutdown*, stops accepting, waits up to
    :data:`GRACEFUL_TIMEOUT` for in-flight requests, then returns; on cancellation it closes
    the listener and every connection at once.
    """
    tokens = await trio.to_thread.run_sync(ApiTokens.from_config, config.api)
    sampler = RateSampler()
    app = build_app(
        target,
        tokens=tokens,
        sampler=sampler,
        body_timeout=body_timeout,
        downloads=DownloadSlots.for_config(config.api),
    )
    section = config.gateway
    listen = section.http_listen
    sockets = await open_listen_sockets(
        listen.host, listen.port, name="http_listen", reuse_port=section.reuse_port
    )
    hc = hypercorn_config(
        listen,
        sockets=sockets,
        access_log=access_log,
        cert_file=section.tls_cert_file,
        key_file=section.tls_key_file,
    )
    try:
        async with trio.open_nursery() as nursery:

            async def serve_then_stop(task_status: trio.TaskStatus[list[str]]) -> None:
                try:
                    await serve(
                        # Starlette and hypercorn declare the same ASGI callable with different
                        # TypedDicts; they agree at runtime.
                        app,  # type: ignore[arg-type]
                        hc,
                        shutdown_trigger=shutdown.wait if shutdown is not None else None,
                        task_status=task_status,
                    )
                finally:
                    # The server is gone (shutdown, error or cancel): the sampler goes with it.
                    nursery.cancel_scope.cancel()

            await nursery.start(partial(sampler.run, target.totals, interval=sample_interval))
            binds: list[str] = await nursery.start(serve_then_stop)
            address = _bound_address(binds)
            logger.info(
                "control plane listening on %s://%s%s",
                "https" if hc.ssl_enabled else "http",
                address,
                " (SO_REUSEPORT)" if section.reuse_port else "",
            )
            task_status.started(address)
    finally:
        # hypercorn closes them when it stops serving; this covers a stop before it served.
        for sock in sockets:
            sock.close()
