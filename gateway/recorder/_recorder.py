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
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Final

import trio

from gateway.config import RecorderSection, expand_path
from gateway.recorder._scan import SegmentInfo
from gateway.recorder._store import FixtureLog, dir_name, read_json, recover, write_json_atomic
from gateway.recorder._threads import (
    OP_FINISH,
    OP_OPEN,
    RUN_STATE,
    Janitor,
    Shared,
    Writer,
    describe_error,
)
from gateway.throttle import LogThrottle

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
        self._clock = clock
        self._logs: dict[tuple[str, str], FixtureLog] = {}
        self._queue_limit = settings.queue_bytes
        self._put_bytes = 0
        self._closed = False
        self.shared = Shared(
            root=self.root,
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
        self._open()
        for key, info in self._pending_compress:
            self.shared.compress.append((self._logs[key], info))

    # -- opening (blocking) -------------------------------------------------------------------

    def _open(self) -> None:
        root = self.root
        root.mkdir(parents=True, exist_ok=True)
        state = read_json(root / RUN_STATE)
        clean = isinstance(state, dict) and state.get("clean") is True
        incomplete = {
            (k[0], k[1])
            for k in (state.get("incomplete") or [] if isinstance(state, dict) else [])
            if isinstance(k, list) and len(k) == 2
        }
        write_json_atomic(root / RUN_STATE, {"version": 1, "clean": False})
        count = 0
        for feed_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for fx_dir in sorted(p for p in feed_dir.iterdir() if p.is_dir()):
                meta = read_json(fx_dir / "meta.json")
                meta = meta if isinstance(meta, dict) else {}
                feed = meta.get("feed")
                fixture = meta.get("fixture")
                if not isinstance(feed, str) or not isinstance(fixture, str):
                    feed = urllib.parse.unquote(feed_dir.name)
                    fixture = urllib.parse.unquote(fx_dir.name)
                key = (feed, fixture)
                try:
                    lg = recover(
                        feed,
                        fixture,
                        fx_dir,
                        clean=clean and key not in incomplete,
                        on_compress=functools.partial(self._queue_compress, key),
                    )
                except Exception as exc:
                    # Its files are left alone: nothing is written there until a restart
                    # opens them (the topic numbers afresh, under a new epoch).
                    lg = FixtureLog(feed, fixture, fx_dir)
                    lg.broken = f"cannot open the recording: {describe_error(exc)}"
                    log.warning("recording %s/%s: %s", feed, fixture, lg.broken)
                self._logs[key] = lg
                count += 1
        log.info("recorder: %d recorded fixtures in %s", count, root)

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
            lg = FixtureLog(feed, fixture, self.root / dir_name(feed) / dir_name(fixture))
            self._logs[key] = lg
        return lg

    def get(self, feed: str, fixture: str) -> FixtureLog | None:
        return self._logs.get((feed, fixture))

    def logs(self) -> list[FixtureLog]:
        """Every fixture the recorder knows (for counters: none is ever forgotten)."""
        return list(self._logs.values())

    def recordings(self) -> list[FixtureLog]:
        """Every fixture with frames on disk, or followed now."""
        return [lg for lg in self._logs.values() if lg.active or lg.has_frames]

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
        log.debug("recording %s/%s from seq %d", lg.feed, lg.fixture, lg.last_seq + 1)

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

    def _stop(self, lg: FixtureLog, reason: str) -> None:
        lg.recording = False
        lg.lost = True
        lg.reason = reason
        self._stops.warning(
            "recording of %s/%s stopped: %s (live fan-out goes on)", lg.feed, lg.fixture, reason
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
        """Take over the stops the threads reported (state, reason, one throttled line)."""
        events = self.shared.events
        while events:
            lg, reason = events.popleft()
            if lg.recording:
                self._stop(lg, reason)

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
                lines = await trio.to_thread.run_sync(
                    cursor.read_lines, DOWNLOAD_CHUNK, limiter=self.readers
                )
                if not lines:
                    return
                if limit is not None:
                    lines = lines[: limit - sent]
                sent += len(lines)
                yield b"".join(lines)
        finally:
            with contextlib.suppress(OSError):
                cursor.close()


def recording_path(root: Path, feed: str, fixture: str) -> Path:
    """Where the recording of (feed, fixture) lives under *root*."""
    return root / dir_name(feed) / dir_name(fixture)
