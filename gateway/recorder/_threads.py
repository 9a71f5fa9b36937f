"""The recorder's two threads: the writer (appends, rotates, fsyncs) and the janitor
(compresses closed segments with zstd, applies retention, closes segments left idle).

Neither ever runs on the event loop. The trio thread hands frames over through a
``collections.deque`` (append and popleft are atomic) bounded in bytes by the recorder, and
never waits for either thread. Failures are per fixture: an ``OSError`` (a full disk, a file
size limit, a read-only file system) stops that fixture's recording, reported through
:attr:`Shared.events`; the thread goes on with the others.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Final

import attrs
import zstandard

from gateway.recorder._format import encode, segment_name
from gateway.recorder._fs import NotOurFile, Tree, create_file, open_dir, open_file
from gateway.recorder._retention import FixtureUsage, SegmentUsage, choose_deletions
from gateway.recorder._scan import SegmentInfo
from gateway.recorder._store import INDEX, META, FixtureLog, about, write_json_atomic

log = logging.getLogger("gateway.recorder")

#: The writer wakes this often to write what was queued (one write per fixture per batch).
BATCH_INTERVAL: Final = 0.2
_DATA_KEY: Final = b',"data":'
#: zstd level of closed segments: measured in docs/recorder.md (level 1: about 800 MB/s and
#: 7.5x on simulated tracking frames; gzip level 1: 275 MB/s and 5.6x).
COMPRESS_LEVEL: Final = 1
COPY_CHUNK: Final = 1024 * 1024
#: Seconds between two retention passes of the janitor.
RETENTION_INTERVAL: Final = 60.0
#: A segment left open by a fixture that is no longer followed is closed (and compressed)
#: this long after its last frame.
IDLE_CLOSE_AFTER: Final = 600.0
#: The run state file in the recorder's directory (did the last run stop cleanly?).
RUN_STATE: Final = "recorder.json"

# Control items in the queue have seq 0 and the operation where the frame text would be.
OP_OPEN: Final = b"open"
OP_FINISH: Final = b"finish"

# (fixture, seq, position, receive time, frame text); a control item: seq 0, the op as text.
Item = tuple[FixtureLog, int, int | None, float, bytes]


def describe_error(exc: BaseException) -> str:
    """A failure as a fixed text: the errno's meaning and name, never a path (a refusal says
    which entry of the recorder's directory it refused)."""
    if isinstance(exc, NotOurFile):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{os.strerror(exc.errno)} ({name})"
    return type(exc).__name__


@attrs.define(eq=False)
class Shared:
    """What the trio thread and the threads share (each field has one writer, see there)."""

    #: The recorder's directory (every file is reached through its fd).
    tree: Tree
    fsync_interval: float
    segment_bytes: int
    retention_days: float | None
    max_bytes: int | None
    logs: Callable[[], list[FixtureLog]]
    clock: Callable[[], float] = time.time
    #: Frames and control items, oldest first (the trio thread appends, the writer pops).
    queue: collections.deque[Item] = attrs.field(factory=collections.deque)
    #: Text bytes taken off the queue by the writer (the trio thread counts what it put in).
    taken_bytes: int = 0
    #: (fixture, reason) of recordings a thread stopped or refused (:func:`refuse`), for the
    #: trio thread to report.
    events: collections.deque[tuple[FixtureLog, str]] = attrs.field(factory=collections.deque)
    #: Closed segments waiting for compression (the writer and recovery add, the janitor pops).
    compress: collections.deque[tuple[FixtureLog, SegmentInfo]] = attrs.field(
        factory=collections.deque
    )
    wake: threading.Event = attrs.field(factory=threading.Event)
    stopping: threading.Event = attrs.field(factory=threading.Event)
    janitor_wake: threading.Event = attrs.field(factory=threading.Event)
    #: Keys of fixtures whose numbering has frames that were never written (written at stop).
    incomplete: set[tuple[str, str]] = attrs.field(factory=set)


def refuse(s: Shared, lg: FixtureLog, exc: NotOurFile) -> str:
    """A thread met a name in the fixture's directory that the recorder did not make: the
    fixture is refused (:attr:`FixtureLog.broken`: nothing more is written, compressed or
    removed there until a restart checks it again), reported once to the trio thread."""
    reason = f"refused: {describe_error(exc)}"
    if not lg.broken:
        lg.broken = reason
        s.incomplete.add(lg.key)
        s.events.append((lg, reason))
    return reason


@attrs.define(eq=False)
class _Open:
    fd: int
    info: SegmentInfo
    dirty: bool = False


class Writer:
    """The writer thread: drains the queue every :data:`BATCH_INTERVAL` (or when woken),
    writes each fixture's frames with one ``write`` per batch, rotates full segments, fsyncs
    every ``fsync_interval``. On stop it writes what is queued, fsyncs, closes every file and
    records in ``recorder.json`` whether the run stopped cleanly."""

    def __init__(self, shared: Shared) -> None:
        self.s = shared
        self._open: dict[FixtureLog, _Open] = {}
        self.thread = threading.Thread(target=self._main, name="dde-recorder-writer", daemon=True)

    def _main(self) -> None:
        s = self.s
        next_sync = time.monotonic() + s.fsync_interval
        try:
            while True:
                stopping = s.stopping.is_set()
                if not stopping:
                    s.wake.wait(BATCH_INTERVAL)
                    s.wake.clear()
                self._drain()
                now = time.monotonic()
                if stopping or now >= next_sync:
                    self._sync()
                    next_sync = now + s.fsync_interval
                if stopping:
                    self._close_all()
                    return
        except Exception:
            log.exception("recorder writer crashed: recording stops for every fixture")
            for lg in list(self._open):
                self._fail(lg, "internal error in the recorder writer")
            raise

    # -- the queue ----------------------------------------------------------------------------

    def _drain(self) -> None:
        s = self.s
        queue = s.queue
        batch: dict[FixtureLog, list[Item]] = {}
        taken = 0
        while True:
            try:
                item = queue.popleft()
            except IndexError:
                break
            lg = item[0]
            if item[1]:
                taken += len(item[4])
                batch.setdefault(lg, []).append(item)
                continue
            # A control item: this fixture's frames before it are written first.
            frames = batch.pop(lg, None)
            if frames:
                self._write(lg, frames)
            if item[4] == OP_OPEN:
                self._start(lg)
            elif item[4] == OP_FINISH:
                self._finish(lg)
        for lg, frames in batch.items():
            self._write(lg, frames)
        s.taken_bytes += taken

    def _start(self, lg: FixtureLog) -> None:
        """The fixture is followed (again): write its meta (the epoch its topic uses)."""
        lg.write_error = ""
        try:
            with lg.lock:
                lg.removed = False
                with lg.directory(create=True) as dfd:
                    lg.write_meta(dfd)
        except OSError as exc:
            self._fail(lg, exc)

    def _finish(self, lg: FixtureLog) -> None:
        """No longer followed: close the segment being written (it gets compressed)."""
        op = self._open.pop(lg, None)
        if op is not None:
            try:
                os.fsync(op.fd)
                lg.durable_seq = lg.written_seq
            except OSError as exc:
                self._fail(lg, exc)
            finally:
                os.close(op.fd)
        self._close_segment(lg)

    def _write(self, lg: FixtureLog, frames: list[Item]) -> None:
        # A segment's seqs are contiguous: a jump (a cluster's relayed numbering, frames that
        # never came) starts a new segment, so the gap stays visible and recovery keeps both.
        start = 0
        for i in range(1, len(frames)):
            if frames[i][1] != frames[i - 1][1] + 1:
                self._write_run(lg, frames[start:i])
                start = i
        self._write_run(lg, frames[start:] if start else frames)

    def _write_run(self, lg: FixtureLog, frames: list[Item]) -> None:
        if lg.write_error:
            lg.frames_failed += len(frames)
            return
        op = self._open.get(lg)
        first = frames[0][1]
        try:
            if op is None:
                op = self._open_segment(lg, first)
            elif op.info.last_seq + 1 != first:
                # Frames never reached the queue (a stopped run): a new segment, seqs jump.
                self._rotate(lg)
                op = self._open_segment(lg, first)
        except OSError as exc:
            lg.frames_failed += len(frames)
            self._fail(lg, exc)
            return
        parts: list[bytes] = []
        add = parts.append
        best = op.info.max_position
        for _, seq, pos, t, raw in frames:
            if pos is None:
                add(b'{"seq":%d,"pos":null,"t":%.6f' % (seq, t))
            else:
                add(b'{"seq":%d,"pos":%d,"t":%.6f' % (seq, pos, t))
                if best is None or pos > best:
                    best = pos
            if b"\n" in raw or b"\r" in raw:
                add(encode(seq, pos, t, raw)[len(parts[-1]) :])  # stored as a JSON string
            else:
                add(_DATA_KEY)
                add(raw)
                add(b"}\n")
        data = b"".join(parts)
        info = op.info
        try:
            view = memoryview(data)
            done = 0
            while done < len(data):
                done += os.write(op.fd, view[done:])
        except OSError as exc:
            # Keep the file whole: cut what part of the batch made it (a torn line).
            with contextlib.suppress(OSError):
                os.ftruncate(op.fd, info.raw_bytes)
            lg.frames_failed += len(frames)
            self._fail(lg, exc)
            return
        if not info.count:
            info.first_t = frames[0][3]
        info.count += len(frames)
        info.raw_bytes += len(data)
        info.stored_bytes = info.raw_bytes
        info.last_t = frames[-1][3]
        info.max_position = best
        info.last_seq = frames[-1][1]
        op.dirty = True
        lg.frames_written += len(frames)
        lg.written_seq = info.last_seq
        if info.raw_bytes >= self.s.segment_bytes:
            try:
                self._rotate(lg)
            except OSError as exc:
                self._fail(lg, exc)

    def _open_segment(self, lg: FixtureLog, first: int) -> _Open:
        if lg.broken:
            raise NotOurFile(lg.broken)
        with lg.lock:
            current = lg.open_segment
            if current is not None and current.count and current.last_seq + 1 == first:
                with lg.directory() as dfd:
                    fd = open_file(dfd, current.name, os.O_WRONLY | os.O_APPEND)
                op = self._open[lg] = _Open(fd, current)
                return op
        if current is not None and current.count:
            self._close_segment(lg)  # left open by the last run, and seqs jump: close it
        info = SegmentInfo(name=segment_name(first), first_seq=first)
        with lg.directory(create=True) as dfd:
            try:
                # Never over an existing file (that would be frames of this fixture), never
                # through a link (O_EXCL).
                fd = create_file(dfd, info.name, flags=os.O_APPEND)
            except FileExistsError:
                # Empty, left by an earlier try: used; else (or not a regular file) refused.
                fd = open_file(dfd, info.name, os.O_WRONLY | os.O_APPEND)
                if os.fstat(fd).st_size:
                    os.close(fd)
                    raise
            try:
                os.fsync(dfd)
            except OSError:
                os.close(fd)
                raise
        with lg.lock:
            lg.open_segment = info
        op = self._open[lg] = _Open(fd, info)
        return op

    def _rotate(self, lg: FixtureLog) -> None:
        op = self._open.pop(lg, None)
        if op is None:
            return
        try:
            os.fsync(op.fd)
            lg.durable_seq = lg.written_seq
        finally:
            os.close(op.fd)
        self._close_segment(lg)

    def _close_segment(self, lg: FixtureLog) -> None:
        """The open segment becomes a closed one (listed in the index, queued for
        compression). Call with its file closed."""
        with lg.lock:
            info = lg.open_segment
            if info is None:
                return
            lg.open_segment = None
            if not info.count:
                with contextlib.suppress(OSError), lg.directory() as dfd:
                    os.unlink(info.name, dir_fd=dfd)
                return
            lg.segments = (*lg.segments, info)
            try:
                lg.write_index()
            except OSError as exc:
                self._fail(lg, exc)
        self.s.compress.append((lg, info))
        self.s.janitor_wake.set()

    def _sync(self) -> None:
        for lg, op in list(self._open.items()):
            if not op.dirty:
                continue
            seq = lg.written_seq
            try:
                os.fsync(op.fd)
            except OSError as exc:
                self._fail(lg, exc)
                continue
            op.dirty = False
            lg.durable_seq = seq

    def _fail(self, lg: FixtureLog, exc: OSError | str) -> None:
        """Stop writing the fixture: *exc* the error (or why, as a text)."""
        op = self._open.pop(lg, None)
        if op is not None:
            with contextlib.suppress(OSError):
                os.close(op.fd)
        if isinstance(exc, NotOurFile):
            lg.write_error = lg.write_error or refuse(self.s, lg, exc)  # reported there
            return
        reason = exc if isinstance(exc, str) else describe_error(exc)
        if not lg.write_error:
            lg.write_error = reason
            self.s.incomplete.add(lg.key)
            self.s.events.append((lg, reason))

    def _close_all(self) -> None:
        s = self.s
        for lg, op in list(self._open.items()):
            with contextlib.suppress(OSError):
                os.close(op.fd)
            del self._open[lg]
        for lg in s.logs():
            if lg.lost or lg.write_error or lg.written_seq < lg.last_seq:
                s.incomplete.add(lg.key)
        try:
            write_json_atomic(
                s.tree.fd,
                RUN_STATE,
                {"version": 1, "clean": True, "incomplete": sorted(s.incomplete)},
            )
        except OSError as exc:
            log.warning("recorder: cannot mark the run as stopped cleanly: %s", describe_error(exc))


class Janitor:
    """The janitor thread: compresses closed segments, removes what retention chooses, and
    closes segments that fixtures no longer followed left open."""

    def __init__(self, shared: Shared) -> None:
        self.s = shared
        self.thread = threading.Thread(target=self._main, name="dde-recorder-janitor", daemon=True)
        self.passes = 0

    def _main(self) -> None:
        s = self.s
        next_pass = 0.0
        while not s.stopping.is_set():
            try:
                while s.compress and not s.stopping.is_set():
                    lg, info = s.compress.popleft()
                    self.compress(lg, info)
                now = time.monotonic()
                if now >= next_pass:
                    self.retention()
                    self.close_idle()
                    self.passes += 1
                    next_pass = now + RETENTION_INTERVAL
            except Exception:
                log.exception("recorder janitor: unexpected error (retrying later)")
            s.janitor_wake.wait(1.0)
            s.janitor_wake.clear()

    def compress(self, lg: FixtureLog, info: SegmentInfo) -> None:
        if lg.broken:
            return
        dst = segment_name(info.first_seq, compressed=True)
        tmp = dst + ".tmp"
        try:
            with lg.directory() as dfd:
                try:
                    self._compress(dfd, info.name, dst, tmp)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=dfd)
                    raise
                size = os.stat(dst, dir_fd=dfd, follow_symlinks=False).st_size
                done = attrs.evolve(info, name=dst, compressed=True, stored_bytes=size)
                with lg.lock:
                    if not any(s.first_seq == info.first_seq for s in lg.segments):
                        with contextlib.suppress(OSError):
                            os.unlink(dst, dir_fd=dfd)  # removed by retention meanwhile
                        return
                    lg.segments = tuple(
                        done if s.first_seq == info.first_seq else s for s in lg.segments
                    )
                    try:
                        lg.write_index()
                    except OSError as exc:
                        self._failed(lg, exc, "cannot write an index")
                    with contextlib.suppress(OSError):
                        os.unlink(info.name, dir_fd=dfd)
        except OSError as exc:
            # Left plain: still readable; the next start tries again.
            self._failed(lg, exc, "cannot compress a segment")

    @staticmethod
    def _compress(dfd: int, src: str, dst: str, tmp: str) -> None:
        with (
            os.fdopen(open_file(dfd, src, os.O_RDONLY), "rb") as fin,
            os.fdopen(create_file(dfd, tmp, replace=True), "wb") as fout,
        ):
            zstandard.ZstdCompressor(level=COMPRESS_LEVEL).copy_stream(
                fin, fout, read_size=COPY_CHUNK, write_size=COPY_CHUNK
            )
            fout.flush()
            os.fsync(fout.fileno())
        os.rename(tmp, dst, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)

    def _failed(self, lg: FixtureLog, exc: OSError, what: str) -> None:
        """A failure of the janitor on *lg*'s files: a refusal refuses the fixture (reported
        by the trio thread), anything else is logged (it tries again later)."""
        if isinstance(exc, NotOurFile):
            refuse(self.s, lg, exc)
            return
        log.warning(
            "recorder: %s of %s/%s: %s",
            what,
            lg.feed,
            lg.fixture,
            describe_error(exc),
            extra=about(lg),
        )

    def retention(self) -> None:
        s = self.s
        if s.retention_days is None and s.max_bytes is None:
            return
        # A refused fixture's files are left alone (and not counted: they may not be its).
        logs = {lg.key: lg for lg in s.logs() if not lg.broken}
        usage = []
        for lg in logs.values():
            segments = lg.segments
            current = lg.open_segment
            usage.append(
                FixtureUsage(
                    key=lg.key,
                    last_t=lg.last_t or 0.0,
                    segments=[SegmentUsage(x.name, x.last_t, x.stored_bytes) for x in segments],
                    open_bytes=current.raw_bytes if current is not None else 0,
                )
            )
        doomed = choose_deletions(
            usage, now=s.clock(), retention_days=s.retention_days, max_bytes=s.max_bytes
        )
        by_key: dict[object, FixtureLog] = {k: v for k, v in logs.items()}
        for key, name in doomed:
            self.remove_segment(by_key[key], name)
        for key in {k for k, _ in doomed}:
            self.remove_if_empty(by_key[key])

    def remove_segment(self, lg: FixtureLog, name: str) -> None:
        with lg.lock:
            kept = tuple(x for x in lg.segments if x.name != name)
            if len(kept) == len(lg.segments):
                return
            lg.segments = kept
            try:
                lg.write_index()
                with lg.directory() as dfd:
                    os.unlink(name, dir_fd=dfd)  # the name: a link there is not followed
            except OSError as exc:
                self._failed(lg, exc, "retention cannot remove a file")
                return
        log.info(
            "recorder: retention removed %s/%s %s",
            lg.feed,
            lg.fixture,
            name,
            extra=about(lg),
        )

    def remove_if_empty(self, lg: FixtureLog) -> None:
        with lg.lock:
            if lg.active or lg.broken or lg.segments or lg.open_segment is not None:
                return
            feed, fixture = lg.names
            tree = self.s.tree
            try:
                with tree.directory(feed) as feed_fd:
                    fx_fd = open_dir(feed_fd, fixture)
                    try:
                        for name in (META, INDEX):
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(name, dir_fd=fx_fd)
                    finally:
                        os.close(fx_fd)
                    with contextlib.suppress(OSError):
                        os.rmdir(fixture, dir_fd=feed_fd)  # a link is never removed through
                with contextlib.suppress(OSError):
                    os.rmdir(feed, dir_fd=tree.fd)  # the feed's directory, when it was the last
            except FileNotFoundError:
                pass  # gone already
            except NotOurFile as exc:
                self._failed(lg, exc, "retention cannot remove a directory")
                return
            lg.removed = True

    def close_idle(self) -> None:
        """Close (for compression) the segment a fixture no longer followed left open."""
        now = self.s.clock()
        for lg in self.s.logs():
            current = lg.open_segment
            if lg.active or lg.broken or current is None or not current.count:
                continue
            if now - current.last_t < IDLE_CLOSE_AFTER:
                continue
            with lg.lock:
                if lg.active or lg.open_segment is not current:
                    continue
                lg.open_segment = None
                lg.segments = (*lg.segments, current)
                try:
                    lg.write_index()
                except OSError as exc:
                    self._failed(lg, exc, "cannot write an index")
            self.s.compress.append((lg, current))
