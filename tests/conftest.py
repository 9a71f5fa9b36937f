"""Shared test rules and fixtures.

Rules for every test module here:
- Real sockets bind 127.0.0.1 port 0; nothing assumes a fixed port or a fast machine.
- Time-dependent logic (backoff, timeouts) is tested with ``trio.testing.MockClock
  (autojump_threshold=0)`` over memory streams only: with real sockets the autojump fires while
  the kernel is still moving bytes and produces false timeouts.
- Every test has a hard guard (pytest-timeout, see pyproject.toml) and real-socket tests add a
  ``trio.fail_after`` with generous room for a loaded 2-core machine.
- The upstream token used in tests is ``TEST_TOKEN``; the leak checks grep for it.
- Redis: a test's own ``redis-server`` (``redis_server``, ``redis_factory``; a primary, a
  replica and three sentinels: ``sentinel_group``; see ``tests/redis_kit.py``), never a
  system one. Without redis-server the test fails in CI
  (``CI=true``) and skips elsewhere, saying why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, Final

import pytest

from tests.redis_kit import RedisServer, SentinelGroup, redis_unavailable

TEST_TOKEN: Final = "tok-SECRET-5f0c2e9a-never-log-me"


def require_tool(what: str, reason: str | None) -> None:
    """Fail (in CI: ``CI=true``) or skip (elsewhere) the calling test when *reason* says why
    a tool it needs (*what*) cannot run here; nothing when *reason* is None."""
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{what} tests cannot run in CI: {reason}")
        pytest.skip(reason)


def require_redis() -> None:
    """Fail (in CI) or skip (elsewhere) the calling test when no redis-server can run here."""
    require_tool("Redis", redis_unavailable())


@pytest.fixture
def redis_factory() -> Iterator[Callable[..., RedisServer]]:
    """Starts ``RedisServer(**kwargs)`` (each on its own port); all are killed afterwards."""
    require_redis()
    servers: list[RedisServer] = []

    def start(**kwargs: Any) -> RedisServer:
        server = RedisServer(**kwargs)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.close()


@pytest.fixture
def sentinel_group() -> Iterator[SentinelGroup]:
    """A primary, its replica and three sentinels (``tests/redis_kit.py``), killed afterwards."""
    require_redis()
    with SentinelGroup() as group:
        yield group


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    """A started redis-server without persistence, killed after the test."""
    return redis_factory()


@pytest.fixture
def root_restored() -> Iterator[None]:
    """The root logger's handlers and level, and warnings capture, as they were before the test
    (for tests that call ``configure_logging``)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.captureWarnings(False)
