"""systemd's notification protocol (``sd_notify``): readiness, status, reload and watchdog.

Why hand-written: the protocol is one ``KEY=VALUE`` datagram per call on the unix socket named by
``$NOTIFY_SOCKET`` (``man 3 sd_notify``). The only PyPI client (``sdnotify``) is blocking and has
been unmaintained since 2017, and libsystemd bindings need a C build; a trio datagram socket does
the job in a few lines without blocking the event loop.

Resources and errors: the socket is created on the first send and closed by :meth:`Notifier.
aclose` (or leaving ``async with``). Sending never raises: systemd being gone or slow must not take
the gateway down, so a failed send is logged once (at WARNING; later ones at DEBUG) and counted in
:attr:`Notifier.failures`. Without ``$NOTIFY_SOCKET`` (not started by systemd, or the unit is not
``Type=notify``) every method is a no-op.
"""

from __future__ import annotations

import logging
import os
import re
import socket as _stdlib_socket
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Final, Self

import trio

log: Final = logging.getLogger("gateway.service.notify")

#: How long one datagram may wait for room in systemd's receive queue before it counts as failed.
DEFAULT_SEND_TIMEOUT: Final = 2.0

_KEY: Final = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _monotonic_usec() -> int:
    # systemd compares MONOTONIC_USEC with its own CLOCK_MONOTONIC reading; trio.current_time()
    # has an arbitrary offset, so read the kernel clock directly.
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _one_line(value: str) -> str:
    # A newline inside a value would start a new KEY=VALUE assignment in the datagram.
    return value.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def encode_fields(fields: Mapping[str, str]) -> bytes:
    """Render assignments as one notification datagram: ``KEY=value`` lines, in the given order.

    Raises ValueError for a key that is not an upper-case systemd variable name (a programming
    error); newlines inside values are replaced by spaces.
    """
    for key in fields:
        if _KEY.match(key) is None:
            raise ValueError(f"invalid sd_notify variable name {key!r}")
    return "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items()).encode()


def _socket_address(raw: str) -> str | None:
    """``$NOTIFY_SOCKET`` as a unix socket address, or None when it is not one we can use."""
    if raw.startswith("/"):
        return raw
    if raw.startswith("@") and len(raw) > 1:
        # Linux abstract namespace: systemd writes it with "@" in place of the leading NUL.
        return "\0" + raw[1:]
    return None


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, if the watchdog is meant for this process."""
    raw_usec = environ.get("WATCHDOG_USEC")
    if raw_usec is None:
        return None
    raw_pid = environ.get("WATCHDOG_PID")
    if raw_pid is not None:
        try:
            pid = int(raw_pid)
        except ValueError:
            log.warning("ignoring the watchdog: WATCHDOG_PID=%r is not a process id", raw_pid)
            return None
        if pid != os.getpid():
            # The variable was inherited from a parent that owns the watchdog.
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        usec = 0
    if usec <= 0:
        log.warning("ignoring the watchdog: WATCHDOG_USEC=%r is not a positive integer", raw_usec)
        return None
    # systemd's own advice (sd_watchdog_enabled(3)): ping at half the timeout.
    return usec / 1_000_000 / 2


class Notifier:
    """Sends notifications to systemd; a no-op when not running under a notify-type unit.

    Use :meth:`from_environ`, then ``async with notifier:`` (or call :meth:`aclose`) so the socket
    is closed. Counters :attr:`sent` and :attr:`failures` are for status and metrics.
    """

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_interval: float | None = None,
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
    ) -> None:
        self._address = address
        self.enabled: bool = address is not None
        # A watchdog needs somewhere to send its pings.
        self.watchdog_interval: float | None = watchdog_interval if self.enabled else None
        self._send_timeout = send_timeout
        self._sock: trio.socket.SocketType | None = None
        self._closed = False
        self.sent = 0
        self.failures = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Build from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        A missing ``NOTIFY_SOCKET`` gives a disabled (no-op) notifier; an unsupported one (not a
        path or ``@abstract`` name, e.g. ``vsock:``) does too, with a warning.
        """
        raw = environ.get("NOTIFY_SOCKET")
        if not raw:
            return cls(None)
        address = _socket_address(raw)
        if address is None:
            log.warning("sd_notify disabled: unsupported NOTIFY_SOCKET %r", raw)
            return cls(None)
        return cls(address, watchdog_interval=_watchdog_interval(environ))

    async def notify(self, **fields: str) -> None:
        """Send one datagram, e.g. ``notify(READY="1", STATUS="serving")``.

        Never raises on a send failure (logged once, counted); raises ValueError only for a bad
        variable name. Does nothing when disabled, closed, or given no fields.
        """
        data = encode_fields(fields)
        if not fields or self._address is None or self._closed:
            # Still a checkpoint, as trio expects of every async call.
            await trio.lowlevel.checkpoint()
            return
        error: str | None = None
        try:
            if self._sock is None:
                self._sock = trio.socket.socket(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_DGRAM)
            # A full receive queue on systemd's side blocks a unix datagram send; bound the wait.
            with trio.move_on_after(self._send_timeout):
                await self._sock.sendto(data, self._address)
                self.sent += 1
                return
            error = f"timed out after {self._send_timeout:g} s"
        except OSError as exc:
            error = exc.strerror or type(exc).__name__
        self.failures += 1
        level = logging.WARNING if self.failures == 1 else logging.DEBUG
        log.log(level, "sd_notify send failed (%s); further failures are logged at DEBUG", error)

    async def ready(self, *, status: str | None = None) -> None:
        """``READY=1``: startup (or a reload) is complete; systemd marks the unit active."""
        await self._send_with_status({"READY": "1"}, status)

    async def stopping(self, *, status: str | None = None) -> None:
        """``STOPPING=1``: shutdown (drain) has begun."""
        await self._send_with_status({"STOPPING": "1"}, status)

    async def reloading(self, *, status: str | None = None) -> None:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (required by systemd >= 253).

        Send :meth:`ready` when the reload is done; until then systemd shows the unit reloading.
        """
        await self._send_with_status(
            {"RELOADING": "1", "MONOTONIC_USEC": str(_monotonic_usec())}, status
        )

    async def status(self, text: str) -> None:
        """``STATUS=...``: a one-line human-readable state shown by ``systemctl status``."""
        await self.notify(STATUS=text)

    async def _send_with_status(self, fields: dict[str, str], status: str | None) -> None:
        if status is not None:
            fields["STATUS"] = status
        await self.notify(**fields)

    async def run_watchdog(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Send ``WATCHDOG=1`` now and then every :attr:`watchdog_interval` seconds, forever.

        It runs as an ordinary trio task, so pings stop when the event loop stops being
        responsive, which is the failure the watchdog exists to catch. Returns at once (after
        ``task_status.started()``) when there is no watchdog. Cancel it to stop.
        """
        interval = self.watchdog_interval
        task_status.started()
        if interval is None:
            await trio.lowlevel.checkpoint()
            return
        while True:
            await self.notify(WATCHDOG="1")
            await trio.sleep(interval)

    async def aclose(self) -> None:
        """Close the socket; later sends are no-ops. Idempotent."""
        self._closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "disabled" if not self.enabled else ("closed" if self._closed else "open")
        return (
            f"<Notifier {state} watchdog_interval={self.watchdog_interval!r} "
            f"sent={self.sent} failures={self.failures}>"
        )
