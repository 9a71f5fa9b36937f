"""One fixture's recording on disk: its directory, ``meta.json``, ``index.json``, recovery at
start, and the cursor that reads frames back.

Layout (docs/recorder.md)::

    DIR/recorder.json                              did the last run stop cleanly
    DIR/<feed>/<fixture>/meta.json                 feed, fixture, epoch, prior epochs
    DIR/<feed>/<fixture>/index.json                the closed segments (rebuilt when missing)
    DIR/<feed>/<fixture>/000000000001.jsonl.zst    closed segments (zstd), named by first seq
    DIR/<feed>/<fixture>/000000004711.jsonl        the segment being written (at most one)

A :class:`FixtureLog` is shared by three kinds of threads: the trio thread appends and reads the
views, the writer thread writes, readers (worker threads) read the files. Each attribute has
one writer; the others read plain values (atomic under the GIL). ``segments`` is an immutable
tuple replaced as a whole, under :attr:`FixtureLog.lock` (held by the writer and the janitor
thread, never by the trio thread).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any, Final

import orjson
import zstandard

from gateway.logs import fields, log_context
from gateway.recorder._format import BadRecord, Record, decode, parse_segment_name, segment_name
from gateway.recorder._fs import NotOurFile, Tree, check_file, open_file, read_file, write_atomic
from gateway.recorder._scan import (
    SegmentInfo,
    iter_records,
    open_segment,
    scan_segment,
    segment_reader,
)

log = logging.getLogger("gateway.recorder")

META: Final = "meta.json"
INDEX: Final = "index.json"
FORMAT_VERSION: Final = 1
#: Prior epochs remembered per fixture (one per unclean restart).
MAX_PRIOR_EPOCHS: Final = 8
_PLAIN_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

#: The states of :attr:`FixtureLog.state`.
RECORDING: Final = "recording"
STOPPED: Final = "stopped"
IDLE: Final = "idle"


def dir_name(name: str) -> str:
    """A feed or fixture name as one safe path component: as is when it is a plain id, else
    %-encoded (no ``/``, never ``.`` or ``..``, no leading dot)."""
    if _PLAIN_NAME.fullmatch(name):
        return name
    quoted = urllib.parse.quote(name, safe="")
    return "%2E" + quoted[1:] if quoted.startswith(".") else quoted


def write_json_atomic(dfd: int, name: str, data: Any) -> None:
    """Write *data* to *name* in directory *dfd* so that a crash leaves the old file or the
    new one, whole (never through a link: :func:`gateway.recorder._fs.write_atomic`)."""
    write_atomic(dfd, name, orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")


def read_json(dfd: int, name: str) -> Any:
    """The JSON in *name* in *dfd*, or None when it is missing or unreadable as JSON. Raises
    :class:`NotOurFile` when it is a link or not a regular file."""
    try:
        return orjson.loads(read_file(dfd, name))
    except NotOurFile:
        raise
    except (OSError, orjson.JSONDecodeError):
        return None


class FixtureLog:
    """One fixture's recording: numbering, state and files. See the module docstring."""

    def __init__(
        self,
        feed: str,
        fixture: str,
        tree: Tree,
        names: tuple[str, str],
        *,
        epoch: str | None = None,
        prior_epochs: dict[str, int] | None = None,
        epoch_after: int = 0,
    ) -> None:
        self.feed = feed
        self.fixture = fixture
        #: The recorder's directory, and the names of this fixture's directories in it (feed,
        #: fixture): every file is reached through them (:meth:`directory`), never a path.
        self.tree = tree
        self.names = names
        # -- numbering: written by the trio thread (and by recovery before anything runs) ----
        self.epoch = epoch or secrets.token_hex(8)
        #: Epochs of earlier numberings, each with the last seq it shares with this one.
        self.prior_epochs: dict[str, int] = dict(prior_epochs or {})
        #: The frames on disk up to this seq belong to another numbering (a cluster's earlier
        #: epoch, :meth:`adopt_epoch`): the current epoch names only the frames after it.
        self.epoch_after = epoch_after
        #: The last seq handed to the writer (after recovery: the last one on disk).
        self.last_seq = 0
        #: The highest vendor position recorded, and the time of the last frame.
        self.last_position: int | None = None
        self.last_position_t: float | None = None
        self.last_t: float | None = None
        # -- state: written by the trio thread ---------------------------------------------
        #: A topic publishes into it (the fixture is followed).
        self.active = False
        #: Frames are accepted (active, and not stopped).
        self.recording = False
        #: Why recording stopped ("" while recording or idle).
        self.reason = ""
        #: Frames published while stopped (not recorded), and whether none was lost since the
        #: fixture was last followed.
        self.frames_dropped = 0
        #: Frames of the current numbering that were published but never written (since it
        #: was last followed): its next topic must number under a new epoch.
        self.lost = False
        # -- written by the writer thread --------------------------------------------------
        #: The last seq written to the file (readable by the cursor).
        self.written_seq = 0
        #: The last seq known on stable storage (fsync).
        self.durable_seq = 0
        #: Frames written by this process, and why the writer stopped ("" while it writes).
        self.frames_written = 0
        #: Frames the writer could not write (they reached it after a failure).
        self.frames_failed = 0
        self.write_error = ""
        #: The closed segments, oldest first (replaced whole, under ``lock``).
        self.segments: tuple[SegmentInfo, ...] = ()
        #: The segment being written (or left open by the last run), or None.
        self.open_segment: SegmentInfo | None = None
        self.lock = threading.Lock()
        #: Retention removed every file (set by the janitor under ``lock``).
        self.removed = False
        #: Why the recording is refused ("": it is not): it could not be opened at start, or
        #: a thread met a name in its directory the recorder did not make (a symlink, a FIFO:
        #: :class:`NotOurFile`). Its files are never written then, until a restart opens them.
        self.broken = ""

    def __repr__(self) -> str:
        return f"<FixtureLog {self.feed}/{self.fixture} last={self.last_seq} {self.state}>"

    @property
    def key(self) -> tuple[str, str]:
        return (self.feed, self.fixture)

    @property
    def path(self) -> Path:
        """Where its directory is (for reading by path and for messages; the recorder itself
        goes through :meth:`directory`)."""
        return self.tree.path.joinpath(*self.names)

    def directory(self, *, create: bool = False) -> AbstractContextManager[int]:
        """The fd of its directory, opened from the recorder's a component at a time, never
        through a link (made when *create*)."""
        return self.tree.directory(*self.names, create=create)

    @property
    def state(self) -> str:
        """``recording``, ``stopped`` (followed but not recorded, or refused: see
        :attr:`reason` and :attr:`broken`) or ``idle`` (not followed)."""
        if self.recording:
            return RECORDING
        return STOPPED if self.active or self.broken else IDLE

    @property
    def listed(self) -> bool:
        """Shown in the recordings (and their counts): followed, with frames, or refused."""
        return self.active or self.has_frames or bool(self.broken)

    @property
    def first_seq(self) -> int:
        """The oldest seq on disk (``written_seq + 1`` when there is none)."""
        segments = self.segments
        if segments:
            return segments[0].first_seq
        current = self.open_segment
        if current is not None and current.count:
            return current.first_seq
        return self.written_seq + 1

    @property
    def first_t(self) -> float | None:
        segments = self.segments
        if segments:
            return segments[0].first_t
        current = self.open_segment
        return current.first_t if current is not None and current.count else None

    @property
    def written_t(self) -> float | None:
        """The receive time of the last frame written (None: none)."""
        current = self.open_segment
        if current is not None and current.count:
            return current.last_t
        segments = self.segments
        return segments[-1].last_t if segments else None

    @property
    def stored_bytes(self) -> int:
        current = self.open_segment
        return sum(s.stored_bytes for s in self.segments) + (
            current.raw_bytes if current is not None else 0
        )

    @property
    def has_frames(self) -> bool:
        return self.first_seq <= self.written_seq

    def open_cursor(self, seq: int) -> Cursor:
        return Cursor(self, seq)

    # -- the index ----------------------------------------------------------------------------

    def write_index(self) -> None:
        """Rewrite ``index.json`` from :attr:`segments` (call with ``lock`` held)."""
        with self.directory() as dfd:
            write_json_atomic(
                dfd,
                INDEX,
                {"version": FORMAT_VERSION, "segments": [s.as_json() for s in self.segments]},
            )

    def new_epoch(self) -> None:
        """Number what comes next under a new epoch; the current one stays valid for resumes
        up to :attr:`last_seq` (when there is anything)."""
        if self.last_seq:
            self.prior_epochs[self.epoch] = self.last_seq
            while len(self.prior_epochs) > MAX_PRIOR_EPOCHS:
                del self.prior_epochs[next(iter(self.prior_epochs))]
        self.epoch = secrets.token_hex(8)

    def adopt_epoch(self, epoch: str) -> bool:
        """Number what comes next under *epoch*, a numbering made elsewhere (a cluster's
        stream). True when it is not the numbering of the last frames on disk: the frames
        recorded so far keep their epoch (in :attr:`prior_epochs`, up to :attr:`last_seq`)
        and *epoch* names only what comes after (:attr:`epoch_after`). False when it is: the
        current epoch, or the one an unclean restart set aside at :attr:`last_seq` for a new
        epoch that has numbered nothing yet (taken back)."""
        if epoch == self.epoch:
            return False
        if self.last_seq and self.prior_epochs.get(epoch) == self.last_seq:
            del self.prior_epochs[epoch]
            self.epoch = epoch
            return False
        if self.last_seq:
            self.prior_epochs[self.epoch] = self.last_seq
            while len(self.prior_epochs) > MAX_PRIOR_EPOCHS:
                del self.prior_epochs[next(iter(self.prior_epochs))]
        self.epoch = epoch
        self.epoch_after = self.last_seq
        return True

    def write_meta(self, dfd: int) -> None:
        """Rewrite ``meta.json`` (names, epoch, prior epochs) in its directory *dfd*."""
        write_json_atomic(
            dfd,
            META,
            {
                "version": FORMAT_VERSION,
                "feed": self.feed,
                "fixture": self.fixture,
                "epoch": self.epoch,
                "prior_epochs": self.prior_epochs,
                "epoch_after": self.epoch_after,
            },
        )


def _index_entries(dfd: int) -> dict[str, SegmentInfo]:
    data = read_json(dfd, INDEX)
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        return {}
    out: dict[str, SegmentInfo] = {}
    for entry in data.get("segments") or ():
        try:
            info = SegmentInfo.from_json(entry)
        except (TypeError, ValueError, KeyError):
            return {}  # a damaged index is rebuilt whole
        out[info.name] = info
    return out


def about(lg: FixtureLog) -> dict[str, object]:
    """The fields of a log line about *lg*'s recording (``extra=about(lg)``)."""
    return fields(feed=lg.feed, fixture=lg.fixture)


def recover(
    feed: str,
    fixture: str,
    tree: Tree,
    names: tuple[str, str],
    *,
    clean: bool,
    on_compress: Callable[[SegmentInfo], None],
) -> FixtureLog:
    """Open the recording in directory *names* of *tree* after a stop of any kind (blocking;
    before the writer runs).

    First every name the recorder uses there (segments, ``meta.json``, ``index.json``) is
    checked: a symlink or anything else that is not a regular file raises :class:`NotOurFile`
    before anything is read, cut or removed (the directory itself is opened without following
    a link: the same). The index is read and checked against the files (entries without a file
    dropped, files without an entry scanned); a missing or damaged index is rebuilt from the
    files. The last plain segment is the one that was being written: it is scanned line by line
    and cut after its last intact line (a torn line, zeros). A closed plain segment (a crash
    before its compression finished) is handed to *on_compress*.

    *clean*: the last run stopped cleanly with every frame of this fixture written; the epoch
    is kept. Otherwise frames may have been published that were never written (kill -9, power
    loss, a full disk): a new epoch numbers what comes next, and the old one stays valid up to
    the last seq on disk (a subscriber that saw no more than that resumes without a gap). The
    new epoch is written to ``meta.json`` when the fixture is followed again.
    """
    # The recovery's lines (a cut, an unreadable segment) name the fixture.
    with tree.directory(*names) as dfd, log_context(feed=feed, fixture=fixture):
        entries = os.listdir(dfd)
        for entry in entries:
            if entry in (META, INDEX) or parse_segment_name(entry) is not None:
                check_file(dfd, entry)
        lg = _recover(dfd, entries, feed=feed, fixture=fixture, tree=tree, names=names, clean=clean)
        closed_plain = [s for s in lg.segments if not s.compressed]
    for info in closed_plain:
        on_compress(info)
    return lg


def _recover(
    dfd: int,
    entries: list[str],
    *,
    feed: str,
    fixture: str,
    tree: Tree,
    names: tuple[str, str],
    clean: bool,
) -> FixtureLog:
    meta = read_json(dfd, META)
    meta = meta if isinstance(meta, dict) else {}
    epoch = meta.get("epoch") if isinstance(meta.get("epoch"), str) else None
    prior_raw = meta.get("prior_epochs")
    prior = (
        {k: v for k, v in prior_raw.items() if isinstance(k, str) and type(v) is int}
        if isinstance(prior_raw, dict)
        else {}
    )
    after = meta.get("epoch_after")
    lg = FixtureLog(
        feed,
        fixture,
        tree,
        names,
        epoch=epoch,
        prior_epochs=prior,
        epoch_after=after if type(after) is int and after >= 0 else 0,
    )
    where = f"{feed}/{fixture}"
    indexed = _index_entries(dfd)
    files: dict[int, list[tuple[str, bool]]] = {}
    for entry in entries:
        parsed = parse_segment_name(entry)
        if parsed is not None:
            files.setdefault(parsed[0], []).append((entry, parsed[1]))
        elif entry.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(entry, dir_fd=dfd)  # an atomic write or a compression cut short
    closed: list[SegmentInfo] = []
    rebuilt = False
    last_first = max(files) if files else None
    for first in sorted(files):
        found = dict(files[first])  # name -> compressed
        gz = segment_name(first, compressed=True)
        plain = segment_name(first)
        if gz in found:
            info = indexed.get(gz)
            if info is None:
                info = _scan_closed(dfd, where, gz, first, True)
                rebuilt = True
            if info is None:
                continue
            closed.append(info)
            if plain in found:
                # Compressed, and the crash came before the plain file was removed.
                with contextlib.suppress(OSError):
                    os.unlink(plain, dir_fd=dfd)
            continue
        if first != last_first:
            info = indexed.get(plain) or _scan_closed(dfd, where, plain, first, False)
            if info is not None:
                closed.append(info)
                rebuilt = rebuilt or plain not in indexed
            continue
        lg.open_segment = _recover_open(dfd, where, plain, first)
    rebuilt = rebuilt or set(indexed) != {s.name for s in closed}
    lg.segments = tuple(closed)
    last = lg.open_segment if lg.open_segment is not None else (closed[-1] if closed else None)
    if last is not None:
        lg.last_seq = lg.written_seq = lg.durable_seq = last.last_seq
        lg.last_t = last.last_t
    for info in reversed((*closed, *((lg.open_segment,) if lg.open_segment else ()))):
        if info.max_position is not None:
            lg.last_position = info.max_position
            lg.last_position_t = info.last_t
            break
    if epoch is None or not clean:
        lg.new_epoch()
        if epoch is not None:
            log.info(
                "recording %s: the last run did not stop cleanly; continuing at seq %d "
                "with a new epoch (the old one resumes up to there)",
                where,
                lg.last_seq,
            )
    if rebuilt:
        log.info("recording %s: index rebuilt from %d segments", where, len(closed))
        write_json_atomic(
            dfd, INDEX, {"version": FORMAT_VERSION, "segments": [s.as_json() for s in closed]}
        )
    return lg


def _scan_closed(
    dfd: int, where: str, name: str, first: int, compressed: bool
) -> SegmentInfo | None:
    try:
        fd = open_file(dfd, name, os.O_RDONLY)
        try:
            scanner = scan_segment(fd, name, first, compressed)
        finally:
            os.close(fd)
    except NotOurFile:
        raise
    except (OSError, zstandard.ZstdError) as exc:
        log.warning("recording %s: segment %s is unreadable (%s): left out", where, name, exc)
        return None
    if scanner.error is not None:
        log.warning("recording %s: segment %s: %s; kept up to there", where, name, scanner.error)
    return scanner.info if scanner.info.count else None


def _recover_open(dfd: int, where: str, name: str, first: int) -> SegmentInfo | None:
    """Scan the segment that was being written and cut it after its last intact line (the
    scan and the cut on one fd: the regular file that was checked)."""
    fd = open_file(dfd, name, os.O_RDWR)
    try:
        scanner = scan_segment(fd, name, first, False)
        size = os.fstat(fd).st_size
        if scanner.good < size:
            log.warning(
                "recording %s: cutting %d bytes of %s after the last intact line (%s)",
                where,
                size - scanner.good,
                name,
                scanner.error,
            )
            os.ftruncate(fd, scanner.good)
            os.fsync(fd)
    finally:
        os.close(fd)
    if not scanner.info.count:
        os.unlink(name, dir_fd=dfd)
        return None
    return scanner.info


class Cursor:
    """Reads a fixture's frames from its files, from seq *seq* on, a chunk per call.

    Blocking: call :meth:`read` in a worker thread, one call at a time. Holds one open file
    at most; never more than one chunk of frames in memory. Reads only what the writer has
    written (``written_seq``). A segment compressed or removed while it is read is looked up
    again; frames that retention removed are skipped (the seqs jump: the caller reports it).
    """

    def __init__(self, lg: FixtureLog, seq: int) -> None:
        self.log = lg
        self.next_seq = seq
        self._file: IO[bytes] | None = None
        self._segment: SegmentInfo | None = None
        self._closed_segment = False

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def read(self, max_bytes: int) -> list[tuple[int, int | None, bytes]]:
        """The next frames as ``(seq, position, text)``, about *max_bytes* of text; ``[]``
        at the end of what is written (the ``TopicArchive`` cursor of the hub)."""
        return [(r.seq, r.position, r.raw) for r, _ in self._read(max_bytes)]

    def read_lines(self, max_bytes: int) -> list[bytes]:
        """The next record lines, verbatim (``\\n`` included), about *max_bytes* of them."""
        return [line for _, line in self._read(max_bytes)]

    def _read(self, max_bytes: int) -> list[tuple[Record, bytes]]:
        out: list[tuple[Record, bytes]] = []
        size = 0
        limit = self.log.written_seq
        while size < max_bytes and self.next_seq <= limit:
            if self._file is None and not self._open():
                break
            f = self._file
            assert f is not None
            got = next(iter_records(f), None)
            if got is None:
                # The end of this segment, or of what the writer has written so far.
                if self._closed_segment or self._segment_closed_now():
                    self.close()
                    self._advance_past_segment()
                    continue
                break
            record, line = got
            if record.seq < self.next_seq:
                continue
            out.append(got)
            size += len(line)
            self.next_seq = record.seq + 1
        return out

    def _segment_closed_now(self) -> bool:
        seg = self._segment
        return seg is not None and any(s.first_seq == seg.first_seq for s in self.log.segments)

    def _advance_past_segment(self) -> None:
        seg = self._segment
        if seg is None:
            return
        for s in self.log.segments:
            if s.first_seq == seg.first_seq and self.next_seq <= s.last_seq:
                # Ended early (a damaged tail): the rest of it is not on disk.
                self.next_seq = s.last_seq + 1
        self._segment = None

    def _open(self) -> bool:
        """Open the segment holding ``next_seq`` (or the next one after it); False: none."""
        for _ in range(3):
            lg = self.log
            candidates: list[tuple[SegmentInfo, bool]] = [(s, True) for s in lg.segments]
            current = lg.open_segment
            if current is not None and current.count:
                candidates.append((current, False))
            target = None
            for seg, closed in candidates:
                last = seg.last_seq if closed else lg.written_seq
                if last >= self.next_seq:
                    target = (seg, closed)
                    break
            if target is None:
                return False
            seg, closed = target
            name = segment_name(seg.first_seq, compressed=seg.compressed)
            try:
                with lg.directory() as dfd:
                    fd = open_file(dfd, name, os.O_RDONLY)
            except FileNotFoundError:
                continue  # compressed or removed meanwhile: look again
            self._file = segment_reader(fd, seg.compressed)
            self._segment = seg
            self._closed_segment = closed
            # Frames before it removed by retention: the caller sees the seqs jump.
            self.next_seq = max(self.next_seq, seg.first_seq)
            return True
        return False


def read_recording(path: Path) -> Iterator[Record]:
    """The records of a recording, in order: a fixture's directory (every segment, plain or
    compressed, by first seq) or one file of record lines (a segment, ``.zst`` or not, or a
    download saved to a file). Blocking; reads one line at a time.

    A last line without its ``\\n`` (a recording that was being written) is left out. Raises
    OSError (:class:`NotOurFile` for a segment of the directory that is a symlink or not a
    regular file: never read through), or :class:`BadRecord` naming the file and line of
    anything else.
    """
    if not path.is_dir():
        yield from _read_lines(path, open_segment(path, path.name.endswith(".zst")))
        return
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        by_first: dict[int, tuple[str, bool]] = {}
        for entry in os.listdir(dfd):
            parsed = parse_segment_name(entry)
            if parsed is not None and (parsed[0] not in by_first or parsed[1]):
                by_first[parsed[0]] = (entry, parsed[1])
        for first in sorted(by_first):
            name, compressed = by_first[first]
            f = segment_reader(open_file(dfd, name, os.O_RDONLY), compressed)
            yield from _read_lines(path / name, f)
    finally:
        os.close(dfd)


def _read_lines(file: Path, f: IO[bytes]) -> Iterator[Record]:
    with f:
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break
            if not line.strip():
                continue
            try:
                yield decode(line)
            except BadRecord as exc:
                raise BadRecord(f"{file}:{n}: {exc}") from None
