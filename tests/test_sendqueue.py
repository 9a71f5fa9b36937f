"""The send queue on its own: no sockets, no trio, only :class:`gateway.dataplane.SendQueue`.

Covers: the byte budget (in-flight bytes count, every message counts: there is no backfill
allowance), the ``disconnect`` verdict (reported, nothing else changed), ``drop-oldest`` (oldest
droppable first, each sink told once, counts, the new frame itself if it must, and the verdict
when dropping every droppable item is not enough: a backlog of control messages, tails or
frames without a sink), what is never dropped (control messages, tails, frames without a
sink), the close frame (always queued), batches for the writer (order, frame count, latency
sample, gap messages only under drop-oldest and never before a tail), discard (tail kept first,
in-flight batch cut after the message being written) and a property test of the invariants
over random operation sequences. Plus the module layering the split promised (the queue does
no I/O; the connection does not import the registry).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import SlowPolicy
from gateway.dataplane import DeliverySink, SendItem, SendQueue
from gateway.wire import encode_frame

DATAPLANE = Path(__file__).resolve().parent.parent / "gateway" / "dataplane"


class Sink:
    """A subscription as the multiplexed endpoint has it: drops make one pending gap."""

    def __init__(self, name: str = "s") -> None:
        self.name = name
        self.drops: list[int] = []
        self.gap: tuple[int, int] | None = None
        self.gaps_taken: list[tuple[int, int]] = []

    def dropped(self, seq: int) -> None:
        self.drops.append(seq)
        self.gap = (self.gap[0] if self.gap else seq, seq)

    def take_gap(self, seq: int) -> bytes | None:
        if self.gap is None or seq <= self.gap[1]:
            return None
        gap, self.gap = self.gap, None
        self.gaps_taken.append(gap)
        return f"gap {self.name} {gap[0]}-{gap[1]}".encode()


def data(
    seq: int, size: int = 100, sink: DeliverySink | None = None, published: float = 0.0
) -> SendItem:
    return SendItem(bytes([65 + seq % 26]) * size, seq, published, sink)


def control(size: int = 10, fill: bytes = b"c") -> SendItem:
    return SendItem(fill * size, None)


def seqs(q: SendQueue) -> list[int | None]:
    return [item.seq for item in q.items]


# -- the item ----------------------------------------------------------------------------------


def test_item_is_slotted_with_named_fields() -> None:
    sink = Sink()
    item = SendItem(b"abc", 7, 1.5, sink, True)
    assert (item.data, item.seq, item.published, item.sink, item.tail) == (
        b"abc",
        7,
        1.5,
        sink,
        True,
    )
    assert not hasattr(item, "__dict__")
    ctl = SendItem(b"x", None)
    assert (ctl.seq, ctl.published, ctl.sink, ctl.tail) == (None, 0.0, None, False)
    assert "control" in repr(ctl) and "seq=7" in repr(item) and "tail" in repr(item)


# -- budget and the disconnect verdict --------------------------------------------------------


def test_up_to_the_budget_is_accepted() -> None:
    q = SendQueue(1000, "disconnect")
    for seq in range(1, 11):
        assert q.push(data(seq)) is False
    assert q.queued == q.unsent == 1000
    assert seqs(q) == list(range(1, 11))
    assert not q.idle


def test_disconnect_reports_over_budget_and_changes_nothing_else() -> None:
    sink = Sink()
    q = SendQueue(1000, "disconnect")
    for seq in range(1, 11):
        assert q.push(data(seq, sink=sink)) is False
    assert q.push(data(11, sink=sink)) is True
    # The verdict only: the caller decides (closes); nothing was dropped or told.
    assert seqs(q) == list(range(1, 12))
    assert q.queued == 1100
    assert q.dropped == 0 and sink.drops == []
    # Control messages are measured the same way.
    assert q.push(control(1)) is True


def test_in_flight_bytes_count_against_the_budget() -> None:
    q = SendQueue(1000, "disconnect")
    for seq in range(1, 9):
        q.push(data(seq))
    q.take_batch()
    assert (q.queued, q.inflight, q.unsent) == (0, 800, 800)
    assert q.push(data(9)) is False  # 900
    assert q.push(data(10)) is False  # 1000
    assert q.push(data(11)) is True  # 1100
    q.wrote(300)
    assert q.unsent == 800  # 500 in flight + 300 queued


# -- control messages and the close frame ------------------------------------------------------


@pytest.mark.parametrize("policy", ["disconnect", "drop-oldest"])
def test_control_messages_count_against_the_budget_under_either_policy(policy: SlowPolicy) -> None:
    # A peer that never reads its error replies or pongs: the backlog must end in a verdict.
    q = SendQueue(1024, policy)
    for _ in range(10):
        assert q.push(control(100)) is False
    assert q.push(control(100)) is True
    assert q.dropped == 0 and len(q.items) == 11


def test_drop_oldest_verdict_only_after_dropping_every_droppable_frame() -> None:
    sink = Sink()
    q = SendQueue(1000, "drop-oldest")
    q.push(control(500))
    for seq in range(1, 6):
        assert q.push(data(seq, sink=sink)) is False
    assert sink.drops == []  # exactly 1000
    # Under budget again after dropping frames: no verdict.
    assert q.push(control(300)) is False
    assert sink.drops == [1, 2, 3]
    # 1100 of control alone: every frame goes first, then the verdict.
    assert q.push(control(300)) is True
    assert sink.drops == [1, 2, 3, 4, 5]
    assert seqs(q) == [None, None, None]
    assert q.queued == 1100


@pytest.mark.parametrize("policy", ["disconnect", "drop-oldest"])
def test_push_close_is_always_queued_whatever_the_budget(policy: SlowPolicy) -> None:
    q = SendQueue(1024, policy)
    q.push(SendItem(b"t" * 5000, 1, 0.0, None, True))  # a tail alone over the budget
    q.discard()
    q.push_close(SendItem(b"close", None))
    assert [i.data for i in q.items] == [b"t" * 5000, b"close"]
    assert q.queued == 5005 and q.dropped == 0


# -- drop-oldest -------------------------------------------------------------------------------


def test_drop_oldest_drops_oldest_first_until_under_budget() -> None:
    sink = Sink()
    q = SendQueue(1000, "drop-oldest")
    for seq in range(1, 11):
        assert q.push(data(seq, sink=sink)) is False
    assert sink.drops == []
    assert q.push(data(11, 250, sink=sink)) is False
    # 1250 bytes: three 100-byte frames must go to get back to 950.
    assert sink.drops == [1, 2, 3]
    assert q.dropped == 3
    assert seqs(q) == list(range(4, 12))
    assert q.queued == 950 == sum(len(i.data) for i in q.items)
    q.push(data(12, sink=sink))
    assert sink.drops == [1, 2, 3, 4]
    assert q.dropped == 4


def test_each_frame_tells_its_own_sink() -> None:
    a, b = Sink("a"), Sink("b")
    q = SendQueue(400, "drop-oldest")
    for seq, sink in ((1, a), (1, b), (2, a), (2, b)):
        q.push(data(seq, sink=sink))
    q.push(data(3, 200, sink=a))
    assert (a.drops, b.drops) == ([1], [1])
    assert q.dropped == 2


def test_drop_oldest_never_drops_control_and_keeps_order() -> None:
    sink = Sink()
    q = SendQueue(300, "drop-oldest")
    q.push(control(50, b"1"))
    q.push(data(1, sink=sink))
    q.push(control(50, b"2"))
    q.push(data(2, sink=sink))
    assert q.push(data(3, 200, sink=sink)) is False
    assert sink.drops == [1, 2]
    assert [i.data[:1] for i in q.items] == [b"1", b"2", data(3).data[:1]]
    assert q.queued == 300


def test_drop_oldest_may_drop_the_new_frame_itself() -> None:
    sink = Sink()
    q = SendQueue(1024, "drop-oldest")
    q.push(control(1000))
    assert q.push(data(1, sink=sink)) is False
    assert sink.drops == [1]
    assert seqs(q) == [None]


def test_frames_without_a_sink_are_never_dropped() -> None:
    q = SendQueue(1024, "drop-oldest")
    for seq in range(1, 11):
        assert q.push(data(seq)) is False
    # Over budget with nothing droppable: the verdict, and still nothing dropped.
    assert q.push(data(11)) is True
    assert seqs(q) == list(range(1, 12))
    assert q.dropped == 0


def test_tail_is_never_dropped_and_stays_first() -> None:
    sink = Sink()
    q = SendQueue(1024, "drop-oldest")
    # A tail carries its sink here only to prove the flag alone protects it.
    q.push(SendItem(b"t" * 600, 1, 0.0, sink, True))
    for seq in range(2, 12):
        q.push(data(seq, sink=sink))
    assert q.items[0].tail and q.items[0].seq == 1
    assert 1 not in sink.drops
    assert sink.drops == [2, 3, 4, 5, 6, 7]
    assert q.queued == 1000


def test_in_flight_bytes_can_force_every_queued_frame_out() -> None:
    sink = Sink()
    q = SendQueue(1024, "drop-oldest")
    q.push(data(1, 1000))
    q.take_batch()
    q.push(control(10))
    for seq in range(2, 5):
        q.push(data(seq, sink=sink))
    assert sink.drops == [2, 3, 4]
    assert seqs(q) == [None]


# -- batches -----------------------------------------------------------------------------------


def test_take_batch_joins_in_order_counts_frames_and_samples_the_first_publish() -> None:
    q = SendQueue(10_000, "disconnect")
    items = [
        control(5, b"a"),
        SendItem(b"T" * 7, 1, 0.0, None, True),  # the tail of data frame 1
        SendItem(b"t" * 3, None, 0.0, None, True),  # the tail of a control message
        data(2, 20),  # backfill: nothing to sample
        data(3, 30, published=12.5),
        data(4, 40, published=13.5),
        control(6, b"z"),
    ]
    for item in items:
        q.push(item)
    buf, frames, published = q.take_batch()
    assert buf == b"".join(i.data for i in items)
    assert frames == 4  # data frames 1 (its tail), 2, 3, 4; control never counts
    assert published == 12.5
    assert not q.items and q.queued == 0
    assert q.writing and q.inflight == q.batch_end == len(buf)
    assert not q.idle


def test_take_batch_without_publish_times_samples_nothing() -> None:
    q = SendQueue(10_000, "disconnect")
    q.push(data(1))
    q.push(control())
    _, frames, published = q.take_batch()
    assert (frames, published) == (1, 0.0)


def test_take_batch_of_one_item_does_not_copy() -> None:
    q = SendQueue(10_000, "disconnect")
    item = data(1, 3000)
    q.push(item)
    buf, _, _ = q.take_batch()
    assert buf is item.data


def test_wrote_and_batch_done() -> None:
    q = SendQueue(10_000, "disconnect")
    q.push(data(1, 300))
    q.take_batch()
    q.push(data(2))  # queued behind the batch
    q.wrote(120)
    assert (q.inflight, q.batch_end) == (180, 300)
    q.wrote(180)
    q.batch_done()
    assert (q.writing, q.inflight, q.queued) == (False, 0, 100)
    assert seqs(q) == [2]
    assert q.idle is False
    q.take_batch()
    q.wrote(100)
    q.batch_done()
    assert (q.idle, q.unsent) == (True, 0)


def test_gap_message_goes_right_before_the_next_frame_under_drop_oldest() -> None:
    a, b = Sink("a"), Sink("b")
    q = SendQueue(350, "drop-oldest")
    q.push(data(1, sink=a))
    q.push(data(2, sink=a))
    q.push(data(1, sink=b))
    q.push(data(3, 100, sink=a))  # 400 > 350: a's frame 1 dropped
    assert a.drops == [1] and b.drops == []
    buf, frames, _ = q.take_batch()
    gap = encode_frame(b"gap a 1-1")
    assert buf == gap + data(2).data + data(1).data + data(3).data
    assert frames == 3
    assert a.gaps_taken == [(1, 1)] and b.gaps_taken == []
    # The gap is its own part of the batch: see the trim test below.
    assert q.batch_end == len(buf)


def test_no_gap_messages_under_disconnect() -> None:
    sink = Sink()
    sink.gap = (1, 5)
    q = SendQueue(10_000, "disconnect")
    q.push(data(6, sink=sink))
    buf, _, _ = q.take_batch()
    assert buf == data(6).data
    assert sink.gap == (1, 5)


def test_no_gap_message_before_a_tail() -> None:
    sink = Sink()
    sink.gap = (1, 5)
    q = SendQueue(10_000, "drop-oldest")
    q.push(SendItem(b"rest", 6, 0.0, sink, True))
    buf, frames, _ = q.take_batch()
    assert (buf, frames) == (b"rest", 1)
    assert sink.gap == (1, 5)  # still pending: the next whole frame gets it


# -- closing: discard, trim, clear ------------------------------------------------------------


def test_discard_keeps_only_the_unfinished_tail_first() -> None:
    sink = Sink()
    q = SendQueue(1000, "disconnect")
    tail = SendItem(b"t" * 70, 1, 0.0, None, True)
    q.push(tail)
    q.push(data(2, sink=sink))
    q.push(control())
    q.push(data(3, sink=sink))
    q.discard()
    assert list(q.items) == [tail]
    assert q.queued == 70
    assert sink.drops == [] and q.dropped == 0  # a discard is not a drop


def test_discard_without_tail_empties_the_queue() -> None:
    q = SendQueue(1000, "disconnect")
    q.push(control())
    q.push(data(1))
    q.discard()
    assert not q.items and q.queued == 0


def _batch_of(q: SendQueue, sizes: list[int]) -> None:
    for seq, size in enumerate(sizes, 1):
        q.push(data(seq, size))
    q.take_batch()


def test_discard_cuts_the_batch_after_the_message_being_written() -> None:
    q = SendQueue(10_000, "disconnect")
    _batch_of(q, [100, 200, 300, 400])
    q.wrote(150)  # in the middle of the second message (100..300)
    q.discard()
    assert (q.batch_end, q.inflight) == (300, 150)
    q.wrote(150)
    assert q.inflight == 0


def test_discard_finishes_the_first_message_if_nothing_was_written_yet() -> None:
    q = SendQueue(10_000, "disconnect")
    _batch_of(q, [100, 200])
    q.discard()
    assert (q.batch_end, q.inflight) == (100, 100)


def test_discard_at_a_message_boundary_keeps_the_next_message() -> None:
    # Existing behaviour, pinned: after exactly one whole message the next one is kept whole.
    q = SendQueue(10_000, "disconnect")
    _batch_of(q, [100, 200, 300])
    q.wrote(100)
    q.discard()
    assert (q.batch_end, q.inflight) == (300, 200)


def test_discard_in_the_last_message_changes_nothing() -> None:
    q = SendQueue(10_000, "disconnect")
    _batch_of(q, [100, 200])
    q.wrote(250)
    q.discard()
    assert (q.batch_end, q.inflight) == (300, 50)


def test_discard_trims_a_gap_message_as_its_own_part() -> None:
    sink = Sink()
    q = SendQueue(250, "drop-oldest")
    for seq in range(1, 4):
        q.push(data(seq, sink=sink))
    assert sink.drops == [1]
    q.take_batch()
    gap_len = len(encode_frame(b"gap s 1-1"))
    q.wrote(1)  # inside the gap message
    q.discard()
    assert (q.batch_end, q.inflight) == (gap_len, gap_len - 1)


def test_discard_when_nothing_is_in_flight_touches_no_batch() -> None:
    q = SendQueue(10_000, "disconnect")
    _batch_of(q, [100, 200])
    q.wrote(300)
    q.batch_done()
    q.push(data(3))
    q.discard()
    assert (q.writing, q.inflight, q.queued) == (False, 0, 0)


def test_clear_forgets_the_queue_but_not_the_bytes_in_flight() -> None:
    q = SendQueue(10_000, "disconnect")
    _batch_of(q, [100])
    q.push(SendItem(b"t" * 10, 2, 0.0, None, True))
    q.push(control())
    q.clear()
    assert not q.items and q.queued == 0
    assert q.inflight == 100 and q.unsent == 100


# -- invariants over random operations ---------------------------------------------------------

Op = tuple[str, int]


@settings(max_examples=300, deadline=None)
@given(
    policy=st.sampled_from(["disconnect", "drop-oldest"]),
    budget=st.integers(min_value=1024, max_value=4096),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["data", "nosink", "control", "take", "write", "done"]),
            st.integers(min_value=1, max_value=1500),
        ),
        max_size=60,
    ),
)
def test_invariants(policy: SlowPolicy, budget: int, ops: list[Op]) -> None:
    q = SendQueue(budget, policy)
    sink = Sink()
    seq = 0
    accepted: list[int | None] = []  # what went in, in order
    taken: list[int | None] = []  # what went out in batches
    for op, n in ops:
        if op in ("data", "nosink", "control"):
            if op == "control":
                item = control(n)
            else:
                seq += 1
                item = data(seq, n, sink=None if op == "nosink" else sink)
            accepted.append(item.seq)
            over = q.push(item)
            # Under either policy the verdict is exactly "still over budget"; drop-oldest
            # first drops until under it or nothing droppable is left.
            assert over == (q.unsent > budget)
            if policy == "drop-oldest" and over:
                assert not any(i.sink is not None and not i.tail for i in q.items)
        elif op == "take" and q.items and not q.writing:
            taken.extend(i.seq for i in q.items)
            q.take_batch()
        elif op == "write" and q.writing:
            q.wrote(min(n, q.inflight))
        elif op == "done" and q.writing and not q.inflight:
            q.batch_done()
        assert q.queued == sum(len(i.data) for i in q.items)
        assert q._droppable == sum(1 for i in q.items if i.sink is not None and not i.tail)
        assert q.inflight >= 0
        assert q.dropped == len(sink.drops) == len(set(sink.drops))
    # Nothing lost but the reported drops, nothing reordered, control never dropped.
    survived = taken + [i.seq for i in q.items]
    dropped = set(sink.drops)
    assert survived == [s for s in accepted if s is None or s not in dropped]


# -- layering ----------------------------------------------------------------------------------


def _imports(module: str) -> set[str]:
    tree = ast.parse((DATAPLANE / module).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_queue_does_no_io() -> None:
    assert not {"trio", "os", "socket", "select", "selectors"} & _imports("_sendqueue.py")


def test_the_connection_does_not_import_the_registry() -> None:
    # Not even under TYPE_CHECKING: slow disconnects reach the registry through on_slow.
    assert "gateway.dataplane._registry" not in _imports("_connection.py")
