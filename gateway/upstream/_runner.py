"""One fixture's upstream: connect, authenticate, subscribe, relay, and reconnect forever.

A :class:`FixtureRunner` owns one (feed, fixture) pair. Each attempt re-reads the token (off the
event loop, see :func:`read_token_off_loop`), waits for the global connect limiter, opens one
connection and runs the receive loop until the connection ends; the outcome decides the next
state and how long to wait. The runner never lets a connection error escape: a closed, refused
or stalled upstream is an outcome, not an exception.
Anything else (a bug, a sink that raises) propagates to :meth:`FixtureRunner.run_forever`, which
logs it with its traceback, counts it in ``crashes`` and restarts the loop after a backoff delay.

The token's value leaves its :class:`~gateway.config.Secret` only in the auth message handed to
``send_message``. Status details, ``last_error`` and log lines are written from fixed texts,
vendor texts, close codes and exception type names - never from an exception that could carry
the auth message.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Final, NoReturn

import attrs
import orjson
import trio

from gateway.config import FeedConfig, FixtureConfig, Secret, SecretError, UpstreamSection
from gateway.model import FixtureState, FixtureStatus, FrameSink, ResumePoint
from gateway.upstream._authgate import AuthGate
from gateway.upstream._backoff import Backoff
from gateway.upstream._classify import Kind, Message, classify_fastpath, classify_tracking
from gateway.upstream._connect import (
    Connector,
    UpstreamClosed,
    UpstreamConnection,
    UpstreamRejected,
    UpstreamUnavailable,
)
from gateway.upstream._dataage import DataAge
from gateway.upstream._limiter import ConnectLimiter, Priority
from gateway.upstream._resume import FastpathResume, TrackingResume, Verdict
from gateway.wire import CLOSE_POLICY_VIOLATION

logger = logging.getLogger("gateway.upstream")

FASTPATH_ACCEPT: Final = "application/vnd.imggaming.dde.api+json;version=1"
#: Malformed messages in a row (nothing valid between them) that end a connection: an upstream
#: sending only garbage must reach a failure state with the reason, not look connected.
MAX_MALFORMED_RUN: Final = 50
#: Longest vendor text kept in a status detail or ``last_error`` (after the token is scrubbed).
MAX_VENDOR_TEXT: Final = 200
_UNAUTHORIZED_STATUSES: Final = frozenset({401, 403})
_NOT_FOUND_STATUS: Final = 404


#: Reads the upstream token for one attempt; raises :class:`~gateway.config.SecretError`.
TokenReader = Callable[[UpstreamSection], Awaitable[Secret]]


async def read_token_off_loop(up: UpstreamSection) -> Secret:
    """The upstream token for one attempt, without blocking the event loop on file I/O.

    A token file is read in a worker thread: a slow or hung filesystem (a network mount, a
    credentials directory) must not stall every fixture's task. ``abandon_on_cancel``: a
    fixture removed or stopped during a hung read is not held up by it; the thread finishes on
    its own and its result is dropped (it only reads a file). ``token_env`` needs no I/O and is
    read in place, as before, without a thread hop.
    """
    if up.token_file is None:
        return up.read_token()
    return await trio.to_thread.run_sync(up.read_token, abandon_on_cancel=True)


class _End(enum.Enum):
    RETRY = "retry"  # backoff, then reconnect
    UNAUTHORIZED = "unauthorized"  # wait at the auth gate
    NOT_FOUND = "not_found"  # wait not_found_retry
    RESUBSCRIBE = "resubscribe"  # tracking backfill too small: reconnect at once, wider


@attrs.frozen
class _Outcome:
    end: _End
    detail: str
    live_for: float = 0.0


class SessionNext(enum.Enum):
    """What the receive loop does after a message that does not end the session."""

    CONTINUE = "continue"  # receive the next message
    SUBSCRIBE = "subscribe"  # tracking, once accepted: send the fixture request


# Module constants, so the per-frame comparison loads no enum attribute.
_CONTINUE: Final = SessionNext.CONTINUE
_SUBSCRIBE: Final = SessionNext.SUBSCRIBE


@attrs.define
class SessionState:
    """The state of one connection that :meth:`FixtureRunner.step` reads and changes."""

    tracking: bool
    # Fastpath: from the start (the URL is the subscription). Tracking: once the fixture request
    # has been sent; the receive loop sets it after the send, never the step.
    subscribed: bool
    live_since: float | None = None  # trio time of the first data or heartbeat once subscribed
    malformed_run: int = 0  # malformed messages since the last valid one

    def live_for(self, last_rx: float) -> float:
        """Healthy time, up to the last message received at *last_rx*.

        It ends with the last message: a stall's silence is not health, and counting it would
        reset the backoff of a connection that keeps stalling.
        """
        return 0.0 if self.live_since is None else max(0.0, last_rx - self.live_since)

    def closed(self, exc: UpstreamClosed, last_rx: float) -> _Outcome:
        """The outcome of a connection the upstream closed (last message at *last_rx*)."""
        code = "no close code" if exc.code is None else f"code {exc.code}"
        # A policy-violation close is how the vendor ends a refused authentication.
        if exc.code == CLOSE_POLICY_VIOLATION and self.live_since is None:
            return _Outcome(_End.UNAUTHORIZED, f"closed before going live ({code})")
        return _Outcome(_End.RETRY, f"closed by upstream ({code})", self.live_for(last_rx))


class FixtureRunner:
    """The upstream loop of one fixture. State lives here across reconnects and restarts."""

    def __init__(
        self,
        feed: FeedConfig,
        fixture: FixtureConfig,
        sink: FrameSink,
        *,
        limiter: ConnectLimiter,
        gate: AuthGate,
        upstream: Callable[[], UpstreamSection],
        rng: random.Random,
        backlog: bool = False,
        read_token: TokenReader = read_token_off_loop,
        resume: ResumePoint | None = None,
        watched: Callable[[], bool] | None = None,
        data_age: DataAge | None = None,
    ) -> None:
        self.feed = feed  # replaced on config reload; read at every attempt
        self.fixture = fixture
        self.sink = sink
        self.status = FixtureStatus(feed=feed.name, fixture=fixture.id)
        self._limiter = limiter
        # Shared by all runners of the token: refused runners wait there for one probe.
        self._gate = gate
        # Never seen live (API or on demand): attempts wait behind the others until a frame came.
        self._backlog = backlog
        self._upstream = upstream
        # Injectable for tests under MockClock(autojump_threshold=0): while a worker thread runs,
        # every task looks blocked, so the clock would jump ahead and timings would not be exact.
        self._read_token = read_token
        up = upstream()
        self._backoff = Backoff(up.backoff_initial, up.backoff_max, up.backoff_reset_after, rng=rng)
        self._tracking = TrackingResume(fixture.backfill)
        self._fastpath = FastpathResume(resume.position if resume is not None else 0)
        # Tracking: applied once trio's clock can be read (the first attempt).
        self._resume = resume if feed.kind == "tracking" else None
        self._connected_before = False
        # The token of the current attempt: vendor texts are scrubbed of it before being kept.
        self._token: Secret | None = None
        self._stopped = False
        # Its rank at the connect limiter: subscribers now (*watched*), then recent activity
        # (the last frame of this run, else the resume point's, from before a restart or of the
        # cluster stream a take-over continues).
        self._watched = watched
        self._resumed_at = resume.received_at if resume is not None else -math.inf
        # The feed's data-age histogram (``gateway.upstream._dataage``), shared by its runners.
        self._data_age = data_age

    def priority(self) -> Priority:
        """How much this fixture's next attempt matters (read by the connect limiter)."""
        last = self.status.last_message_at
        return Priority(
            watched=self._watched is not None and self._watched(),
            last_active=last if last is not None else self._resumed_at,
        )

    # -- state -------------------------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        return self._stopped

    def _set_state(self, state: FixtureState, detail: str) -> None:
        if self._stopped:
            return
        st = self.status
        if st.state == state and st.detail == detail:
            return
        if st.state != state:
            level = logging.WARNING if state in _WARN_STATES else logging.INFO
            logger.log(
                level,
                "upstream %s/%s: %s -> %s%s",
                st.feed,
                st.fixture,
                st.state,
                state,
                f" ({detail})" if detail else "",
            )
            st.state_since = time.time()
            if state is FixtureState.LIVE:
                self._gate.accepted()  # the vendor takes the token: refused fixtures go now
        st.state = state
        st.detail = detail
        self.sink.set_status(state, detail)

    def stop(self, detail: str) -> None:
        """Mark the fixture stopped and tell the sink; the caller cancels the task.

        Afterwards nothing is published and no state is set, even by a task that has not yet
        noticed its cancellation. A sink that raises here is logged, not propagated.
        """
        if self._stopped:
            return
        try:
            self._set_state(FixtureState.STOPPED, detail)
        except Exception:
            logger.exception("upstream %s/%s: sink.set_status failed", *self._key())
        self._stopped = True

    def _key(self) -> tuple[str, str]:
        return (self.status.feed, self.status.fixture)

    # -- the loop ----------------------------------------------------------------------------

    async def run_forever(self, connect: Connector) -> NoReturn:
        """Follow the fixture until cancelled. Cancellation closes the connection (bounded)."""
        if not self._stopped:
            self.sink.set_status(self.status.state, self.status.detail)
        resume, self._resume = self._resume, None
        if resume is not None:
            age = max(0.0, time.time() - resume.received_at)
            self._tracking.resume_at(resume.position, trio.current_time() - age)
        try:
            while True:
                try:
                    await self._run(connect)
                except Exception as exc:
                    self._gate.leave(self)  # a crashed prober probes no more: another one does
                    # A bug or a failing sink: this fixture restarts, the others never notice.
                    logger.exception("upstream %s/%s: task crashed, restarting", *self._key())
                    self.status.counters.crashes += 1
                    self.status.last_error = f"internal error ({type(exc).__name__})"
                    delay = self._next_backoff()
                    try:
                        self._set_state(FixtureState.BACKOFF, "restarting after an internal error")
                    except Exception:
                        logger.exception("upstream %s/%s: sink.set_status failed", *self._key())
                    await trio.sleep(delay)
        finally:
            self._gate.leave(self)  # removed or stopped: another refused fixture probes

    async def _run(self, connect: Connector) -> NoReturn:
        while True:
            outcome = await self._attempt(connect)
            if self._stopped:
                await trio.sleep_forever()  # cancellation is on its way
            up = self._upstream()
            if outcome.end is not _End.RESUBSCRIBE:
                self.status.last_error = outcome.detail
            if outcome.end is _End.UNAUTHORIZED:
                self._set_state(FixtureState.UNAUTHORIZED, outcome.detail)
                self.status.counters.refused += 1
                # One refused fixture probes the token at a steady interval; the others wait
                # for it (or for anyone's accepted auth, or a rotation) and then go at once.
                await self._gate.refused(
                    self,
                    probe_interval=up.unauthorized_probe_interval,
                    give_up_after=up.unauthorized_retry,
                )
                continue
            self._gate.leave(self)
            if outcome.end is _End.NOT_FOUND:
                self._set_state(FixtureState.NOT_FOUND, outcome.detail)
                delay = up.not_found_retry
            elif outcome.end is _End.RESUBSCRIBE:
                self._set_state(FixtureState.CONNECTING, outcome.detail)
                delay = 0.0
            else:
                self._backoff.connection_ended(outcome.live_for)
                delay = self._next_backoff()
                self._set_state(FixtureState.BACKOFF, outcome.detail)
            await trio.sleep(delay)

    def _next_backoff(self) -> float:
        up = self._upstream()
        self._backoff.configure(up.backoff_initial, up.backoff_max, up.backoff_reset_after)
        return self._backoff.next_delay()

    def _url(self) -> tuple[str, list[tuple[bytes, bytes]]]:
        feed = self.feed
        if feed.kind == "tracking":
            return feed.url, []
        url = feed.fixture_url(urllib.parse.quote(self.fixture.id, safe=""))
        parts = urllib.parse.urlsplit(url)
        query = [
            (k, v)
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            if k != "startPosition"
        ]
        query.append(("startPosition", str(self._fastpath.start_position())))
        url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
        return url, [(b"Accept", FASTPATH_ACCEPT.encode())]

    async def _attempt(self, connect: Connector) -> _Outcome:
        self._set_state(FixtureState.CONNECTING, "")
        up = self._upstream()
        try:
            token = self._token = await self._read_token(up)
        except SecretError as exc:
            # SecretError names the token's source, never its value.
            return _Outcome(_End.RETRY, f"token unavailable: {exc}")
        await self._limiter.acquire(
            backlog=self._backlog and not self.status.counters.frames, priority=self.priority
        )
        url, headers = self._url()
        try:
            async with connect(url, headers=headers, connect_timeout=up.handshake_timeout) as conn:
                self.status.counters.connects += 1
                if self._connected_before:
                    self.status.counters.reconnects += 1
                self._connected_before = True
                auth = orjson.dumps({"authToken": token.reveal()}).decode()
                return await self._session(conn, auth, up)
        except UpstreamRejected as exc:
            if exc.status in _UNAUTHORIZED_STATUSES:
                return _Outcome(_End.UNAUTHORIZED, f"handshake refused: HTTP {exc.status}")
            if exc.status == _NOT_FOUND_STATUS:
                return _Outcome(_End.NOT_FOUND, "handshake refused: HTTP 404")
            return _Outcome(_End.RETRY, f"handshake refused: HTTP {exc.status}")
        except UpstreamUnavailable as exc:
            return _Outcome(_End.RETRY, str(exc))

    async def _session(self, conn: UpstreamConnection, auth: str, up: UpstreamSection) -> _Outcome:
        """Authenticate, subscribe and relay until the connection ends; return why it ended.

        Each message is decoded, classified and handed to :meth:`step`, which says what to do:
        receive on, send the fixture request, or end with an outcome. The step never awaits, so
        a message is handled whole or not at all; every await of the session is here.

        The watchdog is a cancel scope around the receive loop. Until the vendor accepts the
        token its deadline is the handshake timeout; afterwards any message (data or heartbeat)
        proves the upstream alive for another ``stall_timeout``. Moving a deadline costs a heap
        operation in trio's scheduler, so the loop only notes when the last message came, and
        when the deadline passes the scope is re-entered with ``last message + stall_timeout``
        unless that moment has passed too. A re-arm only ever interrupts ``get_message``
        (cancel-safe: a cancelled call loses no message): a deadline that passes during a send
        ends the session. During the auth message no message has come since the deadline was
        set, so the re-arm finds it passed; during the fixture request the session is not yet
        subscribed (the loop marks it so only once the request is sent), and an unsubscribed
        session ends at its deadline.
        """
        tracking = self.feed.kind == "tracking"
        s = SessionState(tracking=tracking, subscribed=not tracking)  # fastpath: the URL subscribes
        classify = classify_tracking if tracking else classify_fastpath
        step = self.step
        status = self.status
        clock = trio.current_time
        wall_clock = time.time
        stall = up.stall_timeout
        last_rx = clock()
        deadline = last_rx + (stall if s.subscribed else up.handshake_timeout)
        auth_sent = False
        try:
            while True:
                with trio.CancelScope(deadline=deadline) as watchdog:
                    if not auth_sent:
                        auth_sent = True
                        await conn.send_message(auth)
                    while True:
                        raw = await conn.get_message()
                        now = clock()
                        status.last_message_at = wall_clock()
                        if isinstance(raw, bytes):
                            try:
                                raw = raw.decode("utf-8")
                            except UnicodeDecodeError:
                                end = self._malformed(s)
                                if end is None:
                                    continue
                                return end
                        todo = step(s, raw, classify(raw), now)
                        if not s.malformed_run:
                            last_rx = now  # only a valid message proves the upstream alive
                        if todo is _CONTINUE:
                            continue
                        if todo is not _SUBSCRIBE:
                            return todo
                        await conn.send_message(self._fixture_request(now))
                        s.subscribed = True
                        watchdog.deadline = now + stall
                # Only the watchdog's deadline ends the inner loop without returning.
                if not s.subscribed:
                    return _Outcome(
                        _End.RETRY, f"no authorisation reply within {up.handshake_timeout} s"
                    )
                deadline = last_rx + stall
                if deadline <= clock():
                    stalled = f"stalled: no message for {stall} s"
                    return _Outcome(_End.RETRY, stalled, s.live_for(last_rx))
        except UpstreamClosed as exc:
            return s.closed(exc, last_rx)

    def step(self, s: SessionState, raw: str, msg: Message, now: float) -> SessionNext | _Outcome:
        """What one classified message means for the session; an outcome ends the connection.

        The receive loop's per-message step, public so that it can be tested one message at a
        time. Synchronous: counts, publishes and sets the state, but sends nothing (the loop
        sends the fixture request when told :attr:`SessionNext.SUBSCRIBE`, and only then marks
        the session subscribed). Data frames take the first branch and allocate nothing here.
        """
        # The payload's UTF-8 size: an ASCII str (what the vendor sends; isascii() reads a flag
        # CPython keeps, O(1)) is its own length; anything else is encoded to count it.
        self.status.counters.received_bytes += len(raw) if raw.isascii() else len(raw.encode())
        kind = msg.kind
        if kind is Kind.DATA or kind is Kind.UNSEQUENCED:
            if not s.subscribed:
                return self._malformed(s) or _CONTINUE  # data before acceptance: not ours
            if s.malformed_run:
                s.malformed_run = 0
            end = self._data(raw, msg, s.tracking, now)
            if end is not None:
                return end
            if s.live_since is None:
                s.live_since = now
                self._set_state(FixtureState.LIVE, "")
            return _CONTINUE
        if kind is Kind.MALFORMED:
            return self._malformed(s) or _CONTINUE
        s.malformed_run = 0
        if kind is Kind.HEARTBEAT:
            self.status.counters.heartbeats += 1
            if s.subscribed and s.live_since is None:
                s.live_since = now
                self._set_state(FixtureState.LIVE, "")
            return _CONTINUE
        if kind is Kind.ACCEPTED:
            # The vendor took the token: fixtures it refused go now, without waiting for this
            # one's first frame (a fixture before kickoff may send none for 10 s).
            self._gate.accepted()
            return _CONTINUE if s.subscribed else _SUBSCRIBE  # tracking: ask for the fixture
        if kind is Kind.NOT_FOUND:
            return _Outcome(_End.NOT_FOUND, self._vendor("fixture not found", msg))
        if kind is Kind.AUTH_ERROR or (kind is Kind.ERROR and not s.subscribed):
            return _Outcome(_End.UNAUTHORIZED, self._vendor("authentication refused", msg))
        if kind is Kind.ERROR:
            self.status.last_error = self._vendor("upstream error", msg)
            logger.warning("upstream %s/%s: %s", *self._key(), self.status.last_error)
        elif kind is Kind.INFO:
            logger.debug("upstream %s/%s: info: %s", *self._key(), self._vendor("", msg))
        return _CONTINUE

    def _malformed(self, s: SessionState) -> _Outcome | None:
        """Count one malformed message; too many in a row end the connection with the reason."""
        self.status.counters.malformed += 1
        s.malformed_run += 1
        if s.malformed_run >= MAX_MALFORMED_RUN:
            return _Outcome(
                _End.RETRY,
                f"{s.malformed_run} malformed messages in a row and nothing valid: "
                "the upstream sends garbage",
            )
        return None

    def _vendor(self, prefix: str, msg: Message) -> str:
        """*prefix* and the vendor's text, safe to keep and show: the token scrubbed out (an
        upstream may echo it back), then shortened."""
        text = msg.text
        if text and self._token is not None:
            text = self._token.scrub(text)
        if len(text) > MAX_VENDOR_TEXT:
            text = text[:MAX_VENDOR_TEXT] + "..."
        if not prefix:
            return text
        return f"{prefix}: {text}" if text else prefix

    def _fixture_request(self, now: float) -> str:
        """The tracking subscription: the fixture, and how many past frames to replay."""
        backfill = self._tracking.backfill(now)
        return orjson.dumps({"fixtureId": self.fixture.id, "backfill": backfill}).decode()

    def _data(self, raw: str, msg: Message, tracking: bool, now: float) -> _Outcome | None:
        """Deliver (or drop) one data message; an outcome means: end this connection."""
        counters = self.status.counters
        sent_at = msg.sent_at
        if sent_at is not None and self._data_age is not None:
            self._data_age.offer(sent_at)
        if msg.kind is Kind.UNSEQUENCED:
            self._publish(raw, None)
            return None
        assert msg.seq is not None
        if tracking:
            verdict = self._tracking.check(msg.seq)
            if verdict is Verdict.DUPLICATE:
                counters.duplicates_dropped += 1
                return None
            if verdict is Verdict.TOO_SMALL:
                return _Outcome(
                    _End.RESUBSCRIBE,
                    f"backfill did not reach ix {self._tracking.last_ix}; asking for more",
                )
            if verdict is Verdict.GAP:
                counters.gaps += 1
            self._publish(raw, msg.seq)
            self._tracking.delivered(msg.seq, now)
            return None
        fastpath = self._fastpath
        verdict = fastpath.check(msg.seq)
        if verdict is Verdict.GAP:
            counters.gaps += 1
        elif verdict is Verdict.OUT_OF_ORDER:
            counters.out_of_order += 1
        self._publish(raw, fastpath.absolute(msg.seq))
        fastpath.delivered(msg.seq)
        return None

    def _publish(self, raw: str, position: int | None) -> None:
        if self._stopped:
            return
        self.sink.publish(raw, position)
        self.status.counters.frames += 1


_WARN_STATES: Final = frozenset(
    {FixtureState.BACKOFF, FixtureState.UNAUTHORIZED, FixtureState.NOT_FOUND}
)
