"""``[gateway] reuse_port``: several gateways on one host share both listeners' addresses.

Covers: two real ``Gateway``s bind the same stream and HTTP ports with ``reuse_port = true``
(the first on port 0, the second on the ports the first got), both answer on each port (HTTP
requests and WebSocket subscribers reach both: the kernel spreads new connections), and once one
stops the other serves every new connection; without ``reuse_port`` (on either side) the second
gateway's start fails with a :class:`~gateway.listen.ListenError` naming the listener, for each
of the two listeners; :func:`~gateway.listen.open_listen_sockets` itself (port 0 gives each
call its own port, one port for every address of a hostname, a refusal of SO_REUSEPORT, a
platform without it).

Rules: real sockets on 127.0.0.1, real time, every test under ``trio.fail_after``. Which of two
sockets the kernel hands a connection to is a hash of its addresses: "both get some" is checked
over many connections (each one alone would fail with probability 1/2; 64 in a row 2^-63).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio_websocket

import gateway.listen
from gateway.config import Config
from gateway.listen import ListenError, open_listen_sockets
from gateway.service import Gateway
from gateway.simulator import Simulator
from tests.conftest import TEST_TOKEN
from tests.kit import gateway_config, http_get, next_of_type

FX = "5501b26a-1c44-4c3b-9ff5-9322084d41f9"
ONLY_1 = "08456e52-9cf7-48cc-913c-f45ec0a1b2c3"  # followed by the first gateway only
ONLY_2 = "7b1d0c7e-5a43-4f0e-9d0b-2c4a1e6f8a90"  # followed by the second gateway only
GUARD = 60
TRIES = 64

needs_reuse_port = pytest.mark.skipif(
    not gateway.listen.REUSE_PORT_SUPPORTED, reason="this platform has no SO_REUSEPORT"
)


def _flatten(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _flatten(sub)]
    return [exc]


class Stoppable:
    """A gateway running in its own cancel scope, so one of two can be stopped alone."""

    def __init__(self, config: Config) -> None:
        self.gateway = Gateway(config)
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.scope:
                await self.gateway.run(task_status=task_status)
        finally:
            self.stopped.set()

    async def stop(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


@asynccontextmanager
async def simulator(tmp_path: Path) -> AsyncIterator[Callable[..., Config]]:
    """A simulator with the three fixtures; yields ``make(fixtures, **gateway_keys)``."""
    token_file = tmp_path / "token"
    token_file.write_text(TEST_TOKEN)
    sim = Simulator(tokens={TEST_TOKEN}, rate_hz=50.0, heartbeat_interval=1.0)
    for fixture in (FX, ONLY_1, ONLY_2):
        sim.add_fixture(fixture)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve, "127.0.0.1", 0)

        def make(fixtures: list[str], **keys: Any) -> Config:
            gateway = {"stream_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0", **keys}
            return gateway_config(
                port, token_file, [("tracking", f) for f in fixtures], gateway=gateway
            )

        yield make
        nursery.cancel_scope.cancel()


async def subscribe(ws: trio_websocket.WebSocketConnection, fixture: str) -> None:
    message = {"op": "subscribe", "feed": "tracking", "fixture": fixture}
    await ws.send_message(orjson.dumps(message).decode())
    assert (await next_of_type(ws, "subscribed"))["fixture"] == fixture


async def _who_answers(http: str) -> str:
    """Which gateway answered a new HTTP connection: the one following ONLY_1 or ONLY_2."""
    status, body = await http_get(f"http://{http}/v1/fixtures")
    assert status == 200, body
    fixtures = {v["fixture"] for v in orjson.loads(body)}
    assert FX in fixtures, fixtures
    assert len(fixtures & {ONLY_1, ONLY_2}) == 1, fixtures
    return "first" if ONLY_1 in fixtures else "second"


@needs_reuse_port
async def test_two_gateways_share_both_ports_and_both_serve(tmp_path: Path) -> None:
    with trio.fail_after(GUARD):
        async with simulator(tmp_path) as make, trio.open_nursery() as nursery:
            first = Stoppable(make([FX, ONLY_1], reuse_port=True))
            bound = await nursery.start(first.run)
            assert bound.stream.port != 0 and bound.http.port != 0
            second = Stoppable(
                make(
                    [FX, ONLY_2],
                    reuse_port=True,
                    stream_listen=str(bound.stream),
                    http_listen=str(bound.http),
                )
            )
            assert await nursery.start(second.run) == bound

            # HTTP: every request is a new connection; both control planes answer on the port.
            answered: set[str] = set()
            for _ in range(TRIES):
                assert (await http_get(f"http://{bound.http}/healthz"))[0] == 200
                answered.add(await _who_answers(str(bound.http)))
                if len(answered) == 2:
                    break
            assert answered == {"first", "second"}

            # WebSocket: subscribers to the one stream port land on both data planes, and a
            # subscription works on either (both follow FX).
            async with trio.open_nursery() as clients:
                for _ in range(TRIES):
                    ws = await trio_websocket.connect_websocket_url(
                        clients, f"ws://{bound.stream}/v1/stream"
                    )
                    await ws.send_message(
                        orjson.dumps(
                            {"op": "subscribe", "feed": "tracking", "fixture": FX}
                        ).decode()
                    )
                    assert (await next_of_type(ws, "subscribed"))["fixture"] == FX
                    frame = await next_of_type(ws, "frame")
                    assert frame["data"]["id"] == FX
                    if len(first.gateway.registry) and len(second.gateway.registry):
                        break
                assert len(first.gateway.registry) > 0
                assert len(second.gateway.registry) > 0
                clients.cancel_scope.cancel()

            # One stops (a restart, say): the other takes every new connection on both ports.
            await first.stop()
            for _ in range(8):
                assert await _who_answers(str(bound.http)) == "second"
            async with trio_websocket.open_websocket_url(f"ws://{bound.stream}/v1/stream") as ws:
                await ws.send_message(
                    orjson.dumps(
                        {"op": "subscribe", "feed": "tracking", "fixture": ONLY_2}
                    ).decode()
                )
                assert (await next_of_type(ws, "subscribed"))["fixture"] == ONLY_2
            nursery.cancel_scope.cancel()


@needs_reuse_port
async def test_port_0_with_reuse_port_gives_each_gateway_its_own_ports(tmp_path: Path) -> None:
    with trio.fail_after(GUARD):
        async with simulator(tmp_path) as make, trio.open_nursery() as nursery:
            one = await nursery.start(Stoppable(make([FX], reuse_port=True)).run)
            two = await nursery.start(Stoppable(make([FX], reuse_port=True)).run)
            assert one.stream.port != two.stream.port
            assert one.http.port != two.http.port
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("listener", "first_reuses", "second_reuses"),
    [
        ("stream_listen", False, False),
        ("http_listen", False, False),
        # Every socket on the address must set SO_REUSEPORT, the first one too.
        pytest.param("stream_listen", False, True, marks=needs_reuse_port),
        pytest.param("http_listen", True, False, marks=needs_reuse_port),
    ],
)
async def test_without_reuse_port_the_second_start_fails_naming_the_listener(
    tmp_path: Path, listener: str, first_reuses: bool, second_reuses: bool
) -> None:
    with trio.fail_after(GUARD):
        async with simulator(tmp_path) as make, trio.open_nursery() as nursery:
            first = Stoppable(make([FX], reuse_port=first_reuses))
            bound = await nursery.start(first.run)
            taken = bound.stream if listener == "stream_listen" else bound.http
            second = Stoppable(make([FX], reuse_port=second_reuses, **{listener: str(taken)}))
            with pytest.raises(BaseException) as info:
                await nursery.start(second.run)
            errors = [e for e in _flatten(info.value) if isinstance(e, ListenError)]
            assert len(errors) == 1, info.value
            error = errors[0]
            assert error.errno == errno.EADDRINUSE
            assert isinstance(error, OSError)  # what callers caught before ListenError
            assert str(error).startswith(f"cannot listen on {taken} ({listener}): ")
            assert "reuse_port" in str(error) or "SO_REUSEPORT" in str(error)
            assert second.gateway.bound is None
            # The first gateway is untouched.
            assert (await http_get(f"http://{bound.http}/healthz"))[0] == 200
            nursery.cancel_scope.cancel()


@needs_reuse_port
async def test_open_listen_sockets_with_reuse_port_shares_the_port() -> None:
    with trio.fail_after(GUARD):
        first = await open_listen_sockets("127.0.0.1", 0, name="x_listen", reuse_port=True)
        port = first[0].getsockname()[1]
        second = await open_listen_sockets("127.0.0.1", port, name="x_listen", reuse_port=True)
        try:
            for sock in (*first, *second):
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
                assert sock.getblocking() is False
            assert second[0].getsockname() == ("127.0.0.1", port)
            # Port 0 with reuse_port: a free port of its own, not one already shared.
            third = await open_listen_sockets("127.0.0.1", 0, name="x_listen", reuse_port=True)
            assert third[0].getsockname()[1] != port
            third[0].close()
        finally:
            for sock in (*first, *second):
                sock.close()


async def test_open_listen_sockets_without_reuse_port_names_the_listener() -> None:
    with trio.fail_after(GUARD):
        first = await open_listen_sockets("127.0.0.1", 0, name="x_listen")
        port = first[0].getsockname()[1]
        try:
            assert first[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
            with pytest.raises(ListenError) as info:
                await open_listen_sockets("127.0.0.1", port, name="x_listen")
            assert info.value.errno == errno.EADDRINUSE
            message = str(info.value)
            assert message.startswith(f"cannot listen on 127.0.0.1:{port} (x_listen): ")
            assert "another process holds it" in message
            assert "reuse_port = true" in message
        finally:
            first[0].close()


async def test_a_hostname_with_several_addresses_gets_one_port_for_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A name with two addresses (as localhost may have 127.0.0.1 and ::1): one socket each,
    # and with port 0 both on the port the first got, the one the gateway reports.
    async def two_addresses(host: str, port: int, **_: Any) -> list[Any]:
        assert host == "gateway.test"
        tcp = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
        return [(*tcp, ("127.0.0.1", port)), (*tcp, ("127.0.0.2", port))]

    monkeypatch.setattr(trio.socket, "getaddrinfo", two_addresses)
    with trio.fail_after(GUARD):
        sockets = await open_listen_sockets("gateway.test", 0, name="x_listen")
        try:
            names = [s.getsockname() for s in sockets]
            assert [host for host, _ in names] == ["127.0.0.1", "127.0.0.2"]
            assert names[0][1] == names[1][1] != 0
        finally:
            for sock in sockets:
                sock.close()


async def test_a_platform_without_so_reuseport_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gateway.listen, "REUSE_PORT_SUPPORTED", False)
    with trio.fail_after(GUARD), pytest.raises(ListenError, match="lacks"):
        await open_listen_sockets("127.0.0.1", 0, name="stream_listen", reuse_port=True)


@needs_reuse_port
async def test_a_kernel_that_refuses_so_reuseport_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An old kernel has the constant in Python but answers ENOPROTOOPT.
    opened: list[socket.socket] = []
    real = socket.socket

    class Refusing(real):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

        def setsockopt(self, level: int, option: int, value: Any, *rest: Any) -> None:
            if option == socket.SO_REUSEPORT:
                raise OSError(errno.ENOPROTOOPT, "Protocol not available")
            super().setsockopt(level, option, value, *rest)

    monkeypatch.setattr(socket, "socket", Refusing)
    with trio.fail_after(GUARD), pytest.raises(ListenError) as info:
        await open_listen_sockets("127.0.0.1", 0, name="http_listen", reuse_port=True)
    assert str(info.value) == (
        "cannot listen on 127.0.0.1:0 (http_listen): the system refused SO_REUSEPORT "
        "(Protocol not available)"
    )
    assert info.value.errno == errno.ENOPROTOOPT
    assert opened and all(s.fileno() == -1 for s in opened)  # closed, not leaked
