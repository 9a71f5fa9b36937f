"""The Redis test kit itself (``tests/redis_kit.py``): a redis-server of the test's own.

Checked through coredis under trio, as the cluster mode will use it: the server answers on its
URL (TCP) and unix socket and is the process the kit started; ``restart(keep_data=True)`` with
persistence keeps an acknowledged write, also after SIGKILL (``appendfsync always``), and
``keep_data=False`` loses it; a killed server refuses connections at once; a paused one times
out; a port taken between choosing and binding it makes the kit try another; a binary that does
not start fails within the start deadline, with its log. The fail-in-CI / skip-elsewhere rule
is checked too. Real sockets and processes, ``trio.fail_after`` on every test.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import coredis
import pytest
import trio
from coredis.exceptions import AuthenticationRequiredError, ConnectionError
from coredis.retry import NoRetryPolicy

import tests.redis_kit as kit
from tests.conftest import require_redis
from tests.redis_kit import RedisServer, RedisStartError

#: Room for a loaded 2-core machine; the kit's own start deadline is 10 s.
DEADLINE = 30


@asynccontextmanager
async def client(
    url: str, *, stream_timeout: float | None = None
) -> AsyncIterator[coredis.Redis[bytes]]:
    """A coredis client that fails at once instead of retrying (its default retries twice)."""
    async with coredis.Redis.from_url(
        url, retry_policy=NoRetryPolicy(), stream_timeout=stream_timeout
    ) as c:
        yield c


async def test_starts_its_own_server_on_tcp_and_unix_socket(redis_server: RedisServer) -> None:
    with trio.fail_after(DEADLINE):
        assert redis_server.port != 6379
        assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
        async with client(redis_server.url) as tcp, client(redis_server.unix_url) as unix:
            assert await tcp.ping() == b"PONG"
            await tcp.set("k", "v")
            assert await unix.get("k") == b"v"  # one server behind both
            info = await tcp.info("server")
            assert info["process_id"] == redis_server.pid
            assert info["tcp_port"] == redis_server.port
            assert await tcp.config_get(["save", "appendonly"]) == {
                b"save": b"",
                b"appendonly": b"no",
            }


async def test_password_is_required_and_in_the_url(
    redis_factory: Callable[..., RedisServer],
) -> None:
    with trio.fail_after(DEADLINE):
        server = redis_factory(password="s3cret-pw")
        assert server.url == f"redis://:s3cret-pw@127.0.0.1:{server.port}/0"
        async with client(server.url) as c:
            assert await c.ping() == b"PONG"
        async with client(f"redis://127.0.0.1:{server.port}/0") as c:
            with pytest.raises(AuthenticationRequiredError):
                await c.ping()


async def test_restart_with_persistence_keeps_data_and_without_loses_it(
    redis_factory: Callable[..., RedisServer],
) -> None:
    with trio.fail_after(DEADLINE):
        server = redis_factory(persistence=True)
        port, pid = server.port, server.pid
        async with client(server.url) as c:
            await c.set("kept", "1")
            await server.arestart(keep_data=True)
            assert (server.port, server.running) == (port, True)
            assert server.pid != pid
            assert await c.get("kept") == b"1"  # the client reconnects by itself

            await c.set("acked", "2")  # acknowledged, then a crash: appendfsync always
            await server.akill()
            await server.arestart(keep_data=True)
            assert await c.get("acked") == b"2"

            await server.arestart(keep_data=False)
            assert server.port == port
            assert await c.get("kept") is None
            assert await c.dbsize() == 0


async def test_without_persistence_a_restart_starts_empty(redis_server: RedisServer) -> None:
    with trio.fail_after(DEADLINE):
        async with client(redis_server.url) as c:
            await c.set("k", "v")
            await redis_server.arestart(keep_data=False)
            assert await c.dbsize() == 0
        with pytest.raises(ValueError, match="persistence"):
            redis_server.restart(keep_data=True)


async def test_a_killed_server_refuses_at_once(redis_server: RedisServer) -> None:
    with trio.fail_after(DEADLINE):
        async with client(redis_server.url) as c:
            assert await c.ping() == b"PONG"
            await redis_server.akill()
            assert not redis_server.running
            with trio.fail_after(2), pytest.raises(ConnectionError):
                await c.ping()
        await redis_server.astop()  # already down: nothing to do


async def test_a_paused_server_times_out_and_resumes(redis_server: RedisServer) -> None:
    with trio.fail_after(DEADLINE):
        async with client(redis_server.url, stream_timeout=0.3) as c:
            assert await c.ping() == b"PONG"
            redis_server.pause()
            try:
                with trio.fail_after(5), pytest.raises(TimeoutError):
                    await c.ping()
            finally:
                redis_server.resume()
            assert await c.ping() == b"PONG"


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port of 127.0.0.1 that this test holds (listening) throughout."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


async def test_a_port_taken_meanwhile_makes_it_try_another(
    redis_factory: Callable[..., RedisServer],
    taken_port: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(DEADLINE):
        offered = [taken_port]
        real = kit.free_port
        monkeypatch.setattr(kit, "free_port", lambda: offered.pop() if offered else real())
        server = redis_factory()
        assert server.port_retries == 1
        assert server.port != taken_port
        assert "Address already in use" in server.log_text()
        async with client(server.url) as c:
            assert await c.ping() == b"PONG"


def test_a_server_that_does_not_start_fails_with_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL: cannot start (fake)'\nexit 3\n")
    fake.chmod(0o755)
    server = RedisServer(executable=str(fake), start_timeout=5)
    try:
        with pytest.raises(RedisStartError, match=r"(?s)status 3.*FATAL: cannot start"):
            server.start()
        assert not server.running
    finally:
        server.close()
    assert not server.directory.exists()


def test_missing_redis_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kit.REDIS_ENV, "/nonexistent/redis-server")
    assert "/nonexistent/redis-server" in (kit.redis_unavailable() or "")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="cannot run in CI"):
        require_redis()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_redis()
