"""The recorder on its own: the line format, the torn-line scan, retention's choice (no I/O),
and a :class:`Recorder` on real files in a temp dir (write, rotate, compress, read back,
reopen after a clean stop, after a torn write, without its index, retention), and what it must
never touch: symlinks, hard links and FIFOs planted in its directory (files outside unchanged).

Rules of tests/conftest.py: every test has a hard ``trio.fail_after``; nothing sleeps a guessed
time (``wait_until`` polls the writer's counters).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import zstandard

from gateway.config import FeedConfig, RecorderSection
from gateway.hub import RESUME_AHEAD_MAX, Topic
from gateway.recorder import (
    RUN_STATE,
    BadRecord,
    FixtureLog,
    FixtureUsage,
    LineScanner,
    Recorder,
    SegmentUsage,
    choose_deletions,
    decode,
    dir_name,
    encode,
    parse_segment_name,
    read_recording,
    segment_name,
)
from tests.kit import wait_until

# -- the line format ---------------------------------------------------------------------------


def test_a_frame_goes_in_verbatim_and_comes_back() -> None:
    raw = b'{"ix": 7, "mt": 1.10, "s": "caf\xc3\xa9 \xe2\x80\xa8"}'
    line = encode(42, 7, 1714567890.123456, raw)
    assert line == b'{"seq":42,"pos":7,"t":1714567890.123456,"data":' + raw + b"}\n"
    assert orjson.loads(line)["data"]["ix"] == 7  # the line is JSON too
    assert decode(line) == (42, 7, 1714567890.123456, raw)
    assert decode(line[:-1]).raw == raw


def test_a_frame_with_a_line_break_is_stored_as_a_string() -> None:
    raw = b'{\n  "ix": 1\r\n}'
    line = encode(3, None, 5.0, raw)
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert decode(line) == (3, None, 5.0, raw)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b'{"ix": 1}',
        b'{"seq":1,"pos":null,"t":1.0,"data":{"a":1,"b',  # torn
        b'{"seq":1,"pos":null,"t":1.0,"data":{"a":\x00\x00}',  # a zeroed page
        b'{"seq":0,"pos":null,"t":1.0,"data":1}',
        b'{"seq":1,"pos":"x","t":1.0,"data":1}',
        b'{"seq":1,"pos":null,"t":"now","data":1}',
        b'{"seq":1,"pos":null,"t":1.0}',
    ],
)
def test_what_is_not_a_record_line(line: bytes) -> None:
    with pytest.raises(BadRecord):
        decode(line)


def test_segment_names_and_directory_names() -> None:
    assert segment_name(1) == "000000000001.jsonl"
    assert segment_name(4711, compressed=True) == "000000004711.jsonl.zst"
    assert parse_segment_name("000000004711.jsonl.zst") == (4711, True)
    assert parse_segment_name("000000004711.jsonl") == (4711, False)
    assert parse_segment_name("index.json") is None
    assert (
        dir_name("5501b26a-1c44-4c3b-9ff5-9322084d41f9") == "5501b26a-1c44-4c3b-9ff5-9322084d41f9"
    )
    for hostile in ("..", ".", "a/b", "../x", ".hidden", "x y"):
        safe = dir_name(hostile)
        assert "/" not in safe and not safe.startswith(".") and safe not in ("", ".", "..")


# -- the scan ----------------------------------------------------------------------------------


def _lines(first: int, n: int) -> bytes:
    return b"".join(encode(s, s, float(s), b'{"ix":%d}' % s) for s in range(first, first + n))


def test_the_scan_keeps_every_intact_line_and_stops_at_a_torn_one() -> None:
    data = _lines(5, 10)
    torn = data + b'{"seq":15,"pos":15,"t":15.0,"da'
    scanner = LineScanner("x", 5)
    for i in range(0, len(torn), 7):  # chunk boundaries anywhere
        scanner.feed(torn[i : i + 7])
    info = scanner.finish()
    assert (scanner.good, info.count, info.first_seq, info.last_seq) == (len(data), 10, 5, 14)
    assert info.max_position == 14 and info.raw_bytes == len(data)
    assert scanner.error is not None and "torn" in scanner.error


@pytest.mark.parametrize(
    "damage",
    [b"\x00" * 4096, _lines(20, 1), b"garbage\n"],
    ids=["zeros", "seq-jump", "garbage"],
)
def test_the_scan_stops_at_damage_and_nothing_after_it_counts(damage: bytes) -> None:
    data = _lines(1, 3)
    scanner = LineScanner("x", 1)
    scanner.feed(data + damage + _lines(4, 2))
    scanner.finish()
    assert scanner.good == len(data) and scanner.info.last_seq == 3
    assert scanner.error is not None


# -- retention's choice ------------------------------------------------------------------------


def _usage(key: str, last_t: float, *sizes: int, open_bytes: int = 0) -> FixtureUsage:
    segs = [
        SegmentUsage(f"{key}{i}", last_t - 10 * (len(sizes) - i), n) for i, n in enumerate(sizes)
    ]
    return FixtureUsage(key=key, last_t=last_t, segments=segs, open_bytes=open_bytes)


def test_retention_by_size_removes_the_oldest_fixtures_first() -> None:
    fixtures = [
        _usage("new", 3000.0, 10, 10),
        _usage("old", 1000.0, 10, 10),
        _usage("mid", 2000.0, 10),
    ]
    out = choose_deletions(fixtures, now=3000.0, retention_days=None, max_bytes=25)
    assert out == [("old", "old0"), ("old", "old1"), ("mid", "mid0")]
    assert choose_deletions(fixtures, now=3000.0, retention_days=None, max_bytes=50) == []


def test_retention_never_removes_a_segment_being_written() -> None:
    fixtures = [_usage("live", 10.0, 10, open_bytes=1000)]
    assert choose_deletions(fixtures, now=10.0, retention_days=None, max_bytes=1) == [
        ("live", "live0")
    ]


def test_retention_by_age_removes_segments_older_than_the_days() -> None:
    day = 86400.0
    fixtures = [_usage("a", 40 * day, 1, 1, 1), _usage("b", 5 * day, 1)]
    # a's segments end at 40d-30s, 40d-20s, 40d-10s; b's at 5d-10s. Cut at 10 days before 45d.
    out = choose_deletions(fixtures, now=45 * day, retention_days=10.0, max_bytes=None)
    assert out == [("b", "b0")]
    out = choose_deletions(fixtures, now=50 * day - 15, retention_days=10.0, max_bytes=None)
    assert out == [("a", "a0"), ("a", "a1"), ("b", "b0")]


# -- a Recorder on real files ------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _settings(path: Path, **kw: object) -> RecorderSection:
    return RecorderSection(dir=path, **kw)  # type: ignore[arg-type]


@asynccontextmanager
async def running(recorder: Recorder) -> AsyncIterator[Recorder]:
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        yield recorder
        nursery.cancel_scope.cancel()


def _frame(i: int) -> str:
    return f'{{"ix":{i - 1},"pad":"{"x" * 200}"}}'


def _feed(recorder: Recorder, lg: FixtureLog, first: int, n: int) -> None:
    for seq in range(first, first + n):
        recorder.append(lg, seq, seq - 1, _frame(seq).encode())


async def _read_all(lg: FixtureLog, seq: int = 1) -> list[tuple[int, int | None, bytes]]:
    cursor = lg.open_cursor(seq)
    out: list[tuple[int, int | None, bytes]] = []
    while chunk := await trio.to_thread.run_sync(cursor.read, 4096):
        out += chunk
    cursor.close()
    return out


async def test_write_rotate_compress_read_back_and_reopen(tmp_path: Path) -> None:
    with trio.fail_after(30):
        rec = Recorder(_settings(tmp_path, segment_bytes=64 * 1024))
        lg = rec.fixture("tracking", "m1")
        rec.activate(lg)
        async with running(rec):
            for first in range(1, 2001, 100):  # several batches: several segments
                _feed(rec, lg, first, 100)
                await wait_until(lambda f=first: lg.written_seq == f + 99)
            await wait_until(
                lambda: all(s.compressed for s in lg.segments) and len(lg.segments) >= 3
            )
            got = await _read_all(lg, 777)
            assert [s for s, _, _ in got] == list(range(777, 2001))
            assert all(raw == _frame(s).encode() for s, _, raw in got)
            assert [p for _, p, _ in got] == list(range(776, 2000))
            assert rec.queued_bytes == 0 and lg.frames_written == 2000
        files = sorted(os.listdir(lg.path))
        assert "meta.json" in files and "index.json" in files
        assert all(f.endswith(".zst") for f in files if ".jsonl" in f) or lg.open_segment
        state = orjson.loads((tmp_path / RUN_STATE).read_bytes())
        assert state["clean"] is True and state["incomplete"] == []

        again = Recorder(_settings(tmp_path, segment_bytes=64 * 1024))
        lg2 = again.get("tracking", "m1")
        assert lg2 is not None
        assert (lg2.last_seq, lg2.last_position, lg2.first_seq) == (2000, 1999, 1)
        assert lg2.epoch == lg.epoch and lg2.prior_epochs == {}  # a clean stop keeps the epoch
        records = list(read_recording(lg2.path))
        assert [r.seq for r in records] == list(range(1, 2001))


async def test_a_torn_last_line_is_cut_and_a_lost_index_rebuilt(tmp_path: Path) -> None:
    with trio.fail_after(30):
        rec = Recorder(_settings(tmp_path, segment_bytes=64 * 1024))
        lg = rec.fixture("tracking", "m1")
        rec.activate(lg)
        async with running(rec):
            _feed(rec, lg, 1, 300)
            await wait_until(lambda: lg.written_seq == 300)
            _feed(rec, lg, 301, 10)  # a second batch: left in the open segment
            await wait_until(lambda: lg.written_seq == 310)
        epoch = lg.epoch
        assert lg.open_segment is not None
        open_path = lg.path / lg.open_segment.name
        size = open_path.stat().st_size
        # What kill -9 in the middle of a write, and a power loss, leave behind.
        with open_path.open("ab") as f:
            f.write(b'{"seq":311,"pos":310,"t":1.0,"data":{"ix":3')
        (lg.path / "index.json").unlink()
        (tmp_path / RUN_STATE).write_text('{"version": 1, "clean": false}')

        again = Recorder(_settings(tmp_path, segment_bytes=64 * 1024))
        lg2 = again.get("tracking", "m1")
        assert lg2 is not None
        assert open_path.stat().st_size == size  # cut after the last intact line
        assert lg2.last_seq == 310 and lg2.first_seq == 1
        assert (lg.path / "index.json").exists()  # rebuilt
        # Not a clean stop: a new epoch from here, the old one still resumes up to seq 310.
        assert lg2.epoch != epoch and lg2.prior_epochs == {epoch: 310}
        got = await _read_all(lg2)
        assert [s for s, _, _ in got] == list(range(1, 311))

        # Recording goes on after the cut, in the same segment, with nothing missing.
        again.activate(lg2)
        async with running(again):
            _feed(again, lg2, 311, 5)
            await wait_until(lambda: lg2.written_seq == 315)
        assert [r.seq for r in read_recording(lg2.path)] == list(range(1, 316))


async def test_a_full_queue_stops_that_fixture_only(tmp_path: Path) -> None:
    with trio.fail_after(30):
        rec = Recorder(_settings(tmp_path, queue_bytes=1024 * 1024))
        big = rec.fixture("tracking", "big")
        small = rec.fixture("tracking", "small")
        rec.activate(big)
        rec.activate(small)
        # The writer is not running: the queue fills up.
        frame = b"x" * 100_000
        for seq in range(1, 20):
            rec.append(big, seq, None, frame)
        assert not big.recording and big.frames_dropped == 9 and big.state == "stopped"
        assert "queue is full" in big.reason
        rec.append(small, 1, None, b"{}")
        assert small.recording and small.last_seq == 1
        async with running(rec):
            await wait_until(lambda: small.written_seq == 1 and big.written_seq == 10)
        state = orjson.loads((tmp_path / RUN_STATE).read_bytes())
        assert ["tracking", "big"] in state["incomplete"]
        assert ["tracking", "small"] not in state["incomplete"]


async def test_retention_removes_the_oldest_fixtures_files_first(tmp_path: Path) -> None:
    clock = Clock()
    with trio.fail_after(30):
        rec = Recorder(
            _settings(tmp_path, segment_bytes=64 * 1024, max_bytes=1024 * 1024), clock=clock
        )
        logs = [rec.fixture("tracking", name) for name in ("first", "second", "third")]
        async with running(rec):
            for lg in logs:
                rec.activate(lg)
                _feed(rec, lg, 1, 400)  # ~90 KB each, compressed to a few KB
                await wait_until(lambda lg=lg: lg.written_seq == 400)
                rec.deactivate(lg)
                await wait_until(lambda lg=lg: bool(lg.segments) and lg.segments[-1].compressed)
                clock.now += 3600
            sizes = [lg.stored_bytes for lg in logs]
            # Room for two of the three: the oldest goes, whole.
            rec.shared.max_bytes = sizes[1] + sizes[2]
            rec._janitor.retention()
            assert [lg.removed for lg in logs] == [True, False, False]
            assert not logs[0].path.exists()
            assert [r.seq for r in read_recording(logs[2].path)] == list(range(1, 401))
            rec.shared.max_bytes = None
            rec.shared.retention_days = 1.0
            clock.now += 81000  # the second's last frame is now over a day old, the third's not
            rec._janitor.retention()
            assert [lg.removed for lg in logs] == [True, True, False]


def test_read_recording_reads_compressed_segments_and_names_a_bad_line(tmp_path: Path) -> None:
    (tmp_path / segment_name(1, compressed=True)).write_bytes(
        zstandard.ZstdCompressor().compress(_lines(1, 3))
    )
    (tmp_path / segment_name(4)).write_bytes(_lines(4, 2) + b'{"seq":6,"pos"')
    assert [r.seq for r in read_recording(tmp_path)] == [1, 2, 3, 4, 5]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(_lines(1, 1) + b"nope\n")
    with pytest.raises(BadRecord, match=r"bad\.jsonl:2"):
        list(read_recording(bad))


# -- the hub's seams for a recorded topic --------------------------------------------------------


class _Archive:
    """A stand-in TopicArchive holding seqs first..written (no I/O)."""

    def __init__(self, first: int, written: int) -> None:
        self.first_seq = first
        self.written_seq = written
        self.recording = True

    def open_cursor(self, seq: int) -> Any:
        raise AssertionError("the hub never reads its archive")


def test_a_recorded_topic_continues_its_numbering_and_honours_a_prior_epoch() -> None:
    feed = FeedConfig(kind="tracking", url="ws://x/y", history=3, name="tracking")
    topic = Topic(feed, "m1", epoch="e2", seq=10, prior_epochs={"e1": 8})
    assert (topic.epoch, topic.seq, topic.first_available) == ("e2", 10, 11)
    topic.publish('{"ix":11}', 11)
    assert topic.seq == 11 and topic.first_held == 11
    # Without the archive only what the history holds can be resumed.
    assert topic.resume_start(8, "e1") is None and topic.resume_start(10, "e2") == 11
    topic.archive = _Archive(1, 11)
    assert topic.first_available == 1 and topic.backfill_start(-1) == 1
    assert topic.backfill_start(5) == 7  # counted back over the archive too
    assert topic.resume_start(8, "e1") == 9  # the old numbering, up to what it shares
    assert topic.resume_start(9, "e1") is None  # past it seq 9 may be another frame
    assert topic.resume_start(3, "e2") == 4 and topic.resume_start(12, "e2") == 13  # ahead
    assert topic.resume_start(11 + RESUME_AHEAD_MAX + 1, "e2") is None
    assert topic.backfill(-1)[0].seq == 11  # the list helpers read the history only


async def test_a_recording_that_cannot_be_opened_is_left_alone(tmp_path: Path) -> None:
    with trio.fail_after(30):
        fixture_dir = tmp_path / "tracking" / "m1"
        fixture_dir.mkdir(parents=True)
        (fixture_dir / segment_name(1)).mkdir()  # unreadable as a segment
        rec = Recorder(_settings(tmp_path))
        lg = rec.get("tracking", "m1")
        assert lg is not None and "cannot open the recording" in lg.broken
        rec.activate(lg)
        assert lg.state == "stopped" and lg.reason == lg.broken
        async with running(rec):
            rec.append(lg, 1, 0, b"{}")
        assert lg.frames_dropped == 1 and (fixture_dir / segment_name(1)).is_dir()


# -- what the recorder did not make: symlinks, FIFOs --------------------------------------------
#
# A link planted in the recorder's directory must never make it read, cut, write or remove a
# file outside it (the hostile probe had a start-up truncate a file elsewhere to 0 bytes). Each
# test plants links to files and directories outside the tree, runs the recorder, and checks
# that every byte outside is as it was, that the refusal shows in the fixture's state, and that
# the other fixtures record on.

#: Bytes of a file outside the tree that is not a recording (the probe's 34-byte file).
VICTIM = b"precious, outside the recorder's dir"
ZSTD = zstandard.ZstdCompressor()


def _outside(tmp_path: Path) -> dict[Path, bytes]:
    """Files outside the recorder's directory, with their bytes: a plain file, another
    recording's segments (record lines: they would be served), and directories laid out like a
    fixture's and a feed's, each with a torn segment (recovery would cut it)."""
    out = tmp_path / "outside"
    torn = _lines(1, 3) + b'{"seq":4,"pos"'
    files = {
        out / "victim": VICTIM,
        out / "secret.jsonl.zst": ZSTD.compress(_lines(1, 5)),
        out / "fixture" / segment_name(1): torn,
        out / "fixture" / "meta.json": b'{"version": 1, "epoch": "e"}\n',
        out / "feed" / "m9" / segment_name(1): torn,
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _assert_untouched(tmp_path: Path, files: dict[Path, bytes]) -> None:
    """Every file outside is there with its bytes, and nothing was added there."""
    out = tmp_path / "outside"
    assert {p for p in out.rglob("*") if not p.is_dir()} == set(files)
    for path, data in files.items():
        assert path.read_bytes() == data, path


async def _record_two(root: Path) -> None:
    """Recordings of tracking m0 and m1 (frames 1-310: a closed, compressed segment and the
    open one), stopped cleanly."""
    rec = Recorder(_settings(root, segment_bytes=64 * 1024))
    async with running(rec):
        for name in ("m0", "m1"):
            lg = rec.fixture("tracking", name)
            rec.activate(lg)
            _feed(rec, lg, 1, 300)  # past segment_bytes: closed after this batch
            await wait_until(lambda lg=lg: lg.written_seq == 300)
            _feed(rec, lg, 301, 10)
            await wait_until(lambda lg=lg: lg.written_seq == 310)
            await wait_until(lambda lg=lg: lg.segments[0].compressed)


def _plant(link: Path, target: Path) -> None:
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(target)


# Where a link is planted (under the recorder's dir), what it names (under outside/), and the
# fixture refused for it.
PLANTS = {
    "open-segment": ("tracking/m1/" + segment_name(301), "victim", ("tracking", "m1")),
    "open-segment-hard-link": (
        "tracking/m1/" + segment_name(301),
        "victim",
        ("tracking", "m1"),
    ),
    "closed-segment": (
        "tracking/m1/" + segment_name(1, compressed=True),
        "secret.jsonl.zst",
        ("tracking", "m1"),
    ),
    "index": ("tracking/m1/index.json", "victim", ("tracking", "m1")),
    "meta": ("tracking/m1/meta.json", "victim", ("tracking", "m1")),
    "fixture-directory": ("tracking/m2", "fixture", ("tracking", "m2")),
    "feed-directory": ("fastpath", "feed", ("fastpath", "m9")),
    "run-state-temporary": (RUN_STATE + ".tmp", "victim", None),
}


@pytest.mark.parametrize("where", PLANTS)
async def test_a_planted_link_is_refused_and_nothing_outside_is_touched(
    tmp_path: Path, where: str
) -> None:
    link, target, refused = PLANTS[where]
    root = tmp_path / "rec"
    with trio.fail_after(60):
        await _record_two(root)
        files = _outside(tmp_path)
        if where.endswith("hard-link"):
            (root / link).unlink()
            os.link(tmp_path / "outside" / target, root / link)
        else:
            _plant(root / link, tmp_path / "outside" / target)

        rec = await trio.to_thread.run_sync(Recorder, _settings(root, segment_bytes=64 * 1024))
        _assert_untouched(tmp_path, files)
        ok = rec.get("tracking", "m0")
        assert ok is not None and ok.last_seq == 310 and not ok.broken
        async with running(rec):
            if refused is not None:
                lg = rec.fixture(*refused)  # a feed's link: not looked into until followed
                rec.activate(lg)
                kind = "hard links" if where.endswith("hard-link") else "a symlink"
                await wait_until(lambda: lg.state == "stopped" and kind in lg.reason)
                assert kind in lg.broken and lg in rec.recordings()
                rec.append(lg, lg.last_seq + 1, None, b"{}")
                assert lg.frames_dropped == 1
                assert await _read_all(lg) == []  # nothing read through the link
            # The others record on.
            rec.activate(ok)
            _feed(rec, ok, 311, 5)
            await wait_until(lambda: ok.written_seq == 315)
        _assert_untouched(tmp_path, files)
        assert [r.seq for r in read_recording(ok.path)] == list(range(1, 316))
        if refused is None:
            assert not (root / link).is_symlink()  # replaced by the recorder's own file
        else:
            assert (root / link).is_symlink() or (root / link).stat().st_nlink == 2  # left alone


async def test_a_fifo_planted_as_a_segment_is_refused_without_blocking(tmp_path: Path) -> None:
    root = tmp_path / "rec"
    fifo = root / "tracking" / "m1" / segment_name(301)
    with trio.fail_after(60):
        await _record_two(root)
        fifo.unlink()
        os.mkfifo(fifo)
        try:
            with trio.fail_after(20):  # an open of the FIFO would block until a writer comes
                rec = await trio.to_thread.run_sync(
                    Recorder, _settings(root), abandon_on_cancel=True
                )
        finally:
            # Let a reader that did block go (a writer end opened and closed: it reads EOF).
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        lg = rec.get("tracking", "m1")
        assert lg is not None and "a FIFO" in lg.broken and lg.state == "stopped"
        ok = rec.get("tracking", "m0")
        assert ok is not None and ok.last_seq == 310 and not ok.broken
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # left alone
        await rec.close()


async def test_retention_never_removes_through_a_link(tmp_path: Path) -> None:
    root = tmp_path / "rec"
    with trio.fail_after(60):
        rec = Recorder(_settings(root, segment_bytes=64 * 1024))
        lg = rec.fixture("tracking", "m1")
        async with running(rec):
            rec.activate(lg)
            _feed(rec, lg, 1, 400)
            await wait_until(lambda: lg.written_seq == 400)
            rec.deactivate(lg)
            await wait_until(lambda: bool(lg.segments) and lg.segments[-1].compressed)
            # The feed's directory swapped for a link to a copy elsewhere (same names).
            outside = tmp_path / "outside" / "tracking"
            shutil.copytree(root / "tracking", outside)
            files = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
            (root / "tracking").rename(tmp_path / "moved")
            (root / "tracking").symlink_to(outside)
            rec.shared.max_bytes = 1  # every closed segment must go
            rec._janitor.retention()
            _assert_untouched(tmp_path, files)
            await wait_until(lambda: lg.state == "stopped" and not rec.shared.events)
            assert "'tracking' is a symlink" in lg.broken and not lg.removed
            rec._janitor.retention()  # refused: not tried again
        _assert_untouched(tmp_path, files)


async def test_a_fixture_directory_swapped_for_a_link_stops_its_recording(
    tmp_path: Path,
) -> None:
    root = tmp_path / "rec"
    with trio.fail_after(60):
        rec = Recorder(_settings(root, segment_bytes=64 * 1024))
        lg = rec.fixture("tracking", "m1")
        other = rec.fixture("tracking", "m0")
        async with running(rec):
            rec.activate(lg)
            rec.activate(other)
            _feed(rec, lg, 1, 10)
            await wait_until(lambda: lg.written_seq == 10)
            outside = tmp_path / "outside" / "m1"
            shutil.copytree(lg.path, outside)
            files = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
            lg.path.rename(tmp_path / "moved")
            lg.path.symlink_to(outside)
            _feed(rec, lg, 11, 300)  # past segment_bytes: the next segment is refused
            _feed(rec, other, 1, 5)
            await wait_until(lambda: lg.state == "stopped" and other.written_seq == 5)
            assert "'m1' is a symlink" in lg.reason
            rec.append(lg, 311, None, b"{}")
            assert lg.frames_dropped == 1
            rec.deactivate(lg)
            await wait_until(lambda: not rec.shared.compress)
        _assert_untouched(tmp_path, files)
        assert [r.seq for r in read_recording(other.path)] == [1, 2, 3, 4, 5]
