"""Listening TCP sockets for the gateway's two listeners, with ``SO_REUSEPORT`` on request.

The data plane (``stream_listen``) and the control plane (``http_listen``, served by hypercorn)
both listen on sockets made here, so that ``[gateway] reuse_port`` means the same on both and a
listener that cannot be opened is one clear :class:`ListenError` naming it, whichever it is.

``SO_REUSEPORT`` lets several sockets bind the same address and port when every one of them
sets it (on Linux they must also belong to the same effective user); the kernel then spreads new
connections over them, so several gateway processes on one host serve one address. Port 0 still
asks for a free port: each call (each process) gets one of its own.

As ``trio.open_tcp_listeners`` does: the host is resolved with ``AI_PASSIVE`` and one socket is
opened per address (a hostname may have an IPv4 and an IPv6 one; port 0 then binds the later
ones to the port the first got), ``SO_REUSEADDR`` is set (a restart binds at once over the old
process's ``TIME_WAIT`` connections), IPv6 sockets are ``IPV6_V6ONLY``, and address families
the system does not support are skipped while one is left.
"""

from __future__ import annotations

import errno
import socket
import sys
from typing import Final

import trio

#: Whether this platform has ``SO_REUSEPORT`` (Linux 3.9+, the BSDs, macOS; not Windows).
REUSE_PORT_SUPPORTED: Final = hasattr(socket, "SO_REUSEPORT")
#: trio's default backlog: the system's maximum (Linux caps it at ``net.core.somaxconn``).
DEFAULT_BACKLOG: Final = 0xFFFF


class ListenError(OSError):
    """A listener could not be opened. The message names the listener, its address and why;
    ``errno`` is the system's error number when there was one (``EADDRINUSE``...)."""

    def __init__(self, message: str, error_number: int | None = None) -> None:
        super().__init__(message)
        self.errno = error_number


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(exc: OSError, reuse_port: bool) -> str:
    why = exc.strerror or str(exc)
    if exc.errno != errno.EADDRINUSE:
        return why
    if reuse_port:
        return (
            f"{why}: a process that did not set SO_REUSEPORT, or that runs as another user, "
            "holds it"
        )
    return (
        f"{why}: another process holds it (several gateways share an address only when every "
        "one of them sets [gateway] reuse_port = true)"
    )


async def open_listen_sockets(
    host: str,
    port: int,
    *,
    name: str,
    reuse_port: bool = False,
    backlog: int = DEFAULT_BACKLOG,
) -> list[socket.socket]:
    """Bound, listening, non-blocking stdlib sockets for ``host:port`` (one per address).

    *name* is the listener's config key (``stream_listen``), quoted in errors. With
    *reuse_port* every socket sets ``SO_REUSEPORT`` before it binds. Raises
    :class:`ListenError` and nothing else when the host does not resolve, the platform or the
    system refuses ``SO_REUSEPORT``, or a bind fails (address in use, not permitted); the
    sockets already opened are closed first. The caller owns the sockets it gets.
    """
    where = _where(host, port)
    prefix = f"cannot listen on {where} ({name})"
    if reuse_port and not REUSE_PORT_SUPPORTED:
        raise ListenError(f"{prefix}: reuse_port needs SO_REUSEPORT, which this platform lacks")
    try:
        addresses = await trio.socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(f"{prefix}: cannot resolve {host!r}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    unsupported: OSError | None = None
    try:
        for family, type_, proto, _, sockaddr in addresses:
            try:
                sock = socket.socket(family, type_, proto)
            except OSError as exc:
                if exc.errno != errno.EAFNOSUPPORT:
                    raise
                unsupported = exc
                continue
            sockets.append(sock)
            if sys.platform != "win32":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if reuse_port:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                except OSError as exc:  # a kernel older than the constant (ENOPROTOOPT)
                    raise ListenError(
                        f"{prefix}: the system refused SO_REUSEPORT ({exc.strerror})", exc.errno
                    ) from None
            if port == 0 and len(sockets) > 1:
                # One port for every address of the host, as with a configured port.
                sock.bind((sockaddr[0], sockets[0].getsockname()[1], *sockaddr[2:]))
            else:
                sock.bind(sockaddr)
            sock.listen(backlog)
            sock.setblocking(False)
        if not sockets:
            why = unsupported.strerror if unsupported is not None else "no address"
            raise ListenError(f"{prefix}: {why}", errno.EAFNOSUPPORT)
    except ListenError:
        for sock in sockets:
            sock.close()
        raise
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ListenError(f"{prefix}: {_reason(exc, reuse_port)}", exc.errno) from None
    return sockets
