"""The Python client's sans-I/O core (clients/python): every rule of docs/clients.md, no I/O.

The gateway's side is played by hand here: what it answers to each subscribe, which frames it
sends (duplicates, gaps, new epochs), when connections end. The properties are checked over
random histories (hypothesis): whatever the gateway does, the application sees each frame once,
in order, or a loss event before the next frame accounting for exactly what is missing.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from dde_gateway_client import (
    Backoff,
    Core,
    Error,
    Event,
    Frame,
    Loss,
    ProtocolError,
    ReplayEnd,
    ReplayFrame,
    ReplayLoop,
    ReplayStarted,
    StateChanged,
    Status,
    Subscribed,
    Unsubscribed,
    split_frame,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.clients_kit import frame_problems

A, B = "ws://a.example/v1/stream", "ws://b.example/v1/stream"


def msg(**fields: Any) -> str:
    return json.dumps(fields, separators=(",", ":"))


def frame(seq: int, fixture: str = "F1", data: str | None = None) -> str:
    data = data if data is not None else f'{{"ix":{seq}}}'
    return f'{{"type":"frame","feed":"tracking","fixture":"{fixture}","seq":{seq},"data":{data}}}'


def subscribed(seq: int, epoch: str = "E1", recovered: bool = False, fixture: str = "F1") -> str:
    return msg(
        type="subscribed",
        feed="tracking",
        fixture=fixture,
        seq=seq,
        epoch=epoch,
        recovered=recovered,
    )


def drain(core: Core, stream: int) -> list[Event]:
    out = []
    while (event := core.pop(stream)) is not None:
        out.append(event)
    return out


def connected(core: Core, now: float = 0.0) -> list[dict[str, Any]]:
    """Connect: the requests it sends, parsed."""
    core.connecting()
    core.opened(now)
    return [json.loads(t) for t in core.take_outgoing()]


def new(**kwargs: Any) -> tuple[Core, int]:
    core = Core([A, B], backoff=Backoff(rng=lambda: 0.5), **kwargs)
    return core, core.open_stream()


def as_lines(events: list[Event]) -> list[dict[str, Any]]:
    return [json.loads(e.to_json()) for e in events]


# -- connections -------------------------------------------------------------------------------


def test_states_urls_in_turn_and_the_backoff() -> None:
    core, sid = new()
    core.subscribe(sid, "tracking", "F1")
    assert core.state == "disconnected"
    assert core.connecting() == A
    assert core.lost("refused", 0.0) == pytest.approx(0.05)  # 0.5 * 0.1
    assert core.connecting() == B
    assert core.lost("refused", 0.1) == pytest.approx(0.1)  # 0.5 * 0.2
    assert core.connecting() == A
    core.opened(1.0)
    assert core.lost("closed 1006", 5.0) == pytest.approx(0.2)  # lived 4 s: no reset
    core.connecting()
    core.opened(10.0)
    assert core.lost("closed 1001", 20.0) == pytest.approx(0.05)  # lived 10 s: reset
    states = [(e.state, e.url, e.reason) for e in drain(core, sid) if isinstance(e, StateChanged)]
    assert states == [
        ("connecting", A, ""),
        ("disconnected", A, "refused"),
        ("connecting", B, ""),
        ("disconnected", B, "refused"),
        ("connecting", A, ""),
        ("connected", A, ""),
        ("disconnected", A, "closed 1006"),
        ("connecting", B, ""),
        ("connected", B, ""),
        ("disconnected", B, "closed 1001"),
    ]


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=80))
def test_full_jitter_stays_within_its_cap(draws: list[float]) -> None:
    it = iter(draws)
    backoff = Backoff(0.1, 10.0, rng=lambda: next(it))
    for n, r in enumerate(draws):
        delay = backoff.next_delay()
        assert delay == pytest.approx(r * min(10.0, 0.1 * 2**n))
        assert 0.0 <= delay <= 10.0


def test_401_is_fatal_and_other_statuses_retry() -> None:
    core, sid = new()
    core.subscribe(sid, "tracking", "F1")
    core.connecting()
    assert core.refused(503, 0.0) is not None
    core.connecting()
    assert core.refused(401, 0.0) is None
    assert core.closed and core.stream_done(sid) is False
    events = drain(core, sid)
    assert core.stream_done(sid)
    assert isinstance(events[-2], Error) and events[-2].fatal
    assert "401" in events[-2].message
    assert events[-1] == StateChanged("closed", B, events[-2].message)
    with pytest.raises(RuntimeError):
        core.connecting()


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="at least one URL"):
        Core([])
    with pytest.raises(ValueError, match="not a ws"):
        Core(["http://x/v1/stream"])
    with pytest.raises(ValueError, match="max_queue"):
        Core([A], max_queue=0)
    with pytest.raises(ValueError, match="min_delay"):
        Backoff(0.0, 1.0)
    core, sid = new()
    core.subscribe(sid, "tracking", "F1")
    with pytest.raises(ValueError, match="already subscribed"):
        core.subscribe(sid, "tracking", "F1")
    with pytest.raises(ValueError, match="backfill"):
        core.subscribe(sid, "tracking", "F2", backfill=-2)
    with pytest.raises(ValueError, match="max_rate"):
        core.subscribe(sid, "tracking", "F2", backfill=5, max_rate=1.0)


def test_the_heartbeat_watchdog_is_three_intervals_by_default() -> None:
    assert Core([A]).dead_after == 30.0
    assert Core([A], heartbeat_interval=2.0, heartbeat_misses=4).dead_after == 8.0


def test_not_json_or_binary_is_a_protocol_error() -> None:
    core, _ = new()
    connected(core)
    for bad in ("nope", "[1]", b"\x00"):
        with pytest.raises(ProtocolError):
            core.received(bad)


# -- subscribing and resuming -------------------------------------------------------------------


def test_resubscribe_with_after_and_epoch_recovered_means_no_loss() -> None:
    core, sid = new()
    core.subscribe(sid, "tracking", "F1", backfill=5)
    assert connected(core) == [
        {"op": "subscribe", "feed": "tracking", "fixture": "F1", "backfill": 5}
    ]
    core.received(subscribed(10))
    for seq in range(6, 12):
        core.received(frame(seq))
    core.lost("closed 1006", 1.0)
    assert connected(core, 2.0) == [
        {"op": "subscribe", "feed": "tracking", "fixture": "F1", "after": 11, "epoch": "E1"}
    ]
    core.received(subscribed(14, recovered=True))
    for seq in (12, 13, 14, 15):
        core.received(frame(seq))
    events = [e for e in drain(core, sid) if not isinstance(e, StateChanged)]
    assert [e for e in events if isinstance(e, Subscribed)] == [
        Subscribed("tracking", "F1", "E1", 10, False, False),
        Subscribed("tracking", "F1", "E1", 14, True, True),
    ]
    assert [e.seq for e in events if isinstance(e, Frame)] == list(range(6, 16))
    assert not [e for e in events if isinstance(e, Loss)]


def test_live_only_resumes_from_where_it_subscribed() -> None:
    """No frame came before the connection dropped: the resume starts at the subscribed seq
    (nothing that arrived meanwhile is skipped)."""
    core, sid = new()
    core.subscribe(sid, "tracking", "F1")
    connected(core)
    core.received(subscribed(40))
    core.lost("closed 1006", 1.0)
    assert connected(core)[0] == {
        "op": "subscribe",
        "feed": "tracking",
        "fixture": "F1",
        "after": 40,
        "epoch": "E1",
    }


def test_not_recovered_is_a_loss_before_the_next_frame() -> None:
    core, sid = new()
    core.subscribe(sid, "tracking", "F1")
    connected(core)
    core.received(subscribed(1))
    core.received(frame(2))
    core.lost("closed 4008 too slow", 1.0)
    connected(core)
    core.received(subscribed(90, recovered=False))
    core.received(frame(91))
    events = [e for e in drain(core, sid) if not isinstance(e, StateChanged)]
    assert events[-3:] == [
        Subscribed("tracking", "F1", "E1", 90, False, True),
        Loss("tracking", "F1", 3, 90, "E1", "E1", "not_recovered"),
        Frame("tracking", "F1", "E1", 91, '{"ix":91}'),
    ]


def test_a_new_epoch_is_a_loss_and_a_recovered_new_epoch_is_not() -> None:
    core, sid = new()
    core.subscribe(sid, "tracking", "F1")
    connected(core)
    core.received(subscribed(0))
    core.received(frame(1))
    core.lost("closed 1001", 1.0)
    connected(core)
    core.received(subscribed(7, epoch="E2", recovered=False))
    core.received(frame(8))
    # A recorder's numbering after a crash: recovered under a new epoch, frames go on.
    core.lost("closed 1006", 2.0)
    assert connected(core)[0]["after"] == 8
    core.received(subscribed(9, epoch="E3", recovered=True))
    core.received(frame(9))
    events = [e for e in drain(core, sid) if isinstance(e, Loss | Frame)]
    assert events == [
        Frame("tracking", "F1", "E1", 1, '{"ix":1}'),
        Loss("tracking", "F1", 2, 7, "E1", "E2", "epoch_changed"),
        Frame("tracking", "F1", "E2", 8, '{"ix":8}'),
        Frame("tracking", "F1", "E3", 9, '{"ix":9}'),
    ]
    # A new epoch with nothing in it yet: how much is behind is unknown.
    core.lost("closed 1001", 3.0)
    connected(core)
    core.received(subscribed(0, epoch="E4"))
    (loss,) = [e for e in drain(core, sid) if isinstance(e, Loss)]
    assert (loss.from_seq, loss.to_seq, loss.reason) == (10, None, "epoch_changed")


def test_duplicates_are_dropped_and_counted() -> None:
    core, sid = new()
    core.subscribe(sid, "tracking", "F1")
    connected(core)
    core.received(subscribed(0))
    used = [core.received(frame(seq)) for seq in (1, 2, 2, 1, 3)]
    assert used == [True, True, False, False, True]  # what `watch --raw` prints
    assert [e.seq for e in drain(core, sid) if isinstance(e, Frame)] == [1, 2, 3]
    assert core.counters.duplicates_dropped == 2


def test_gap_and_sequence_gap_are_losses() -> None:
    core, sid = new()
    core.subscribe(sid, "tracking", "F1")
    connected(core)
    core.received(subscribed(0))
    core.received(frame(1))
    core.received(
        msg(type="gap", feed="tracking", fixture="F1", from_seq=2, to_seq=5, reason="slow_consumer")
    )
    core.received(frame(6))
    core.received(frame(9))  # no gap message: should never happen, never hidden
    events = [e for e in drain(core, sid) if isinstance(e, Loss | Frame)]
    assert [(type(e).__name__, getattr(e, "reason", None)) for e in events] == [
        ("Frame", None),
        ("Loss", "slow_consumer"),
        ("Frame", None),
        ("Loss", "sequence_gap"),
        ("Frame", None),
    ]
    assert (events[3].from_seq, events[3].to_seq) == (7, 8)  # type: ignore[union-attr]


def test_max_rate_skips_are_conflation_not_loss() -> None:
    core, sid = new()
    core.subscribe(sid, "tracking", "F1", max_rate=2.0)
    assert connected(core)[0]["max_rate"] == 2.0
    core.received(subscribed(3))
    core.received(frame(9))
    core.received(frame(20))
    core.lost("x", 1.0)
    request = connected(core)[0]
    assert "after" not in request and request["max_rate"] == 2.0  # after is not allowed with it
    assert not [e for e in drain(core, sid) if isinstance(e, Loss)]


def test_a_refused_subscribe_is_an_error_with_the_gateways_text_then_unsubscribed() -> None:
    core, sid = new()
    core.subscribe(sid, "tracking", "nope")
    core.connecting()
    core.opened(0.0)
    sent = core.take_outgoing()
    text = "unknown fixture 'nope' of feed 'tracking'"
    core.received(msg(type="error", message=text, request=sent[0]))
    events = [e for e in drain(core, sid) if not isinstance(e, StateChanged)]
    assert events == [
        Error(text, sent[0], "tracking", "nope"),
        Unsubscribed("tracking", "nope", text),
    ]
    assert core.stream_done(sid)
    core.lost("x", 1.0)
    assert connected(core) == []  # not retried


def test_an_error_quoting_a_cut_request_still_finds_its_subscription() -> None:
    core, sid = new()
    long_id = "x" * 300
    core.subscribe(sid, "tracking", long_id)
    core.subscribe(sid, "tracking", "F1")
    core.connecting()
    core.opened(0.0)
    first = core.take_outgoing()[0]
    core.received(msg(type="error", message="invalid fixture id", request=first[:256] + "..."))
    core.received(msg(type="error", message="something else", request="{}"))
    events = [e for e in drain(core, sid) if isinstance(e, Error | Unsubscribed)]
    assert events == [
        Error("invalid fixture id", first[:256] + "...", "tracking", long_id),
        Unsubscribed("tracking", long_id, "invalid fixture id"),
        Error("something else", "{}"),
    ]
    assert [t.fixture for t in core.topics()] == ["F1"]


def test_status_stopped_ends_the_subscription() -> None:
    core, sid = new()
    core.subscribe(sid, "tracking", "F1")
    connected(core)
    core.received(subscribed(0))
    core.received(msg(type="status", feed="tracking", fixture="F1", state="live", detail=""))
    core.received(msg(type="status", feed="tracking", fixture="F1", state="stopped", detail="x"))
    events = [e for e in drain(core, sid) if not isinstance(e, StateChanged | Subscribed)]
    assert events == [
        Status("tracking", "F1", "live", ""),
        Status("tracking", "F1", "stopped", "x"),
        Unsubscribed("tracking", "F1", "stopped"),
    ]
    assert core.stream_done(sid)


def test_unsubscribe_sends_the_op_and_ends_the_stream() -> None:
    core, sid = new()
    core.subscribe(sid, "tracking", "F1")
    connected(core)
    core.received(subscribed(0))
    core.unsubscribe("tracking", "F1")
    assert [json.loads(t) for t in core.take_outgoing()] == [
        {"op": "unsubscribe", "feed": "tracking", "fixture": "F1"}
    ]
    core.received(frame(1))  # in flight: not delivered
    events = drain(core, sid)
    assert events[-1] == Unsubscribed("tracking", "F1", "unsubscribe")
    assert not [e for e in events if isinstance(e, Frame)]
    assert core.stream_done(sid)


def test_the_queue_is_bounded_reading_stops_when_full() -> None:
    core, sid = new(max_queue=5)
    core.subscribe(sid, "tracking", "F1")
    connected(core)  # 2 state events queued
    core.received(subscribed(0))
    core.received(frame(1))
    core.received(frame(2))
    assert core.queued == 5 and not core.wants_read
    core.pop(sid)
    assert core.wants_read


def test_streams_get_their_topics_and_every_state_change() -> None:
    core = Core([A])
    one, two = core.open_stream(), core.open_stream()
    core.subscribe(one, "tracking", "F1")
    core.subscribe(two, "tracking", "F2")
    connected(core)
    core.received(subscribed(0, fixture="F2"))
    core.received(frame(1, fixture="F2"))
    assert [type(e).__name__ for e in drain(core, one)] == ["StateChanged", "StateChanged"]
    assert [type(e).__name__ for e in drain(core, two)] == [
        "StateChanged",
        "StateChanged",
        "Subscribed",
        "Frame",
    ]
    core.close_stream(two)
    assert [json.loads(t)["op"] for t in core.take_outgoing()] == ["unsubscribe"]


def test_frame_data_is_kept_verbatim() -> None:
    raw = '{"id":"F1", "x":1.10,"s":"\\u00e9\\"data\\":"}'
    core, sid = new()
    core.subscribe(sid, "tracking", "F1")
    connected(core)
    core.received(subscribed(0))
    core.received(frame(1, data=raw))
    (f,) = [e for e in drain(core, sid) if isinstance(e, Frame)]
    assert f.text == raw and f.data["x"] == 1.1
    assert f.to_json().endswith(',"data":' + raw + "}")
    head, data = split_frame(frame(5, data=raw))
    assert (head["seq"], data) == (5, raw)
    # Any other layout still works (parsed and re-serialised).
    head, data = split_frame('{"type": "frame", "seq": 3, "data": {"a": 1}, "feed": "t"}')
    assert (head["seq"], json.loads(data)) == (3, {"a": 1})


def test_event_lines_have_exactly_the_specified_keys() -> None:
    lines = as_lines(
        [
            StateChanged("connecting", A),
            Subscribed("t", "F", "E", 1, True, True),
            Frame("t", "F", "E", 2, "{}"),
            Loss("t", "F", 3, None, "E", "E2", "epoch_changed"),
            Status("t", "F", "live", ""),
            Error("m", "r", "t", "F"),
            Unsubscribed("t", "F", "stopped"),
            ReplayStarted("t", "F", "E", 1, 40, False),
            ReplayFrame("t", "F", 1, "{}"),
            ReplayLoop("t", "F", 2),
            ReplayEnd("t", "F", "end", 9),
        ]
    )
    assert [list(line) for line in lines] == [
        ["event", "state", "url", "reason"],
        ["event", "feed", "fixture", "epoch", "seq", "recovered", "resumed"],
        ["event", "feed", "fixture", "epoch", "seq", "data"],
        ["event", "feed", "fixture", "from_seq", "to_seq", "epoch_before", "epoch_after", "reason"],
        ["event", "feed", "fixture", "state", "detail"],
        ["event", "message", "request", "feed", "fixture", "fatal"],
        ["event", "feed", "fixture", "reason"],
        ["event", "feed", "fixture", "epoch", "from_seq", "rate", "looped"],
        ["event", "feed", "fixture", "seq", "data"],
        ["event", "feed", "fixture", "pass"],
        ["event", "feed", "fixture", "reason", "last_seq"],
    ]


# -- replay (the op of issue 23) ------------------------------------------------------------------


def test_replay_requests_events_and_errors() -> None:
    core, sid = new()
    with pytest.raises(ValueError, match="rate must be an integer 1 to 1000"):
        core.replay(sid, "tracking", "F1", rate=0)
    with pytest.raises(ValueError, match="rate must be an integer"):
        core.replay(sid, "tracking", "F1", rate=True)
    with pytest.raises(ValueError, match="exactly one of seq, phase"):
        core.replay(sid, "tracking", "F1", rate=5, start={"seq": 1, "ut": 5})
    core.replay(sid, "tracking", "F1", rate=40, looped=True, start={"seq": 1})
    assert connected(core) == [
        {
            "op": "replay",
            "feed": "tracking",
            "fixture": "F1",
            "rate": 40,
            "looped": True,
            "from": {"seq": 1},
        }
    ]
    f1 = {"feed": "tracking", "fixture": "F1"}
    core.received(msg(type="replay_started", **f1, epoch="E", from_seq=1, rate=40, looped=True))
    core.received('{"type":"replay_frame","feed":"tracking","fixture":"F1","seq":1,"data":{"a":1}}')
    core.received(msg(type="replay_loop", **f1, **{"pass": 2}))
    core.received(msg(type="replay_end", **f1, reason="stopped", last_seq=1))
    events = [e for e in drain(core, sid) if not isinstance(e, StateChanged)]
    assert events == [
        ReplayStarted("tracking", "F1", "E", 1, 40, True),
        ReplayFrame("tracking", "F1", 1, '{"a":1}'),
        ReplayLoop("tracking", "F1", 2),
        ReplayEnd("tracking", "F1", "stopped", 1),
    ]
    assert core.stream_done(sid)
    # Refused: the gateway's text; a lost connection ends a replay (replays do not resume).
    core.replay(sid, "tracking", "F1", rate=5)
    (req,) = core.take_outgoing()
    core.received(
        msg(type="error", message="no recording reaches the start of tracking/F1", request=req)
    )
    assert drain(core, sid) == [
        Error("no recording reaches the start of tracking/F1", req, "tracking", "F1")
    ]
    core.replay(sid, "tracking", "F1", rate=5)
    core.take_outgoing()
    core.lost("closed 1006", 1.0)
    assert [e for e in drain(core, sid) if isinstance(e, ReplayEnd)] == [
        ReplayEnd("tracking", "F1", "disconnected", None)
    ]


# -- the property over random histories -----------------------------------------------------------

Step = tuple[str, int]
steps = st.lists(
    st.tuples(
        st.sampled_from(["frames", "dup", "skip", "gap", "drop", "resume_lost", "epoch", "behind"]),
        st.integers(1, 6),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(steps, st.integers(-1, 3))
def test_whatever_the_gateway_does_each_frame_once_or_a_loss(
    history: list[Step], backfill: int
) -> None:
    """A gateway that repeats frames, skips them with and without a gap message, drops the
    connection (resuming it with or without recovery) and renumbers under a new epoch: what the
    application sees is each frame once, in order, or a loss accounting for what is missing."""
    core, sid = new()
    core.subscribe(sid, "tracking", "F1", backfill=None if backfill == -1 else backfill)
    epoch_n, top = 1, 10  # the gateway's epoch and its last seq
    sent: list[int] = []  # what this connection got, in order

    def epoch() -> str:
        return f"E{epoch_n}"

    def connect(recovered: bool) -> None:
        core.connecting()
        core.opened(0.0)
        (text,) = core.take_outgoing()
        req = json.loads(text)
        core.received(subscribed(top, epoch(), recovered and "after" in req))
        start = req["after"] + 1 if recovered and "after" in req else top + 1
        if "backfill" in req and req["backfill"] not in (0,):
            n = top if req["backfill"] is None else min(req["backfill"], top)
            start = top - n + 1
        for seq in range(start, top + 1):
            core.received(frame(seq))

    connect(False)
    for kind, n in history:
        if kind == "frames":
            for _ in range(n):
                top += 1
                core.received(frame(top))
                sent.append(top)
        elif kind == "dup" and sent:
            for seq in sent[-n:]:
                core.received(frame(seq))
        elif kind == "skip":
            top += n
        elif kind == "gap":
            core.received(
                msg(
                    type="gap",
                    feed="tracking",
                    fixture="F1",
                    from_seq=top + 1,
                    to_seq=top + n,
                    reason="slow_consumer",
                )
            )
            top += n
        elif kind in ("drop", "resume_lost"):
            core.lost("closed 1006", 1.0)
            top += n
            connect(kind == "drop")
            sent = []
        elif kind == "behind":
            # Failover to an instance n frames behind (same epoch): it answers recovered
            # false with its lower seq, then sends from there, repeating what was seen.
            core.lost("closed 1006", 1.0)
            core.connecting()
            core.opened(0.0)
            core.take_outgoing()
            behind = max(0, top - n)
            core.received(subscribed(behind, epoch(), False))
            for seq in range(behind + 1, top + 1):
                core.received(frame(seq))
            sent = []
        elif kind == "epoch":
            core.lost("closed 1001", 1.0)
            epoch_n += 1
            top = n
            connect(False)
            sent = []
    lines = as_lines(drain(core, sid))
    assert frame_problems(lines, "F1") == []
    seen = [(line["epoch"], line["seq"]) for line in lines if line["event"] == "frame"]
    assert len(seen) == len(set(seen))


def test_a_resume_ahead_of_the_new_instance_neither_repeats_nor_reports_a_loss() -> None:
    """Failover in a cluster: the client got frames up to 550 from instance A, whose own topic
    ran ahead of B's relay; B answers the resume ``recovered: false`` with seq 546 (same
    epoch) and then sends 547, 548, ... live. Nothing was lost and nothing may be repeated:
    frames up to 550 are dropped as duplicates, 551 follows 550."""
    core, sid = new()
    core.subscribe(sid, "tracking", "F1")
    connected(core)
    core.received(subscribed(540))
    for seq in range(541, 551):
        core.received(frame(seq))
    core.lost("closed 1006", 1.0)
    assert connected(core)[0]["after"] == 550
    core.received(subscribed(546, recovered=False))
    for seq in range(547, 553):
        core.received(frame(seq))
    events = drain(core, sid)
    assert [e.seq for e in events if isinstance(e, Frame)] == list(range(541, 553))
    assert not [e for e in events if isinstance(e, Loss)]
    assert core.counters.duplicates_dropped == 4
