"""The simulator's WebSocket server: routing, handshake checks, auth, streaming, faults.

Each TCP connection is handled by one task that owns a small nursery: trio-websocket's reader
task, then the session's own tasks (client reader, heartbeats, data). Whatever ends a session -
the client closing, a fault, the fixture being removed, the server being cancelled - goes
through :meth:`_Session.finish`, which records how to end and cancels the session's tasks; the
connection handler then closes the socket that way (a close frame with a code, or a bare TCP
close). Nothing that happens on one connection escapes its handler.
"""

from __future__ import annotations

import logging
import math
import pathlib
import random
import re
import urllib.parse
from collections.abc import Collection, Mapping
from typing import Final

import attrs
import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)

from gateway.simulator import _messages as msg
from gateway.simulator._fastpath import Action
from gateway.simulator._faults import Attempt, Faults, Outcome
from gateway.simulator._fixture import (
    DEFAULT_SILENCE_TIMEOUT,
    DEFAULT_STATUS_CHECK_INTERVAL,
    FixtureKind,
    ScorerState,
    SimFixture,
)
from gateway.wire import CLOSE_ABNORMAL, CLOSE_GOING_AWAY, CLOSE_POLICY_VIOLATION

logger = logging.getLogger("gateway.simulator")

DEFAULT_HEARTBEAT_INTERVAL: Final = 10.0
DEFAULT_RATE_HZ: Final = 25.0
DEFAULT_ACTION_INTERVAL: Final = 3.0
REQUEST_TIMEOUT: Final = 10.0
"""Seconds a client has to send its HTTP upgrade request after connecting."""
AUTH_TIMEOUT: Final = 30.0
"""Seconds a client has to send its auth message after the handshake."""
CLOSE_TIMEOUT: Final = 2.0
"""Seconds to wait for the client's answer to our close frame before closing TCP anyway."""
STALL_POLL: Final = 0.01
"""How often a stalled connection looks whether the stall was lifted."""
MESSAGE_QUEUE_SIZE: Final = 16
MAX_CLIENT_MESSAGE: Final = 64 * 1024
ACCEPT_MEDIA_TYPE: Final = "application/vnd.imggaming.dde.api+json;version=1"
REPLAY_MAX_PPS: Final = 1000

_FASTPATH_PATH: Final = re.compile(r"/fixtures/(?P<id>[^/]+)/")


@attrs.frozen
class _Ending:
    """How a session ends: ``code`` None means a bare TCP close (no close frame)."""

    code: int | None
    reason: str = ""


def _how_it_ended(session: _Session) -> str:
    """The end of the per-connection log line: who closed, and with which code."""
    if session.peer_close is not None:
        if session.peer_close == CLOSE_ABNORMAL:
            return "client left, no close frame"
        return f"client closed {session.peer_close}"
    if session.ending is None:
        return "server stopping"
    if session.ending.code is None:
        return "no close frame"
    return f"close {session.ending.code}"


class _Session:
    """One accepted WebSocket connection and its protocol state."""

    def __init__(
        self,
        sim: Simulator,
        ws: WebSocketConnection,
        attempt: Attempt,
        rng: random.Random,
    ) -> None:
        self.sim = sim
        self.ws = ws
        self.attempt = attempt
        self.rng = rng
        self.fixture: SimFixture | None = None
        self.frames_sent = 0
        self.ending: _Ending | None = None
        # The client's close code when it closed first (1006: it sent no close frame).
        self.peer_close: int | None = None
        self.scope = trio.CancelScope()

    def finish(self, code: int | None, reason: str = "") -> None:
        """End the session (first call wins): ``code`` None drops TCP without a close frame."""
        if self.ending is None:
            self.ending = _Ending(code, reason)
        self.scope.cancel()

    def peer_closed(self, exc: ConnectionClosed) -> None:
        """The client closed (or dropped) the connection: remember its code, end the session."""
        if self.ending is None and self.peer_close is None:
            self.peer_close = CLOSE_ABNORMAL if exc.reason is None else exc.reason.code
        self.finish(None)

    def _stalled(self) -> bool:
        if self.sim.connection_faults.stall:
            return True
        return self.fixture is not None and self.fixture.faults.stall

    async def send(self, text: str) -> None:
        """Send one message; waits while a stall fault is set. A closed peer ends the session."""
        # Faults is plain data that tests flip directly, so there is no event to wait on: poll.
        while self._stalled():  # noqa: ASYNC110
            await trio.sleep(STALL_POLL)
        try:
            await self.ws.send_message(text)
        except ConnectionClosed as exc:
            self.peer_closed(exc)
            await trio.lowlevel.checkpoint()

    async def send_data(self, text: str) -> None:
        """Send one data frame, applying the fixture's drop and malformed-frame faults."""
        assert self.fixture is not None
        faults = self.fixture.faults
        if self._should_drop(faults):
            await trio.lowlevel.checkpoint()  # raises Cancelled: finish() cancelled us
            return
        if faults.malformed_frames > 0:
            faults.malformed_frames -= 1
            await self.send(msg.MALFORMED_FRAME)
        await self.send(text)
        self.frames_sent += 1
        if faults.drop_after_frames is not None and self.frames_sent >= faults.drop_after_frames:
            self._drop(faults)

    def _should_drop(self, faults: Faults) -> bool:
        if faults.drop_after_frames is not None and self.frames_sent >= faults.drop_after_frames:
            self._drop(faults)
            return True
        if faults.drop_probability > 0 and self.rng.random() < faults.drop_probability:
            self._drop(faults)
            return True
        return False

    def _drop(self, faults: Faults) -> None:
        self.attempt.outcome = Outcome.DROPPED
        self.finish(faults.drop_close_code, "simulated drop")

    async def receive(self) -> str | bytes:
        """The next client message; a closed peer ends the session."""
        try:
            return await self.ws.get_message()
        except ConnectionClosed as exc:
            self.peer_closed(exc)
            await trio.sleep_forever()  # cancelled by finish() at once
            raise AssertionError("unreachable") from None

    async def heartbeats(self) -> None:
        interval = self.sim.heartbeat_interval
        next_at = trio.current_time() + interval
        while True:
            await trio.sleep_until(next_at)
            await self.send(msg.heartbeat())
            next_at = max(next_at + interval, trio.current_time())

    async def drain(self) -> None:
        """Read and ignore client messages (the vendor ignores them; reading keeps pings alive)."""
        while True:
            await self.receive()

    # -- auth -------------------------------------------------------------------------------

    async def authenticate(self, fixture: SimFixture | None) -> bool:
        """Read the auth message and answer it. False: the session is ending."""
        raw: str | bytes | None = None
        with trio.move_on_after(AUTH_TIMEOUT):
            raw = await self.receive()
        if raw is None:
            self.finish(CLOSE_POLICY_VIOLATION, "no auth message")
            return False
        token = _auth_token(raw)
        if token is None:
            self.attempt.outcome = Outcome.BAD_AUTH_FORMAT
            await self.send(msg.AUTH_BAD_FORMAT)
            self.finish(CLOSE_POLICY_VIOLATION, "bad auth format")
            return False
        rejected = self.sim.connection_faults.reject_auth or (
            fixture is not None and fixture.faults.reject_auth
        )
        if rejected or not self.sim.token_ok(token):
            await self.reject_auth()
            return False
        self.attempt.outcome = Outcome.AUTHORIZED
        close_code = self.sim.connection_faults.close_after_auth_code
        if close_code is None and fixture is not None:
            close_code = fixture.faults.close_after_auth_code
        if fixture is None or fixture.kind == "tracking":
            await self.send(msg.AUTH_ACCEPTED)
        if close_code is not None:
            self.attempt.outcome = Outcome.CLOSED_AFTER_AUTH
            self.finish(close_code, "simulated restart")
            return False
        return True

    async def reject_auth(self) -> None:
        self.attempt.outcome = Outcome.UNAUTHORIZED
        await self.send(msg.AUTH_REJECTED)
        self.finish(CLOSE_POLICY_VIOLATION, "unauthorized")

    # -- tracking ---------------------------------------------------------------------------

    async def run_tracking(self, nursery: trio.Nursery) -> None:
        if not await self.authenticate(None):
            return
        nursery.start_soon(self.heartbeats)
        while True:
            raw = await self.receive()
            if self.fixture is not None:
                continue  # once a request was accepted, later ones are ignored
            request = _parse_fixture_request(raw)
            if isinstance(request, str):
                await self.send(request)
                continue
            fixture_id, backfill, replay = request
            fixture = self.sim.fixtures.get(fixture_id)
            self.attempt.fixture_id = fixture_id
            if fixture is None or fixture.kind != "tracking":
                self.attempt.outcome = Outcome.UNKNOWN_FIXTURE
                await self.send(msg.unknown_fixture(fixture_id))
                continue
            self.fixture = fixture
            self.sim._register(self, fixture)
            # The fixture is known only now: its auth faults act here (see Faults).
            if fixture.faults.reject_auth:
                await self.reject_auth()
                return
            if fixture.faults.close_after_auth_code is not None:
                self.attempt.outcome = Outcome.CLOSED_AFTER_AUTH
                self.finish(fixture.faults.close_after_auth_code, "simulated restart")
                return
            self.attempt.outcome = Outcome.STREAMING
            if replay is not None:
                self.sim.replay_requests.append(ReplaySeen(fixture_id, backfill, replay))
            logger.debug("tracking fixture %s requested (backfill %s)", fixture_id, backfill)
            nursery.start_soon(self.stream_tracking, fixture, backfill, replay)

    async def stream_tracking(
        self, fixture: SimFixture, backfill: int | None, replay: _Replay | None
    ) -> None:
        end = fixture.available()
        if backfill is None or backfill == -1:
            start = 0
        elif backfill == 0:
            start = end
        else:
            start = max(0, end - backfill)
        ix = start
        if replay is not None:
            # A replay is the backfill paced at packetsPerSecond; looped repeats it for ever,
            # otherwise the live frames follow, from where the replay's range ended.
            period = 1.0 / replay.packets_per_second
            next_at = trio.current_time()
            while True:
                for i in range(start, end):
                    await trio.sleep_until(next_at)
                    await self.send_data(fixture.frame_text(i))
                    next_at = max(next_at + period, trio.current_time() - period)
                if not replay.looped or start >= end:
                    break
            ix = end
        while True:
            if ix >= fixture.available():
                await fixture.wait_frame(ix)
            await self.send_data(fixture.frame_text(ix))
            ix += 1

    # -- fastpath ---------------------------------------------------------------------------

    async def run_fastpath(
        self, nursery: trio.Nursery, fixture: SimFixture, start_position: int
    ) -> None:
        self.fixture = fixture
        self.attempt.fixture_id = fixture.id
        if not await self.authenticate(fixture):
            return
        self.attempt.outcome = Outcome.STREAMING
        nursery.start_soon(self.drain)
        nursery.start_soon(self.heartbeats)
        seq = 0
        pos = len(fixture.log)
        # The backlog: every action from startPosition on (old status packets are history).
        for entry in fixture.log[:pos]:
            if isinstance(entry, Action) and entry.index >= start_position:
                seq += 1
                await self.send_data(entry.text(seq))
        if fixture.scorer_state is ScorerState.DISCONNECTED:
            await self.send_data(msg.connection_state(ScorerState.DISCONNECTED.value))
        while True:
            await fixture.wait_log(pos)
            while pos < len(fixture.log):
                entry = fixture.log[pos]
                pos += 1
                if isinstance(entry, Action):
                    if entry.index < start_position:
                        continue
                    seq += 1
                    await self.send_data(entry.text(seq))
                else:
                    await self.send_data(entry.text)


@attrs.frozen
class _Replay:
    packets_per_second: int
    looped: bool


@attrs.frozen
class ReplaySeen:
    """An accepted Replay Fixture Request, as the simulator saw it (tests look)."""

    fixture_id: str
    backfill: int | None
    replay: _Replay


def _auth_token(raw: str | bytes) -> str | None:
    """The token of a well-formed auth message, else None."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    token = doc.get("authToken")
    return token if isinstance(token, str) else None


def _parse_fixture_request(raw: str | bytes) -> tuple[str, int | None, _Replay | None] | str:
    """(fixture id, backfill, replay or None), or the ERROR message text to answer with."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return msg.REQUEST_BAD_FORMAT
    if not isinstance(doc, dict) or not isinstance(doc.get("fixtureId"), str):
        return msg.REQUEST_BAD_FORMAT
    fixture_id: str = doc["fixtureId"]
    backfill = doc.get("backfill")
    if backfill is not None and (type(backfill) is not int or backfill < -1):
        return msg.BAD_BACKFILL
    replay: _Replay | None = None
    spec = doc.get("replay")
    if spec is not None:
        if not isinstance(spec, dict):
            return msg.BAD_REPLAY
        enabled = spec.get("enabled")
        pps = spec.get("packetsPerSecond")
        looped = spec.get("looped", False)
        if type(enabled) is not bool or type(looped) is not bool:
            return msg.BAD_REPLAY
        if enabled:
            if type(pps) is not int or not 1 <= pps <= REPLAY_MAX_PPS:
                return msg.BAD_REPLAY
            replay = _Replay(pps, looped)
    return fixture_id, backfill, replay


def _accepts_dde_json(request: WebSocketRequest) -> bool:
    want = ACCEPT_MEDIA_TYPE.replace(" ", "").lower()
    for name, value in request.headers:
        if name.lower() != b"accept":
            continue
        for item in value.decode("latin-1").split(","):
            if item.replace(" ", "").lower() == want:
                return True
    return False


def _start_position(query: str) -> int | None:
    values = urllib.parse.parse_qs(query, keep_blank_values=True).get("startPosition")
    if not values:
        return 0
    try:
        value = int(values[-1])
    except ValueError:
        return None
    return value if value >= 0 else None


class Simulator:
    """A stand-in for the IMG Arena DDE WebSocket endpoints (tracking and fastpath).

    Fixtures can be added, removed and faulted while it serves. ``tokens`` None accepts any
    non-empty token. Timelines run on the trio clock from the moment a fixture is added (or from
    :meth:`serve` for fixtures added outside a trio run).
    """

    def __init__(
        self,
        *,
        tokens: Collection[str] | None = None,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        rate_hz: float = DEFAULT_RATE_HZ,
        action_interval: float = DEFAULT_ACTION_INTERVAL,
        seed: int = 0,
        status_check_interval: float = DEFAULT_STATUS_CHECK_INTERVAL,
        silence_timeout: float = DEFAULT_SILENCE_TIMEOUT,
    ) -> None:
        for name, value in (
            ("heartbeat_interval", heartbeat_interval),
            ("rate_hz", rate_hz),
            ("action_interval", action_interval),
            ("status_check_interval", status_check_interval),
            ("silence_timeout", silence_timeout),
        ):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        self._tokens: frozenset[str] | None = None
        self.set_tokens(tokens)
        self.heartbeat_interval = heartbeat_interval
        self.rate_hz = rate_hz
        self.action_interval = action_interval
        self.seed = seed
        self.status_check_interval = status_check_interval
        self.silence_timeout = silence_timeout
        self._fixtures: dict[str, SimFixture] = {}
        self.attempts: list[Attempt] = []
        #: Every accepted tracking request with a replay, in order.
        self.replay_requests: list[ReplaySeen] = []
        self.active_connections = 0
        self.connection_faults = Faults()
        """Faults for every connection, read before its fixture is known (see :class:`Faults`)."""
        self._nursery: trio.Nursery | None = None
        self._scorers: dict[str, trio.CancelScope] = {}
        self._sessions: dict[str, set[_Session]] = {}
        self._conn_counter = 0

    @property
    def fixtures(self) -> Mapping[str, SimFixture]:
        return self._fixtures

    def set_tokens(self, tokens: Collection[str] | None) -> None:
        """Replace the accepted tokens (None: any non-empty token). Open connections stay."""
        if isinstance(tokens, str):
            raise TypeError("tokens must be a collection of strings, not a string")
        self._tokens = None if tokens is None else frozenset(tokens)

    def token_ok(self, token: str) -> bool:
        if not token:
            return False
        return self._tokens is None or token in self._tokens

    def add_fixture(
        self,
        fixture_id: str,
        *,
        kind: FixtureKind = "tracking",
        rate_hz: float | None = None,
        seed: int | None = None,
        recording: pathlib.Path | None = None,
    ) -> SimFixture:
        """Add a fixture; its timeline starts now. ValueError if the id is taken or bad."""
        if fixture_id in self._fixtures:
            raise ValueError(f"fixture {fixture_id!r} already exists")
        if recording is not None and kind != "tracking":
            raise ValueError("a recording can only replace a tracking fixture's frames")
        fixture = SimFixture(
            fixture_id,
            kind,
            rate_hz=self.rate_hz if rate_hz is None else rate_hz,
            seed=self.seed if seed is None else seed,
            action_interval=self.action_interval,
            recording=recording,
            status_check_interval=self.status_check_interval,
            silence_timeout=self.silence_timeout,
        )
        try:
            fixture.start_clock(trio.current_time())
        except RuntimeError:
            pass  # outside trio.run: serve() starts the clock
        self._fixtures[fixture_id] = fixture
        self._sessions[fixture_id] = set()
        if self._nursery is not None:
            self._start_scorer(fixture, self._nursery)
        return fixture

    def remove_fixture(self, fixture_id: str) -> None:
        """Remove a fixture: its connections close with 1001. KeyError if unknown."""
        fixture = self._fixtures.pop(fixture_id)
        fixture.removed.set()
        scope = self._scorers.pop(fixture_id, None)
        if scope is not None:
            scope.cancel()
        for session in self._sessions.pop(fixture_id, set()):
            session.finish(CLOSE_GOING_AWAY, "fixture removed")

    def sessions(self, fixture_id: str) -> int:
        """How many connections stream *fixture_id* now (0 for an unknown fixture).

        A connection counts once it is bound to the fixture: a fastpath one from its handshake,
        a tracking one from its accepted fixture request, until it ends. A gateway cluster must
        keep this at most 1 per fixture.
        """
        return len(self._sessions.get(fixture_id, ()))

    def faults(self, fixture_id: str) -> Faults:
        """The live fault switches of a fixture. KeyError if unknown."""
        return self._fixtures[fixture_id].faults

    def _start_scorer(self, fixture: SimFixture, nursery: trio.Nursery) -> None:
        if fixture.kind != "fastpath" or fixture.id in self._scorers:
            return
        fixture.start_clock(trio.current_time())
        scope = trio.CancelScope()
        self._scorers[fixture.id] = scope

        async def scorer() -> None:
            with scope:
                await fixture.run_scorer()

        nursery.start_soon(scorer)

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` and serve until cancelled; ``started(bound_port)``.

        On cancellation every connection is closed (their tasks are cancelled; sockets close).
        Errors of one connection are logged and end only that connection.
        """
        if self._nursery is not None:
            raise RuntimeError("this Simulator is already serving")
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                now = trio.current_time()
                for fixture in self._fixtures.values():
                    fixture.start_clock(now)
                    self._start_scorer(fixture, nursery)
                await nursery.start(trio.serve_listeners, self._handle_stream, listeners)
                logger.info("simulator listening on %s:%d", host, bound)
                task_status.started(bound)
        finally:
            self._nursery = None
            for scope in self._scorers.values():
                scope.cancel()
            self._scorers.clear()

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        self._conn_counter += 1
        conn_no = self._conn_counter
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await self._handle_connection(stream, nursery, conn_no)
                finally:
                    nursery.cancel_scope.cancel()
        except* ConnectionClosed:
            pass  # the client left mid-handshake: nothing to do but close
        except* Exception:
            logger.exception("simulator connection %d failed", conn_no)
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle_connection(
        self, stream: trio.SocketStream, nursery: trio.Nursery, conn_no: int
    ) -> None:
        attempt = Attempt(at=trio.current_time(), path="", fixture_id=None)
        request: WebSocketRequest | None = None
        with trio.move_on_after(REQUEST_TIMEOUT):
            request = await wrap_server_stream(
                nursery,
                stream,
                message_queue_size=MESSAGE_QUEUE_SIZE,
                max_message_size=MAX_CLIENT_MESSAGE,
            )
        if request is None:
            return
        attempt.path = request.path
        self.attempts.append(attempt)
        target = urllib.parse.urlsplit(request.path)
        match = _FASTPATH_PATH.search(target.path)
        fixture: SimFixture | None = None
        start_position = 0
        delay = self.connection_faults.handshake_delay
        if match is not None:
            fixture_id = urllib.parse.unquote(match["id"])
            attempt.fixture_id = fixture_id
            fixture = self._fixtures.get(fixture_id)
            rejection: tuple[int, str, Outcome] | None = None
            position = _start_position(target.query)
            if not _accepts_dde_json(request):
                rejection = (406, "not acceptable", Outcome.NOT_ACCEPTABLE)
            elif fixture is None or fixture.kind != "fastpath":
                rejection = (404, "fixture not found", Outcome.NOT_FOUND)
            elif position is None:
                rejection = (400, "startPosition must be an integer >= 0", Outcome.BAD_REQUEST)
            if rejection is not None:
                status, reason, attempt.outcome = rejection
                logger.info(
                    "conn %d %s: rejected, HTTP %d (%s)", conn_no, request.path, status, reason
                )
                await request.reject(
                    status,
                    extra_headers=[(b"content-type", b"application/json")],
                    body=msg.http_error(reason, status),
                )
                return
            assert fixture is not None and position is not None
            start_position = position
            delay = max(delay, fixture.faults.handshake_delay)
        if delay > 0:
            await trio.sleep(delay)
        ws = await request.accept()
        attempt.outcome = Outcome.ACCEPTED
        kind = "fastpath" if fixture is not None else "tracking"
        logger.debug("conn %d %s: %s connection accepted", conn_no, request.path, kind)
        session = _Session(self, ws, attempt, random.Random(f"{self.seed}/conn/{conn_no}"))
        self.active_connections += 1
        try:
            with session.scope:
                async with trio.open_nursery() as tasks:
                    if fixture is not None:
                        self._register(session, fixture)
                        await session.run_fastpath(tasks, fixture, start_position)
                    else:
                        await session.run_tracking(tasks)
        finally:
            self.active_connections -= 1
            for sessions in self._sessions.values():
                sessions.discard(session)
            # The one INFO line per connection (also when the server is being stopped).
            how = _how_it_ended(session)
            logger.info(
                "conn %d %s %s: %s after %.1f s, %d data frames (%s)",
                conn_no,
                kind,
                attempt.fixture_id or "-",
                attempt.outcome.value,
                trio.current_time() - attempt.at,
                session.frames_sent,
                how,
            )
        ending = session.ending or _Ending(1000)
        if ending.code is None:
            await trio.aclose_forcefully(stream)
        else:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await ws.aclose(ending.code, ending.reason or None)

    def _register(self, session: _Session, fixture: SimFixture) -> None:
        sessions = self._sessions.get(fixture.id)
        if sessions is None or fixture.removed.is_set():
            session.finish(CLOSE_GOING_AWAY, "fixture removed")
        else:
            sessions.add(session)
