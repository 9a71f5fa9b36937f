"""sd_notify: exact datagrams on a real unix socket, environment handling, the watchdog task.

Rules: every socket here is a real AF_UNIX datagram socket (a path under a short temporary
directory, or an abstract-namespace name), so time is real: each test has a ``trio.fail_after``
with generous room, and watchdog timing is only checked loosely (a lower bound, which trio.sleep
guarantees, and a generous overall deadline).
"""

from __future__ import annotations

import logging
import os
import re
import socket as stdlib_socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from gateway.service import Notifier, encode_fields

RECV_DEADLINE = 10.0


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # sun_path is limited to 108 bytes and pytest's tmp_path can be longer: use a short dir.
    with tempfile.TemporaryDirectory(prefix="ntf", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
async def listener(sock_dir: Path) -> AsyncIterator[tuple[trio.socket.SocketType, str]]:
    path = str(sock_dir / "notify.sock")
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_DGRAM)
    await sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()


async def recv(sock: trio.socket.SocketType) -> bytes:
    with trio.fail_after(RECV_DEADLINE):
        return await sock.recv(65536)


def assert_nothing_queued(sock: trio.socket.SocketType) -> None:
    with pytest.raises(BlockingIOError):
        sock._sock.recv(65536, stdlib_socket.MSG_DONTWAIT)  # type: ignore[attr-defined]  # trio's wrapped stdlib socket


async def test_exact_datagrams(listener: tuple[trio.socket.SocketType, str]) -> None:
    sock, path = listener
    with trio.fail_after(RECV_DEADLINE):
        async with Notifier.from_environ({"NOTIFY_SOCKET": path}) as n:
            assert n.enabled
            await n.ready()
            assert await recv(sock) == b"READY=1"
            await n.ready(status="serving 3 fixtures")
            assert await recv(sock) == b"READY=1\nSTATUS=serving 3 fixtures"
            await n.notify(READY="1", STATUS="up")
            assert await recv(sock) == b"READY=1\nSTATUS=up"
            await n.stopping()
            assert await recv(sock) == b"STOPPING=1"
            await n.status("two\nlines\r\nhere")
            assert await recv(sock) == b"STATUS=two lines here"
            await n.notify()  # nothing to say: no datagram
            assert_nothing_queued(sock)
            assert n.sent == 5
            assert n.failures == 0


async def test_reloading_carries_monotonic_usec(
    listener: tuple[trio.socket.SocketType, str],
) -> None:
    sock, path = listener
    with trio.fail_after(RECV_DEADLINE):
        async with Notifier.from_environ({"NOTIFY_SOCKET": path}) as n:
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            await n.reloading()
            after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            data = await recv(sock)
    m = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", data)
    assert m is not None, data
    assert before <= int(m[1]) <= after


async def test_abstract_namespace_socket() -> None:
    name = f"dde-gw-test-{uuid.uuid4().hex}"
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_DGRAM)
    try:
        await sock.bind("\0" + name)
        with trio.fail_after(RECV_DEADLINE):
            async with Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}) as n:
                await n.ready()
                assert await recv(sock) == b"READY=1"
    finally:
        sock.close()


@pytest.mark.parametrize("raw", [None, "", "vsock:2:1234", "@"])
async def test_absent_or_unsupported_socket_is_a_noop(raw: str | None) -> None:
    env = {"WATCHDOG_USEC": "200000"}
    if raw is not None:
        env["NOTIFY_SOCKET"] = raw
    n = Notifier.from_environ(env)
    assert not n.enabled
    assert n.watchdog_interval is None  # nowhere to send pings
    with trio.fail_after(5):
        await n.ready()
        await n.reloading()
        await n.status("x")
        await n.run_watchdog()  # returns at once
        await n.aclose()
    assert n.sent == 0
    assert n.failures == 0


def test_default_environ_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier.from_environ().enabled


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<self>"}, 15.0),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "<other>"}, None),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_environment(extra: dict[str, str], expected: float | None) -> None:
    pids = {"<self>": str(os.getpid()), "<other>": str(os.getpid() + 1)}
    env = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    env.update({k: pids.get(v, v) for k, v in extra.items()})
    assert Notifier.from_environ(env).watchdog_interval == expected


async def test_watchdog_pings_at_half_the_interval(
    listener: tuple[trio.socket.SocketType, str],
) -> None:
    sock, path = listener
    n = Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    assert n.watchdog_interval == pytest.approx(0.1)
    with trio.fail_after(RECV_DEADLINE):
        async with n, trio.open_nursery() as nursery:
            await nursery.start(n.run_watchdog)
            assert await recv(sock) == b"WATCHDOG=1"  # the first ping goes out at once
            start = trio.current_time()
            for _ in range(4):
                assert await recv(sock) == b"WATCHDOG=1"
            elapsed = trio.current_time() - start
            nursery.cancel_scope.cancel()
    # Four more pings need at least four sleeps of 0.1 s (trio never wakes a sleep early).
    assert elapsed >= 0.4 - 0.01


async def test_send_failure_never_raises_and_logs_once(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(sock_dir / "nobody-listens")})
    caplog.set_level(logging.DEBUG, logger="gateway.service.notify")
    with trio.fail_after(RECV_DEADLINE):
        async with n:
            await n.ready()
            await n.status("still fine")
            await n.stopping()
    assert n.sent == 0
    assert n.failures == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "sd_notify send failed" in warnings[0].getMessage()


async def test_closed_notifier_sends_nothing(
    listener: tuple[trio.socket.SocketType, str],
) -> None:
    sock, path = listener
    n = Notifier.from_environ({"NOTIFY_SOCKET": path})
    with trio.fail_after(RECV_DEADLINE):
        await n.ready()
        assert await recv(sock) == b"READY=1"
        await n.aclose()
        await n.aclose()  # idempotent
        await n.stopping()
    assert_nothing_queued(sock)
    assert n.sent == 1
    assert "closed" in repr(n)


def test_bad_variable_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="invalid sd_notify variable name"):
        encode_fields({"ready": "1"})
    with pytest.raises(ValueError, match="invalid sd_notify variable name"):
        encode_fields({"A=B": "1"})
    assert encode_fields({"A": "1", "B_2": "x\ny"}) == b"A=1\nB_2=x y"
