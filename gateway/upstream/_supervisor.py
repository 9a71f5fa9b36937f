"""The supervisor: one task per followed (feed, fixture), all in one nursery.

Each fixture's :class:`~gateway.upstream._runner.FixtureRunner` runs in its own task inside the
supervisor's nursery, under its own cancel scope (so :meth:`Supervisor.remove` stops exactly that
one). Runners never raise: connection failures are outcomes and unexpected exceptions are logged,
counted and followed by a restart inside the runner, so one fixture cannot take down another or
the supervisor. All runners share one :class:`~gateway.upstream._limiter.ConnectLimiter` and
one :class:`~gateway.upstream._authgate.AuthGate` (one upstream token: one probe after a refusal).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Final

import attrs
import trio

from gateway.config import Config, FeedConfig, FixtureConfig, UpstreamSection
from gateway.histogram import Histogram
from gateway.model import FixtureStatus, FrameSink, ResumePoint
from gateway.upstream._authgate import AuthGate
from gateway.upstream._connect import Connector, open_trio_websocket_connector
from gateway.upstream._dataage import DataAge
from gateway.upstream._lean import open_websocket_connector
from gateway.upstream._limiter import ConnectLimiter
from gateway.upstream._runner import FixtureRunner, TokenReader, read_token_off_loop

logger = logging.getLogger("gateway.upstream")

#: Seconds between two looks at the token file: a rotated token is tried within about this.
TOKEN_POLL_INTERVAL: Final = 1.0


@attrs.frozen
class FixtureHandle:
    """A followed fixture as others see it. ``status`` is live (updated in place)."""

    config: FixtureConfig
    feed: FeedConfig
    status: FixtureStatus


@attrs.define
class _Entry:
    runner: FixtureRunner
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)


class Supervisor:
    """Follows fixtures upstream and feeds each one's frames to its sink.

    ``sink_for`` is called once per added fixture (from :meth:`add`, synchronously) and its
    errors propagate to the caller of :meth:`add` (or of the constructor, for configured
    fixtures). ``resume_for``, called right after it, says where the fixture's upstream goes
    on (the recorder's last frame) instead of starting with the fixture's ``backfill``.
    ``watchers(feed, fixture)``, the fixture's subscriber count, is read by the connect
    limiter whenever it picks the next of several waiting attempts: watched fixtures connect
    first (``gateway.upstream._limiter``).
    ``connect`` replaces the configured connector (tests); ``rng`` seeds the backoff jitter
    of every fixture; ``read_token`` replaces the token reader (tests under ``MockClock``,
    where the default's worker thread would let virtual time jump).
    """

    def __init__(
        self,
        config: Config,
        sink_for: Callable[[FeedConfig, FixtureConfig], FrameSink],
        *,
        connect: Connector | None = None,
        rng: random.Random | None = None,
        read_token: TokenReader = read_token_off_loop,
        resume_for: Callable[[FeedConfig, FixtureConfig], ResumePoint | None] | None = None,
        watchers: Callable[[str, str], int] | None = None,
    ) -> None:
        self._config = config
        self._read_token = read_token
        self._sink_for = sink_for
        self._resume_for = resume_for
        self._watchers = watchers
        self._connect = connect
        self._rng = rng if rng is not None else random.Random()
        self._limiter = ConnectLimiter(config.upstream.connect_rate)
        self._gate = AuthGate()
        self._entries: dict[tuple[str, str], _Entry] = {}
        # Per feed name, created with its first fixture; kept across reloads and stops.
        self._data_age: dict[str, DataAge] = {}
        self._pending: list[_Entry] = []
        self._nursery: trio.Nursery | None = None
        self._active_connect: Connector | None = None
        for fixture in config.fixtures:
            self.add(fixture)

    @property
    def config(self) -> Config:
        return self._config

    @property
    def data_age(self) -> Mapping[str, Histogram]:
        """Per feed: how stale the vendor's frames were on arrival (``gateway.upstream.
        _dataage``); a feed appears with its first fixture."""
        return self._data_age

    @property
    def limiter(self) -> ConnectLimiter:
        return self._limiter

    @property
    def gate(self) -> AuthGate:
        return self._gate

    @property
    def connector(self) -> Connector | None:
        """The connector in use while :meth:`run` runs (None before and after)."""
        return self._active_connect

    def _upstream(self) -> UpstreamSection:
        return self._config.upstream

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow every added fixture until cancelled.

        Reports started once every fixture task is spawned (not connected). On cancellation
        each upstream connection is closed with a close handshake bounded by the connector's
        disconnect timeout, all in parallel, and every fixture's status becomes ``stopped``.
        """
        if self._nursery is not None:
            raise RuntimeError("Supervisor.run is already running")
        async with AsyncExitStack() as stack:
            connect = self._connect
            if connect is None:
                # The lean client by default; trio-websocket stays selectable as a fallback.
                opener = (
                    open_trio_websocket_connector
                    if self.config.upstream.client == "trio-websocket"
                    else open_websocket_connector
                )
                connect = await stack.enter_async_context(opener())
            self._active_connect = connect
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    pending, self._pending = self._pending, []
                    for entry in pending:
                        nursery.start_soon(self._follow, entry)
                    task_status.started()
                    # Keeps the nursery open for fixtures added later, even with none running.
                    await self._watch_token_file()
            finally:
                self._nursery = None
                self._active_connect = None

    async def _watch_token_file(self) -> None:
        """Poll the token file; when it changes, fixtures waiting after a refused token retry
        at once (the operator rotated it) instead of after their backoff.

        A ``stat`` per second, on the event loop: a metadata read of one small local file (the
        credentials directory) takes microseconds, and a worker thread here would let a test's
        autojump clock jump while it runs.
        """
        seen: tuple[int, int, int] | None = None
        path: Path | None = None
        while True:
            token_file = self._config.upstream.token_file
            if token_file != path:
                path, seen = token_file, None  # reloaded: another file is a new baseline
            if token_file is not None:
                try:
                    st = os.stat(os.path.expandvars(str(token_file)))
                    now = (st.st_mtime_ns, st.st_size, st.st_ino)
                except OSError:
                    now = (0, 0, 0)
                if seen is not None and now != seen:
                    logger.info("upstream token file changed: refused fixtures retry now")
                    self._gate.release()
                seen = now
            await trio.sleep(TOKEN_POLL_INTERVAL)

    async def _follow(self, entry: _Entry) -> None:
        assert self._active_connect is not None
        runner = entry.runner
        try:
            with entry.scope:
                await runner.run_forever(self._active_connect)
        finally:
            runner.stop("supervisor stopped")

    def add(self, fixture: FixtureConfig, *, backlog: bool = False) -> bool:
        """Start following ``fixture``; False if it is already followed.

        *backlog*: a fixture never seen live (added through the API or on demand); until it
        receives a frame its attempts queue behind all others at the connect limiter.
        Raises KeyError when its feed is not configured. Safe before :meth:`run` (the fixture
        starts with it) and from any trio task.
        """
        key = fixture.key
        if key in self._entries:
            return False
        try:
            feed = self._config.feeds[fixture.feed]
        except KeyError:
            raise KeyError(f"unknown feed {fixture.feed!r}") from None
        sink = self._sink_for(feed, fixture)
        resume = self._resume_for(feed, fixture) if self._resume_for is not None else None
        runner = FixtureRunner(
            feed,
            fixture,
            sink,
            limiter=self._limiter,
            gate=self._gate,
            upstream=self._upstream,
            rng=random.Random(self._rng.getrandbits(64)),
            backlog=backlog,
            read_token=self._read_token,
            resume=resume,
            watched=self._watched(feed.name, fixture.id),
            data_age=self._data_age.setdefault(feed.name, DataAge()),
        )
        entry = _Entry(runner)
        self._entries[key] = entry
        if self._nursery is not None:
            self._nursery.start_soon(self._follow, entry)
        else:
            self._pending.append(entry)
        logger.info("upstream %s/%s: following (%s)", feed.name, fixture.id, feed.kind)
        return True

    def _watched(self, feed: str, fixture_id: str) -> Callable[[], bool] | None:
        watchers = self._watchers
        if watchers is None:
            return None
        return lambda: watchers(feed, fixture_id) > 0

    def remove(self, feed: str, fixture_id: str) -> bool:
        """Stop following; False if not followed. Its status becomes stopped and the sink is
        told now; its connection closes in the background (bounded)."""
        entry = self._entries.pop((feed, fixture_id), None)
        if entry is None:
            return False
        if entry in self._pending:
            self._pending.remove(entry)
        entry.runner.stop("removed")
        entry.scope.cancel()
        return True

    def get(self, feed: str, fixture_id: str) -> FixtureHandle | None:
        entry = self._entries.get((feed, fixture_id))
        return None if entry is None else _handle(entry)

    def handles(self) -> list[FixtureHandle]:
        return [_handle(entry) for entry in self._entries.values()]

    def update_config(self, config: Config) -> None:
        """Use ``config`` from the next attempt on: upstream parameters, token source, feed
        URLs, connect rate. Fixtures waiting after a refused token retry at once (the reload
        may carry a new token). Fixtures are not added or removed here."""
        self._config = config
        self._limiter.set_rate(config.upstream.connect_rate)
        for entry in self._entries.values():
            runner = entry.runner
            feed = config.feeds.get(runner.feed.name)
            if feed is not None:
                runner.feed = feed
        self._gate.release()


def _handle(entry: _Entry) -> FixtureHandle:
    r = entry.runner
    return FixtureHandle(config=r.fixture, feed=r.feed, status=r.status)
