"""The hub without sockets: topics, history, resume, status dedup, encodings, on-demand rules.

Covers: seq numbering and the history ring, backfill and resume edge cases, status
deduplication and fan-out, topic close, the pre-encoded frames (envelope byte for byte, raw,
shared between subscribers, WebSocket headers checked against wsproto's own encoder at every
length boundary), ``sequenced`` detection, the rate window, the latency histogram, and
Hub.open/leave with a fake directory.

Rules: pure synchronous unit tests (no I/O, no clock but ``time.monotonic`` patched where the
rate window is tested).
"""

from __future__ import annotations

import gc
import math
import time

import attrs
import orjson
import pytest
from wsproto.frame_protocol import FrameProtocol, Opcode

from gateway.config import FeedConfig
from gateway.hub import (
    LATENCY_BUCKETS,
    RATE_WINDOW,
    RESUME_AHEAD_MAX,
    SAMPLE_EVERY,
    Frame,
    Hub,
    LatencyHistogram,
    Topic,
    UnknownFeedError,
    UnknownFixtureError,
    valid_fixture_id,
)
from gateway.model import FixtureState
from gateway.wire import encode_frame, frame_header

FEED = FeedConfig(kind="tracking", url="wss://x.test/ws/t", history=5, name="tracking")
OD = FeedConfig(kind="tracking", url="wss://x.test/ws/o", on_demand=True, name="od")


class Recorder:
    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.statuses: list[tuple[str, str]] = []
        self.closed = 0

    def on_frame(self, frame: Frame) -> None:
        self.frames.append(frame)

    def on_status(self, topic: Topic) -> None:
        self.statuses.append((topic.state.value, topic.detail))

    def on_closed(self, topic: Topic) -> None:
        self.closed += 1

    def backlog(self) -> float:
        return 0.0


def test_publish_numbers_keeps_history_and_fans_out() -> None:
    t = Topic(FEED, "F1")
    a, b = Recorder(), Recorder()
    t.attach(a)
    t.attach(b)
    for i in range(8):
        t.publish(f'{{"ix":{i}}}', None)
    assert t.seq == t.frames_in == 8
    assert [f.seq for f in a.frames] == list(range(1, 9))
    assert a.frames[3] is b.frames[3]  # one object, shared
    assert t.history_len == 5
    assert [f.seq for f in t.history] == [4, 5, 6, 7, 8]
    assert t.latest == '{"ix":7}'
    assert t.subscriber_count == 2
    assert t.detach(a) and not t.detach(a)
    t.publish("{}", None)
    assert len(a.frames) == 8 and len(b.frames) == 9


def test_backfill_and_resume() -> None:
    t = Topic(FEED, "F1")
    assert t.backfill(None) == [] and t.resume(0, t.epoch) == []
    for i in range(8):
        t.publish(str(i), None)
    assert [f.seq for f in t.backfill(None)] == [4, 5, 6, 7, 8]
    assert [f.seq for f in t.backfill(-1)] == [4, 5, 6, 7, 8]
    assert t.backfill(0) == []
    assert [f.seq for f in t.backfill(2)] == [7, 8]
    assert [f.seq for f in t.backfill(99)] == [4, 5, 6, 7, 8]
    resumed = t.resume(5, t.epoch)
    assert resumed is not None and [f.seq for f in resumed] == [6, 7, 8]
    resumed = t.resume(3, t.epoch)  # frame 4 is the oldest held: still complete
    assert resumed is not None and [f.seq for f in resumed] == [4, 5, 6, 7, 8]
    assert t.resume(8, t.epoch) == []
    assert t.resume(2, t.epoch) is None  # frame 3 is gone
    assert t.resume(5, "other-epoch") is None
    # Ahead in the same numbering (a cluster relay behind): nothing yet, nothing missed.
    assert t.resume(9, t.epoch) == [] and t.resume_start(12, t.epoch) == 13
    assert t.resume(8 + RESUME_AHEAD_MAX + 1, t.epoch) is None  # another numbering
    assert Topic(FEED, "F1").epoch != t.epoch


def test_a_resume_ahead_joins_at_the_frame_after_its_last() -> None:
    """A subscriber attached after a seq the topic has not reached (it resumed ahead, from an
    instance further on) hears status changes and the close meanwhile, and gets frames from
    the one after its last: none twice, none missed."""
    t = Topic(FEED, "F1")
    t.publish("a", None)
    ahead, other, gone = Recorder(), Recorder(), Recorder()
    t.attach_after(ahead, 3)
    t.attach_after(other, 1)  # not ahead: attached now
    t.attach_after(gone, 5)
    assert t.subscriber_count == 3
    t.detach(gone)
    t.set_status(FixtureState.LIVE, "")
    for text in "bcde":
        t.publish(text, None)
    assert [f.seq for f in ahead.frames] == [4, 5] and ahead.statuses == [("live", "")]
    assert [f.seq for f in other.frames] == [2, 3, 4, 5] and gone.frames == []
    # A relayed numbering that jumps past the waiting one's next frame admits it at the jump.
    jumper = Recorder()
    t.attach_after(jumper, 7)
    t.publish_at(10, "j", None)
    assert [f.seq for f in jumper.frames] == [10]
    waiting = Recorder()
    t.attach_after(waiting, 20)
    t.close()
    assert waiting.closed == 1 and waiting.statuses[-1][0] == "stopped" and waiting.frames == []


def test_history_zero_keeps_latest_and_resumes_only_when_current() -> None:
    t = Topic(FeedConfig(kind="tracking", url="wss://x.test/a", history=0, name="z"), "F")
    t.publish("a", None)
    t.publish("b", None)
    assert t.latest == "b" and t.backfill(None) == []
    assert t.resume(2, t.epoch) == [] and t.resume(1, t.epoch) is None


def test_status_dedup_and_close() -> None:
    t = Topic(FEED, "F1")
    r = Recorder()
    t.attach(r)
    t.set_status(FixtureState.CONNECTING, "")  # the initial state: no change
    t.set_status(FixtureState.LIVE, "")
    t.set_status(FixtureState.LIVE, "")
    t.set_status(FixtureState.BACKOFF, "retry in 2 s")
    t.set_status(FixtureState.BACKOFF, "retry in 4 s")
    assert r.statuses == [("live", ""), ("backoff", "retry in 2 s"), ("backoff", "retry in 4 s")]
    t.close()
    assert r.statuses[-1][0] == "stopped" and r.closed == 1
    assert t.subscriber_count == 0
    with pytest.raises(RuntimeError):
        t.attach(r)


def test_subscriber_leaving_during_fanout_does_not_disturb_others() -> None:
    t = Topic(FEED, "F1")
    later = Recorder()

    class Leaver(Recorder):
        def on_frame(self, frame: Frame) -> None:
            super().on_frame(frame)
            t.detach(self)
            t.detach(later)

    first = Leaver()
    t.attach(first)
    t.attach(later)
    t.publish("x", None)  # the snapshot still reaches `later` this once
    t.publish("y", None)
    assert [f.raw for f in first.frames] == ["x"] and [f.raw for f in later.frames] == ["x"]


def test_envelope_is_byte_exact_and_raw_is_verbatim() -> None:
    t = Topic(FeedConfig(kind="tracking", url="wss://x.test/a", name='we"ird'), "fïx")
    raw = '{"b" : 1.50,  "a":"\u00e9\U0001f600"}'
    t.publish(raw, None)
    r = Recorder()
    t.attach(r)
    t.publish(raw, None)
    frame = r.frames[0]
    payload = (
        b'{"type":"frame","feed":"we\\"ird","fixture":"f\xc3\xafx","seq":2,"data":'
        + raw.encode()
        + b"}"
    )
    assert frame.envelope_ws == frame_header(len(payload)) + payload
    assert frame.envelope_ws is frame.envelope_ws  # built once
    assert orjson.loads(payload)["data"] == orjson.loads(raw)
    assert frame.raw_ws == frame_header(len(raw.encode())) + raw.encode()


def test_history_holds_text_only_and_is_invisible_to_the_garbage_collector() -> None:
    # Held frames are (seq, bytes) pairs, which the cyclic GC untracks: a full history must not
    # lengthen its scans (they were the paced benchmark's latency tail). Backfill gets fresh
    # Frame objects whose encodings equal the live ones, byte for byte.
    t = Topic(FEED, "F1")
    r = Recorder()
    t.attach(r)
    for ix in range(3):
        t.publish(f'{{"ix":{ix}}}', None)
    gc.collect()
    assert t.history_len == 3
    assert not any(gc.is_tracked(held) for held in t._history)
    live = r.frames[0]
    again = t.backfill(3)[0]
    assert again is not live and again.seq == live.seq == 1
    assert again.envelope_ws == live.envelope_ws and again.raw_ws == live.raw_ws
    assert again.raw == '{"ix":0}' and again.raw_bytes == b'{"ix":0}'
    assert [f.seq for f in t.resume(1, t.epoch) or []] == [2, 3]


@pytest.mark.parametrize(
    ("length", "opcode"),
    [
        (n, op)
        for n in (0, 1, 125, 126, 127, 65535, 65536, 70000)
        for op in (Opcode.TEXT, Opcode.BINARY)
    ]
    + [(n, Opcode.PING) for n in (0, 125)],
)
def test_frame_header_matches_wsproto(length: int, opcode: Opcode) -> None:
    payload = b"a" * length
    expected = bytes(FrameProtocol(client=False, extensions=[])._serialize_frame(opcode, payload))
    assert encode_frame(payload, int(opcode)) == expected


def test_sequenced_is_the_publishers_verdict() -> None:
    """The hub never parses a frame to decide whether the vendor numbered it."""
    # A number the publisher did not report does not count, wherever it sits in the text...
    assert not Frame(1, '{"fixtureSeqNum":3}', 0.0, b"").sequenced
    # ...and one it did report counts, wherever the classifier found it.
    assert Frame(1, '{"matchEvent":{"fixtureSeqNum":3}}', 0.0, b"", 3).sequenced
    t = Topic(FEED, "f")
    t.publish('{"matchEvent":{"fixtureSeqNum":3}}', 3)
    t.publish('{"eventElementType":"ConnectionStateChanged"}', None)
    # The position is kept in the history: backfill and resume frames carry it too.
    assert [(f.seq, f.position, f.sequenced) for f in t.backfill(None)] == [
        (1, 3, True),
        (2, None, False),
    ]
    resumed = t.resume(1, t.epoch)
    assert resumed is not None and [(f.seq, f.position) for f in resumed] == [(2, None)]


def test_frames_per_second(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    t = Topic(FEED, "F1")
    for second in range(RATE_WINDOW + 1):
        now[0] = 1000.0 + second
        for _ in range(10):
            t.publish("x", None)
    # The current (partial) second is not counted; the window's full seconds are.
    assert t.frames_per_second() == 10.0
    now[0] += 2 * RATE_WINDOW
    assert t.frames_per_second() == 0.0


def test_frame_age_counts_from_the_last_published_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [500.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    t = Topic(FEED, "F1")
    assert t.frame_age() is None  # no frame yet
    t.keep_at(4, "kept", None)  # a relay's history: not delivered to anyone
    assert t.frame_age() is None
    t.publish("x", None)
    now[0] += 7.5
    assert t.frame_age() == 7.5
    t.publish("y", None)
    assert t.frame_age() == 0.0


def test_latency_histogram() -> None:
    h = LatencyHistogram()
    assert h.buckets == LATENCY_BUCKETS and h.buckets[-1] == math.inf
    h.observe(0.0)
    h.observe(0.0003)
    h.observe(99.0)
    assert h.count == 3 and h.sum == pytest.approx(99.0003)
    assert h.counts[0] == 1 and h.counts[LATENCY_BUCKETS.index(0.0005)] == 1
    assert h.counts[-1] == 1
    for _ in range(SAMPLE_EVERY * 4):
        h.sample(0.0)
    assert h.count == 3 + 4
    with pytest.raises(ValueError):
        LatencyHistogram((1.0, 0.5, math.inf))


class FakeDirectory:
    def __init__(self) -> None:
        self.followed = {("tracking", "CFG")}
        self.calls: list[tuple[str, str]] = []
        self.refuse = False

    def is_followed(self, feed: str, fixture: str) -> bool:
        return (feed, fixture) in self.followed

    def demand(self, feed: str, fixture: str) -> bool:
        self.calls.append(("demand", fixture))
        return not self.refuse

    def release(self, feed: str, fixture: str) -> None:
        self.calls.append(("release", fixture))


def test_hub_topics_and_open_rules() -> None:
    d = FakeDirectory()
    hub = Hub({"tracking": FEED, "od": OD}, d)
    with pytest.raises(UnknownFeedError):
        hub.topic("nope", "x")
    with pytest.raises(UnknownFeedError):
        hub.open("nope", "x")
    with pytest.raises(UnknownFixtureError):
        hub.open("tracking", "unknown")
    t = hub.open("tracking", "CFG")  # followed by the directory: created
    assert hub.get("tracking", "CFG") is t and hub.topic("tracking", "CFG") is t
    assert t.latency is hub.fanout_latency
    r = Recorder()
    t.attach(r)
    hub.leave(t, r)
    assert d.calls == [("release", "CFG")]
    # On demand: asked every time the topic has no subscriber (it may be lingering).
    m = hub.open("od", "M")
    assert d.calls[-1] == ("demand", "M")
    m.attach(r)
    assert hub.open("od", "M") is m and d.calls[-1] == ("demand", "M") and len(d.calls) == 2
    hub.leave(m, r)
    assert d.calls[-1] == ("release", "M")
    d.refuse = True
    with pytest.raises(UnknownFixtureError, match="refused"):
        hub.open("od", "N")
    assert {x.fixture for x in hub.topics()} == {"CFG", "M"}
    hub.close_topic("tracking", "CFG")
    assert hub.get("tracking", "CFG") is None and t.closed
    hub.close_topic("tracking", "CFG")  # idempotent
    assert hub.topic("tracking", "CFG").epoch != t.epoch


@pytest.mark.parametrize(
    "fixture",
    ["../../x", "a/b", "a b", "a\nFAKE LOG LINE", "%2F", "-dash", "", "x" * 129, "\u00e9"],
)
def test_on_demand_refuses_ids_that_could_change_an_upstream_url(fixture: str) -> None:
    d = FakeDirectory()
    hub = Hub({"od": OD}, d)
    assert not valid_fixture_id(fixture)
    with pytest.raises(UnknownFixtureError, match="invalid fixture id"):
        hub.open("od", fixture)
    assert d.calls == []  # the directory was never asked to follow it
    assert hub.get("od", fixture) is None


def test_on_demand_accepts_vendor_ids_and_followed_odd_ones() -> None:
    d = FakeDirectory()
    hub = Hub({"od": OD}, d)
    for fixture in ("5501b26a-1c44-4c3b-9ff5-9322084d41f9", "12345", "sr:match:1.2"):
        assert valid_fixture_id(fixture)
        hub.open("od", fixture)
    assert len(d.calls) == 3
    # A fixture already followed (by config) keeps working whatever its id looks like.
    d.followed.add(("od", "odd id"))
    hub.open("od", "odd id")
    assert d.calls[-1] == ("demand", "odd id")


def test_history_is_bounded_in_bytes_too() -> None:
    """40 frames of 15 MiB once took the process to 732 MB: the byte budget bounds a topic."""
    feed = attrs.evolve(FEED, history=100, history_bytes=1000)
    t = Topic(feed, "f")
    for i in range(1, 11):
        t.publish("x" * 300, i)  # 300 bytes each: at most 3 held
    assert [f.seq for f in t.history] == [8, 9, 10]
    assert t.history_bytes == 900
    resumed = t.resume(7, t.epoch)
    assert resumed is not None and [f.seq for f in resumed] == [8, 9, 10]
    assert t.resume(6, t.epoch) is None  # frame 7 is gone: resuming would hide a gap
    # A frame over the whole budget is not held at all, and what was held before it goes too:
    # the history stays contiguous (never 8, 9, 10 and then 12).
    t.publish("y" * 1001, None)
    assert t.history_len == 0 and t.history_bytes == 0
    assert t.latest == "y" * 1001  # still the latest frame for the API
    t.publish("z", None)
    assert [f.seq for f in t.history] == [12]
    assert t.resume(10, t.epoch) is None
    resumed = t.resume(11, t.epoch)
    assert resumed is not None and [f.seq for f in resumed] == [12]


def test_history_count_still_bounds_small_frames() -> None:
    t = Topic(attrs.evolve(FEED, history=3), "f")
    for i in range(10):
        t.publish("{}", i)
    assert [f.seq for f in t.history] == [8, 9, 10] and t.history_bytes == 6


def test_a_tap_sees_every_frame_taken_in_seq_order() -> None:
    """``Topic.tap`` (the recorder in a cluster) gets every frame the topic takes: published,
    relayed under another numbering, or only kept (a relay priming its history), after the
    fan-out, with the bytes the history holds."""
    seen: list[tuple[int, int | None, bytes]] = []

    class Tap:
        def on_frame(self, topic: Topic, seq: int, position: int | None, raw: bytes) -> None:
            assert topic.seq == seq  # after the topic numbered (and fanned out) the frame
            seen.append((seq, position, raw))

    topic = Topic(FEED, "m1")
    topic.tap = Tap()
    topic.keep_at(3, '{"ix":3}', 3)
    topic.publish('{"ix":4}', 4)
    topic.publish_at(7, '{"ix":7}', 7)
    assert seen == [(3, 3, b'{"ix":3}'), (4, 4, b'{"ix":4}'), (7, 7, b'{"ix":7}')]
    assert seen[-1][2] is topic.held_bytes(7)
