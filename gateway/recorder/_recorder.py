"""The recorder as the service uses it: the catalog of recordings, the hand-over of frames, the
threads' lifetime, reports, and reading back (docs/recorder.md).

Opening a :class:`Recorder` is blocking disk work (every fixture directory is checked, the
segment each was writing is scanned and cut after its last intact line): the service does it
before anything is served. From then on the trio thread only touches memory: :meth:`append`
queues the frame's text for the writer thread and returns; a full queue stops the recording of
the fixture whose frame did not fit (counted, reported), never the fan-out.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Final

import trio

from gateway.config import RecorderSection, expand_path
from gateway.logs import LogThrottle, fields
from gateway.recorder._fs import NotOurFile, Tree, refusal
from gateway.recorder._scan import SegmentInfo
from gateway.recorder._store import (
    META,
    FixtureLog,
    about,
    dir_name,
    read_json,
    recover,
    write_json_atomic,
)
from gateway.recorder._threads import (
    OP_FINISH,
    OP_OPEN,
    RUN_STATE,
    Janitor,
    Shared,
    Writer,
    describe_error,
)

log = logging.getLogger("gateway.recorder")

#: How often the trio side looks for recordings the threads stopped (to log and show them).
REPORT_INTERVAL: Final = 0.25
#: Longest the stop waits for the writer to write what is queued and close its files.
CLOSE_TIMEOUT: Final = 15.0
#: Disk reads (backfills and downloads) running at once; more wait their turn.
DISK_READERS: Final = 4
#: Bytes of frame text one read of a download returns at most.
DOWNLOAD_CHUNK: Final = 256 * 1024

QUEUE_FULL: Final = "the disk is slower than the feeds: the recorder's queue is full"


class Recorder:
    """Every recording under ``[recorder] dir``. See the module docstring.

    *clock* gives the receive time written with each frame (UNIX seconds; tests inject it).
    """

    def __init__(
        self, settings: RecorderSection, *, clock: Callable[[], float] = time.time
    ) -> None:
        if settings.dir is None:
            raise ValueError("the recorder needs [recorder] dir")
        self.settings = settings
        self.root = expand_path(settings.dir)
        #: The directory, opened once: every file below it is reached through its fd.
        self.tree = Tree(self.root)
        self._clock = clock
        self._logs: dict[tuple[str, str], FixtureLog] = {}
        self._queue_limit = settings.queue_bytes
        self._put_bytes = 0
        self._closed = False
        self.shared = Shared(
            tree=self.tree,
            fsync_interval=settings.fsync_interval,
            segment_bytes=settings.segment_bytes,
            retention_days=settings.retention_days,
            max_bytes=settings.max_bytes,
            logs=lambda: list(self._logs.values()),
            clock=clock,
        )
        self._writer = Writer(self.shared)
        self._janitor = Janitor(self.shared)
        self._stops = LogThrottle(log)
        #: Disk reads at once (backfills, downloads): they share the disk with the writer.
        self.readers = trio.CapacityLimiter(DISK_READERS)
        self._pending_compress: list[tuple[tuple[str, str], SegmentInfo]] = []
        try:
            self._open()
        except BaseException:
            self.tree.close()
            raise
        for key, info in self._pending_compress:
            self.shared.compress.append((self._logs[key], info))

    # -- opening (blocking) -------------------------------------------------------------------

    def _open(self) -> None:
        tree = self.tree
        try:
            state = read_json(tree.fd, RUN_STATE)
        except NotOurFile as exc:
            log.warning("recorder: %s; taken as an unclean stop", describe_error(exc))
            state = None
        clean = isinstance(state, dict) and state.get("clean") is True
        incomplete = {
            (k[0], k[1])
            for k in (state.get("incomplete") or [] if isinstance(state, dict) else [])
            if isinstance(k, list) and len(k) == 2
        }
        write_json_atomic(tree.fd, RUN_STATE, {"version": 1, "clean": False})
        count = 0
        for feed_name in _directories(tree.fd, "", self._stops):
            try:
                with tree.directory(feed_name) as feed_fd:
                    fixture_names = _directories(feed_fd, feed_name, self._stops)
            except OSError as exc:  # swapped for a link meanwhile: as _directories says
                self._stops.warning("recorder: %s", describe_error(exc))
                continue
            for fixture_name, refused in fixture_names.items():
                names = (feed_name, fixture_name)
                feed = urllib.parse.unquote(feed_name)
                fixture = urllib.parse.unquote(fixture_name)
                if refused is None:
                    with contextlib.suppress(OSError), tree.directory(*names) as dfd:
                        meta = read_json(dfd, META)
                        if isinstance(meta, dict):
                            named_feed, named_fixture = meta.get("feed"), meta.get("fixture")
                            if isinstance(named_feed, str) and isinstance(named_fixture, str):
                                feed, fixture = named_feed, named_fixture
                key = (feed, fixture)
                try:
                    if refused is not None:
                        raise refused
                    lg = recover(
                        feed,
                        fixture,
                        tree,
                        names,
                        clean=clean and key not in incomplete,
                        on_compress=functools.partial(self._queue_compress, key),
                    )
                except Exception as exc:
                    # Its files are left alone: nothing is written there until a restart
                    # opens them (the topic numbers afresh, under a new epoch).
                    lg = FixtureLog(feed, fixture, tree, names)
                    lg.broken = f"cannot open the recording: {describe_error(exc)}"
                    self._stops.warning(
                        "recording %s/%s: %s",
                        feed,
                        fixture,
                        lg.broken,
                        extra=fields(feed=feed, fixture=fixture),
                    )
                self._logs[key] = lg
                count += 1
        log.info("recorder: %d recorded fixtures in %s", count, self.root)

    def _queue_compress(self, key: tuple[str, str], info: SegmentInfo) -> None:
        # Recovery found a closed segment left plain: compressed once the janitor runs (the
        # fixture's log is in the catalog by then).
        self._pending_compress.append((key, info))

    # -- the catalog --------------------------------------------------------------------------

    def fixture(self, feed: str, fixture: str) -> FixtureLog:
        """The recording of (feed, fixture), made (in memory) when there is none."""
        key = (feed, fixture)
        lg = self._logs.get(key)
        if lg is None:
            lg = FixtureLog(feed, fixture, self.tree, (dir_name(feed), dir_name(fixture)))
            self._logs[key] = lg
        return lg

    def get(self, feed: str, fixture: str) -> FixtureLog | None:
        return self._logs.get((feed, fixture))

    def logs(self) -> list[FixtureLog]:
        """Every fixture the recorder knows (for counters: none is ever forgotten)."""
        return list(self._logs.values())

    def recordings(self) -> list[FixtureLog]:
        """Every fixture with frames on disk, followed now, or refused."""
        return [lg for lg in self._logs.values() if lg.listed]

    @property
    def queued_bytes(self) -> int:
        """Frame bytes waiting for the writer thread."""
        return self._put_bytes - self.shared.taken_bytes

    # -- following ------------------------------------------------------------------------------

    def activate(self, lg: FixtureLog) -> None:
        """The fixture is followed: record what its topic publishes from now on.

        Call before its topic is made: when frames of the numbering it continues were lost
        (this run stopped recording it), the numbering goes on under a new epoch.
        """
        if lg.active:
            return
        if lg.lost or lg.write_error:
            lg.new_epoch()
            lg.lost = False
        lg.active = True
        lg.reason = ""
        if self._closed or lg.broken:
            lg.recording = False
            lg.reason = lg.broken or "the recorder is stopped"
            return
        lg.recording = True
        self.shared.queue.append((lg, 0, None, 0.0, OP_OPEN))
        self.shared.wake.set()
        log.debug(
            "recording %s/%s from seq %d", lg.feed, lg.fixture, lg.last_seq + 1, extra=about(lg)
        )

    def deactivate(self, lg: FixtureLog) -> None:
        """The fixture is no longer followed: its segment is closed and compressed."""
        if not lg.active:
            return
        lg.active = False
        lg.recording = False
        lg.reason = ""
        if not self._closed:
            self.shared.queue.append((lg, 0, None, 0.0, OP_FINISH))
            self.shared.wake.set()

    def append(self, lg: FixtureLog, seq: int, position: int | None, raw: bytes) -> None:
        """Queue one published frame's text (UTF-8) for the writer (the publish path: never
        blocks, copies nothing)."""
        if not lg.recording:
            if lg.active:
                lg.frames_dropped += 1
                lg.lost = True
            return
        size = len(raw)
        if self._put_bytes - self.shared.taken_bytes + size > self._queue_limit:
            lg.frames_dropped += 1
            self._stop(lg, QUEUE_FULL)
            return
        self._put_bytes += size
        t = self._clock()
        lg.last_seq = seq
        lg.last_t = t
        if position is not None and (lg.last_position is None or position > lg.last_position):
            lg.last_position = position
            lg.last_position_t = t
        self.shared.queue.append((lg, seq, position, t, raw))

    def renumber(self, lg: FixtureLog, epoch: str) -> None:
        """What comes next of *lg* is numbered under *epoch*, made elsewhere (a cluster's
        stream), with seqs above the last one recorded. A numbering other than the one of the
        last frames on disk begins a new segment (one epoch per segment, never two numberings
        in one file); ``meta.json`` says which epoch names which seqs
        (:meth:`FixtureLog.adopt_epoch`)."""
        if epoch == lg.epoch:
            return
        new = lg.adopt_epoch(epoch)
        if not lg.recording or self._closed:
            return  # meta.json is written when it records again (never while refused)
        if new:
            self.shared.queue.append((lg, 0, None, 0.0, OP_FINISH))
        self.shared.queue.append((lg, 0, None, 0.0, OP_OPEN))
        self.shared.wake.set()

    def stop(self, lg: FixtureLog, reason: str) -> None:
        """Stop recording *lg* (followed) for *reason*: state, reason, one throttled line;
        what its topic publishes meanwhile counts as dropped."""
        if lg.recording:
            self._stop(lg, reason)

    def _stop(self, lg: FixtureLog, reason: str) -> None:
        lg.recording = False
        lg.lost = True
        lg.reason = reason
        self._stops.warning(
            "recording of %s/%s stopped: %s (live fan-out goes on)",
            lg.feed,
            lg.fixture,
            reason,
            extra=about(lg),
        )

    # -- running ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the writer and janitor threads until cancelled; then write what is queued,
        fsync and close every file (bounded by :data:`CLOSE_TIMEOUT`)."""
        self._writer.thread.start()
        self._janitor.thread.start()
        task_status.started()
        try:
            while True:
                await trio.sleep(REPORT_INTERVAL)
                self.report()
        finally:
            with trio.CancelScope(shield=True):
                await self.close()

    def report(self) -> None:
        """Take over the stops and refusals the threads reported (state, reason, one
        throttled line)."""
        events = self.shared.events
        while events:
            lg, reason = events.popleft()
            if lg.recording:
                self._stop(lg, reason)
            elif lg.broken == reason:
                self._stops.warning(
                    "recording of %s/%s %s", lg.feed, lg.fixture, reason, extra=about(lg)
                )

    async def close(self) -> None:
        """Stop accepting frames, let the writer finish, join both threads."""
        if self._closed:
            return
        self._closed = True
        for lg in self._logs.values():
            lg.recording = False
        self.shared.stopping.set()
        self.shared.wake.set()
        self.shared.janitor_wake.set()
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            for thread in (self._writer.thread, self._janitor.thread):
                if thread.is_alive():
                    await trio.to_thread.run_sync(thread.join, abandon_on_cancel=True)
        if scope.cancelled_caught:
            log.warning("recorder: the writer did not finish within %.0f s", CLOSE_TIMEOUT)
        else:
            # Only once no thread uses it: a closed fd's number could name another file.
            self.tree.close()
        self.report()

    # -- reading back -------------------------------------------------------------------------

    async def download(
        self, lg: FixtureLog, *, after: int = 0, limit: int | None = None
    ) -> AsyncIterator[bytes]:
        """The record lines after seq *after* (at most *limit*), verbatim, a chunk at a time;
        read in worker threads, one chunk in memory at a time."""
        cursor = lg.open_cursor(after + 1)
        sent = 0
        try:
            while limit is None or sent < limit:
                try:
                    lines = await trio.to_thread.run_sync(
                        cursor.read_lines, DOWNLOAD_CHUNK, limiter=self.readers
                    )
                except NotOurFile as exc:
                    # Cut short (the client sees the response end without its last chunk).
                    self._stops.warning(
                        "recording of %s/%s: download cut short: %s",
                        lg.feed,
                        lg.fixture,
                        describe_error(exc),
                        extra=about(lg),
                    )
                    raise
                if not lines:
                    return
                if limit is not None:
                    lines = lines[: limit - sent]
                sent += len(lines)
                yield b"".join(lines)
        finally:
            with contextlib.suppress(OSError):
                cursor.close()


def _directories(dfd: int, where: str, refusals: LogThrottle) -> dict[str, NotOurFile | None]:
    """The entries of directory *dfd* that are directories (sorted), each with None, or the
    refusal of one that is a symlink (a symlink in the root, a feed's directory, is logged and
    left out: which fixtures it would hold is not looked at). Other entries (files, the run
    state) are not the recorder's business here."""
    out: dict[str, NotOurFile | None] = {}
    with os.scandir(dfd) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.is_symlink():
            name = f"{where}/{entry.name}" if where else entry.name
            refused = refusal(name, entry.stat(follow_symlinks=False).st_mode, "a directory")
            if where:
                out[entry.name] = refused
            else:
                refusals.warning("recorder: %s", describe_error(refused))
        elif entry.is_dir(follow_symlinks=False):
            out[entry.name] = None
    return out


def recording_path(root: Path, feed: str, fixture: str) -> Path:
    """Where the recording of (feed, fixture) lives under *root*."""
    return root / dir_name(feed) / dir_name(fixture)
