"""One connection's session logic, without sockets: the per-message step and the close outcome.

``FixtureRunner.step`` decides what one classified message means (receive on, send the fixture
request, or end the connection with an outcome) from the message and the session's small state
(:class:`SessionState`); it never awaits, so it is called here directly with hand-made
:class:`Message` values. An outcome is the runner's own type: tests read its ``end`` (by name),
``detail`` and ``live_for``. The last tests drive the loop around the step (the runner's
``_session``) over a scripted in-memory connection, to check the loop's side of the contract:
the fixture request is sent once, and only then is the session subscribed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from gateway.config import structure_config
from gateway.model import FixtureState
from gateway.upstream import (
    DATA_AGE_SAMPLE_EVERY,
    AuthGate,
    ConnectLimiter,
    DataAge,
    FixtureRunner,
    Kind,
    Message,
    SessionNext,
    SessionState,
    UpstreamClosed,
)
from tests.kit import RecordingSink

CONTINUE = SessionNext.CONTINUE
SUBSCRIBE = SessionNext.SUBSCRIBE

ACCEPTED = Message(Kind.ACCEPTED, text="Authorisation accepted")
HEARTBEAT = Message(Kind.HEARTBEAT)
RAW = '{"ix":0}'  # the text published for DATA messages; the step never parses it


def make_runner(
    kind: str = "tracking", gate: AuthGate | None = None, data_age: DataAge | None = None
) -> tuple[FixtureRunner, RecordingSink]:
    config = structure_config(
        {
            "upstream": {"token_env": "DDE_TEST_UNUSED", "stall_timeout": 5.0},
            "feeds": {
                "trk": {"kind": "tracking", "url": "ws://upstream.test/ws/soccer/tracking"},
                "fp": {"kind": "fastpath", "url": "ws://upstream.test/fixtures/{fixture}"},
            },
            "fixtures": [{"feed": "trk" if kind == "tracking" else "fp", "id": "f1"}],
        }
    )
    fixture = config.fixtures[0]
    sink = RecordingSink()
    runner = FixtureRunner(
        config.feeds[fixture.feed],
        fixture,
        sink,
        limiter=ConnectLimiter(1000.0),
        gate=AuthGate() if gate is None else gate,
        upstream=lambda: config.upstream,
        rng=random.Random(0),
        data_age=data_age,
    )
    return runner, sink


def tracking_session(*, subscribed: bool) -> SessionState:
    return SessionState(tracking=True, subscribed=subscribed)


def data(seq: int) -> Message:
    return Message(Kind.DATA, seq=seq)


def ended(todo: Any) -> tuple[str, str, float]:
    """An outcome as (end, detail, live_for); fails when the session goes on instead."""
    assert not isinstance(todo, SessionNext), todo
    return (todo.end.name, todo.detail, todo.live_for)


# -- bytes and data age -------------------------------------------------------------------------


def test_every_message_counts_its_utf8_bytes_received() -> None:
    runner, _ = make_runner()
    s = tracking_session(subscribed=True)
    texts = ['{"ix":0}', '{"ix":1,"name":"Müller ⚽"}', '{"message":"Heartbeat sent at t"}', "junk"]
    msgs = [data(0), data(1), HEARTBEAT, Message(Kind.MALFORMED)]
    for raw, msg in zip(texts, msgs, strict=True):
        runner.step(s, raw, msg, 1.0)
    assert runner.status.counters.received_bytes == sum(len(t.encode()) for t in texts)
    assert runner.status.counters.received_bytes > sum(len(t) for t in texts)  # not characters


def test_stamped_data_frames_feed_the_feeds_data_age() -> None:
    age = DataAge()
    runner, sink = make_runner(data_age=age)
    s = tracking_session(subscribed=True)
    sent = time.time() - 0.3
    for seq in range(DATA_AGE_SAMPLE_EVERY):
        runner.step(s, RAW, Message(Kind.DATA, seq=seq, sent_at=sent), 1.0)
    runner.step(s, RAW, data(DATA_AGE_SAMPLE_EVERY), 1.0)  # no stamp: not offered
    runner.step(s, RAW, Message(Kind.DATA, seq=3, sent_at=sent), 1.0)  # a duplicate: dropped
    assert len(sink.frames) == DATA_AGE_SAMPLE_EVERY + 1
    assert age.count == 1
    assert 0.3 <= age.sum < 60


# -- before the subscription ---------------------------------------------------------------------


@pytest.mark.parametrize("msg", [data(0), Message(Kind.UNSEQUENCED, text="Connected")])
def test_data_before_acceptance_counts_malformed_and_is_not_published(msg: Message) -> None:
    runner, sink = make_runner()
    s = tracking_session(subscribed=False)
    assert runner.step(s, RAW, msg, 1.0) is CONTINUE
    assert runner.status.counters.malformed == 1
    assert runner.status.counters.frames == 0
    assert sink.frames == []
    assert s.live_since is None
    assert runner.status.state is not FixtureState.LIVE


def test_accepted_asks_for_the_subscription_once() -> None:
    runner, _ = make_runner()
    s = tracking_session(subscribed=False)
    assert runner.step(s, "", ACCEPTED, 1.0) is SUBSCRIBE
    # The step does not mark the session subscribed: the loop does, once the request is sent.
    assert not s.subscribed
    s.subscribed = True
    assert runner.step(s, "", ACCEPTED, 2.0) is CONTINUE


@pytest.mark.parametrize("kind", ["tracking", "fastpath"])
async def test_an_accepted_auth_releases_the_refused_fixtures_at_once(
    kind: str, autojump_clock: trio.testing.MockClock
) -> None:
    """Tracking: at ``Authorisation accepted``, before the first frame; fastpath (no such
    message): when the fixture goes live."""
    gate = AuthGate()
    runner, _ = make_runner(kind, gate)
    released: list[float] = []

    async def refused_elsewhere() -> None:
        await gate.refused("other", probe_interval=100.0, give_up_after=100.0)
        released.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(refused_elsewhere)
        await trio.sleep(5.0)
        assert gate.waiting == 1
        t = trio.current_time()
        if kind == "tracking":
            assert runner.step(tracking_session(subscribed=False), "", ACCEPTED, t) is SUBSCRIBE
        else:
            s = SessionState(tracking=False, subscribed=True)
            assert runner.step(s, RAW, data(1), t) is CONTINUE
            assert runner.status.state is FixtureState.LIVE
    assert released == [t]


def test_accepted_on_fastpath_is_ignored() -> None:
    runner, _ = make_runner("fastpath")
    s = SessionState(tracking=False, subscribed=True)  # the URL is the subscription
    assert runner.step(s, "", ACCEPTED, 1.0) is CONTINUE


def test_heartbeat_before_subscription_counts_but_is_not_live() -> None:
    runner, sink = make_runner()
    s = tracking_session(subscribed=False)
    assert runner.step(s, "", HEARTBEAT, 1.0) is CONTINUE
    assert runner.status.counters.heartbeats == 1
    assert s.live_since is None
    assert (FixtureState.LIVE, "") not in sink.states


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("subscribed", [False, True])
def test_auth_error_is_unauthorized(subscribed: bool) -> None:
    runner, _ = make_runner()
    msg = Message(Kind.AUTH_ERROR, text="Supplied token could not be authenticated")
    outcome = runner.step(tracking_session(subscribed=subscribed), "", msg, 1.0)
    assert ended(outcome) == (
        "UNAUTHORIZED",
        "authentication refused: Supplied token could not be authenticated",
        0.0,
    )


def test_error_before_subscription_is_unauthorized() -> None:
    runner, _ = make_runner()
    msg = Message(Kind.ERROR, text="Authentication message had incorrect format")
    outcome = runner.step(tracking_session(subscribed=False), "", msg, 1.0)
    assert ended(outcome)[0] == "UNAUTHORIZED"


def test_error_after_subscription_only_sets_last_error() -> None:
    runner, sink = make_runner()
    s = tracking_session(subscribed=True)
    assert runner.step(s, "", Message(Kind.ERROR, text="internal hiccup"), 1.0) is CONTINUE
    assert runner.status.last_error == "upstream error: internal hiccup"
    assert sink.states == []
    assert s.live_since is None


def test_error_without_text_keeps_the_fixed_prefix() -> None:
    runner, _ = make_runner()
    runner.step(tracking_session(subscribed=True), "", Message(Kind.ERROR), 1.0)
    assert runner.status.last_error == "upstream error"


def test_not_found_ends_the_session() -> None:
    runner, _ = make_runner()
    msg = Message(Kind.NOT_FOUND, text="Could not find fixture topic soccer.tracking.f1")
    outcome = runner.step(tracking_session(subscribed=True), "", msg, 1.0)
    assert ended(outcome) == (
        "NOT_FOUND",
        "fixture not found: Could not find fixture topic soccer.tracking.f1",
        0.0,
    )


# -- once subscribed ------------------------------------------------------------------------------


def test_heartbeat_makes_it_live_when_subscribed() -> None:
    runner, sink = make_runner()
    s = tracking_session(subscribed=True)
    assert runner.step(s, "", HEARTBEAT, 4.0) is CONTINUE
    assert s.live_since == 4.0
    assert runner.status.state is FixtureState.LIVE
    assert runner.step(s, "", HEARTBEAT, 9.0) is CONTINUE
    assert s.live_since == 4.0  # live since the first one
    assert sink.states == [(FixtureState.LIVE, "")]
    assert runner.status.counters.heartbeats == 2


def test_data_is_published_and_makes_it_live_once() -> None:
    runner, sink = make_runner()
    s = tracking_session(subscribed=True)
    for ix, now in ((0, 2.0), (1, 2.5)):
        assert runner.step(s, f'{{"ix":{ix}}}', data(ix), now) is CONTINUE
    assert sink.frames == ['{"ix":0}', '{"ix":1}']
    assert sink.positions == [0, 1]
    assert s.live_since == 2.0
    assert sink.states == [(FixtureState.LIVE, "")]
    assert runner.status.counters.frames == 2


def test_tracking_duplicate_is_dropped_and_too_small_backfill_resubscribes() -> None:
    runner, sink = make_runner()
    s = tracking_session(subscribed=True)
    runner.step(s, RAW, data(0), 1.0)
    assert runner.step(s, RAW, data(0), 1.1) is CONTINUE
    assert runner.status.counters.duplicates_dropped == 1
    # A new subscription whose reply starts past the last delivered ix: ask again, wider.
    runner._fixture_request(2.0)
    outcome = runner.step(s, RAW, data(50), 2.1)
    assert ended(outcome)[0] == "RESUBSCRIBE"
    assert len(sink.frames) == 1


@pytest.mark.parametrize(
    "msg", [Message(Kind.INFO, text="Fixture kicked off"), Message(Kind.MALFORMED)]
)
def test_info_and_malformed_continue(msg: Message) -> None:
    runner, sink = make_runner()
    s = tracking_session(subscribed=True)
    assert runner.step(s, "", msg, 1.0) is CONTINUE
    assert runner.status.counters.malformed == (1 if msg.kind is Kind.MALFORMED else 0)
    assert sink.frames == [] and sink.states == []
    assert s.live_since is None


# -- the close outcome ------------------------------------------------------------------------


def test_close_1008_before_live_is_unauthorized() -> None:
    outcome = tracking_session(subscribed=True).closed(UpstreamClosed(1008), 3.0)
    assert ended(outcome) == ("UNAUTHORIZED", "closed before going live (code 1008)", 0.0)


def test_close_after_live_counts_live_time_to_the_last_message() -> None:
    s = tracking_session(subscribed=True)
    s.live_since = 10.0
    assert ended(s.closed(UpstreamClosed(1008), 25.0)) == (
        "RETRY",
        "closed by upstream (code 1008)",
        15.0,
    )
    assert ended(s.closed(UpstreamClosed(None), 25.0))[1] == "closed by upstream (no close code)"


# -- the loop around the step -------------------------------------------------------------


class ScriptedConn:
    """Replies with *script* in order, then reports a close; records what the client sent."""

    def __init__(self, script: Sequence[str | bytes], close_code: int = 1000) -> None:
        self._script = list(script)
        self._close_code = close_code
        self.sent: list[str] = []

    async def send_message(self, message: str) -> None:
        await trio.lowlevel.checkpoint()
        self.sent.append(message)

    async def get_message(self) -> str | bytes:
        await trio.lowlevel.checkpoint()
        if not self._script:
            raise UpstreamClosed(self._close_code)
        return self._script.pop(0)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


ACCEPTED_TEXT = '{"message":"Authorisation accepted","level":"INFO"}'


async def test_session_sends_auth_then_one_fixture_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runner, sink = make_runner()
    conn = ScriptedConn([ACCEPTED_TEXT, ACCEPTED_TEXT, '{"ix":0}', b"\xff", '{"ix":1}'])
    outcome = await runner._session(conn, '{"authToken":"t"}', runner._upstream())
    assert [orjson.loads(m) for m in conn.sent] == [
        {"authToken": "t"},
        {"fixtureId": "f1", "backfill": 0},
    ]
    assert sink.frames == ['{"ix":0}', '{"ix":1}']
    assert runner.status.counters.malformed == 1  # the undecodable bytes
    assert ended(outcome) == ("RETRY", "closed by upstream (code 1000)", 0.0)


async def test_session_ends_with_the_steps_outcome(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runner, _ = make_runner()
    conn = ScriptedConn(['{"errorMessage":"token expired"}', ACCEPTED_TEXT])
    outcome = await runner._session(conn, "{}", runner._upstream())
    assert ended(outcome) == ("UNAUTHORIZED", "authentication refused: token expired", 0.0)
    assert conn.sent == ["{}"]  # no fixture request after the refusal
