"""Reading segments back: the intact part of a segment and its statistics. No threads here.

:class:`LineScanner` is fed bytes (whole files or chunks) and stops at the first line that is
not an intact record continuing the seqs before it: a torn last line (kill -9 between two
writes of a batch, a full disk), a page of zeros or garbage left by a power loss. Everything
before it is kept; :attr:`LineScanner.good` is where the file is cut.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Final

import attrs
import zstandard

from gateway.recorder._format import BadRecord, Record, decode

#: Bytes read per call while scanning a segment, and the buffer of line-by-line reads.
SCAN_CHUNK: Final = 1024 * 1024
READ_BUFFER: Final = 64 * 1024


@attrs.define
class SegmentInfo:
    """One segment as the index (``index.json``) lists it; ``stored_bytes`` is its file size."""

    name: str
    first_seq: int
    last_seq: int = 0
    count: int = 0
    first_t: float = 0.0
    last_t: float = 0.0
    #: The highest vendor position among its frames (None: no numbered frame).
    max_position: int | None = None
    #: Bytes of record lines (uncompressed).
    raw_bytes: int = 0
    stored_bytes: int = 0
    compressed: bool = False

    def add(self, record: Record, size: int) -> None:
        if not self.count:
            self.first_t = record.t
        self.count += 1
        self.last_seq = record.seq
        self.last_t = record.t
        self.raw_bytes += size
        pos = record.position
        if pos is not None and (self.max_position is None or pos > self.max_position):
            self.max_position = pos

    def as_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> SegmentInfo:
        """Raises ValueError/TypeError/KeyError for anything that is not an index entry."""
        if not isinstance(data, dict):
            raise TypeError("an index entry must be an object")
        info = cls(**data)
        for name in ("first_seq", "last_seq", "count", "raw_bytes", "stored_bytes"):
            if type(getattr(info, name)) is not int:
                raise TypeError(f"{name} must be an integer")
        if not isinstance(info.name, str) or info.count < 1:
            raise ValueError("bad index entry")
        if info.last_seq != info.first_seq + info.count - 1:
            raise ValueError("bad index entry")
        return info


class LineScanner:
    """Feed it a segment's bytes in order; it keeps what is intact.

    *first_seq*: the seq the segment's first line must have (its name says it); the others must
    follow one by one.
    """

    def __init__(self, name: str, first_seq: int, *, compressed: bool = False) -> None:
        self.info = SegmentInfo(name=name, first_seq=first_seq, compressed=compressed)
        #: Bytes from the start that hold intact lines only.
        self.good = 0
        #: Why scanning stopped early (None: every byte so far is intact).
        self.error: str | None = None
        self._partial = b""

    def feed(self, data: bytes) -> bool:
        """Scan more bytes; False once a bad line was met (nothing after it counts)."""
        if self.error is not None:
            return False
        if self._partial:
            data = self._partial + data
        start = 0
        info = self.info
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                self._partial = data[start:]
                return True
            line = data[start : end + 1]
            try:
                record = decode(line)
            except BadRecord as exc:
                self.error = f"{exc} at byte {self.good}"
                return False
            expected = info.first_seq + info.count
            if record.seq != expected:
                self.error = f"seq {record.seq} where {expected} was due, at byte {self.good}"
                return False
            info.add(record, len(line))
            self.good += len(line)
            start = end + 1

    def finish(self) -> SegmentInfo:
        """The end of the file: a last line without its ``\\n`` is torn."""
        if self.error is None and self._partial:
            self.error = f"a torn last line ({len(self._partial)} bytes) at byte {self.good}"
        self._partial = b""
        return self.info


def segment_reader(fd: int, compressed: bool, *, closefd: bool = True) -> IO[bytes]:
    """An open segment file's fd for reading, line by line (zstd-decompressed when
    *compressed*); *closefd*: the fd is closed with the reader."""
    f = os.fdopen(fd, "rb", buffering=READ_BUFFER, closefd=closefd)
    if compressed:
        return io.BufferedReader(
            zstandard.ZstdDecompressor().stream_reader(f, closefd=True), READ_BUFFER
        )
    return f


def open_segment(path: Path, compressed: bool) -> IO[bytes]:
    """A file of record lines named by the operator (a download, a segment handed to the
    simulator) for reading; the recorder's own files are opened through :mod:`._fs`."""
    return segment_reader(os.open(path, os.O_RDONLY | os.O_CLOEXEC), compressed)


def scan_segment(fd: int, name: str, first_seq: int, compressed: bool) -> LineScanner:
    """Scan a whole segment file, open on *fd* (from its start; left open), in chunks
    (blocking). Raises OSError (and ``zstandard.ZstdError`` for a damaged compressed file,
    reported by the caller)."""
    scanner = LineScanner(name, first_seq, compressed=compressed)
    with segment_reader(fd, compressed, closefd=False) as f:
        while chunk := f.read(SCAN_CHUNK):
            if not scanner.feed(chunk):
                break
    scanner.finish()
    scanner.info.stored_bytes = os.fstat(fd).st_size if compressed else scanner.good
    return scanner


def iter_records(f: IO[bytes]) -> Iterator[tuple[Record, bytes]]:
    """``(record, line)`` of an open segment file, in order, until its first bad or torn
    line."""
    for line in f:
        if not line.endswith(b"\n"):
            return
        try:
            yield decode(line), line
        except BadRecord:
            return
