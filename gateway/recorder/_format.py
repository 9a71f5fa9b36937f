"""The record line format and the segment names: pure functions, no I/O.

One line per upstream data frame, UTF-8, ending with ``\\n``::

    {"seq":1234,"pos":5678,"t":1714567890.123456,"data":<the upstream text, byte for byte>}

``seq`` is the hub's number for the frame, ``pos`` the vendor position the upstream classifier
gave it (tracking ``ix``, fastpath the event's position in the match; ``null`` for a frame the
vendor does not number) and ``t`` the UNIX time it was received. The fields come in this order
and the header holds numbers only, so the first ``,"data":`` of a line always starts the frame:
a reader cuts it out without parsing it (:func:`decode`), and the line is JSON all the same
(``jq .data``). The multiplexed endpoint's envelope inserts the text the same way.

A frame whose text holds a line break (JSON allows ``\\n`` and ``\\r`` as whitespace between
tokens) cannot be inserted as is; it is stored as a JSON string instead, under ``"text"``::

    {"seq":1235,"pos":null,"t":1714567890.2,"text":"{\\n  \\"ix\\": 5679 ...}"}

Segments are named after the seq of their first frame: ``000000001234.jsonl`` while open,
``000000001234.jsonl.zst`` once closed and compressed (zstd).
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

import orjson

#: Every record line starts with these bytes.
RECORD_PREFIX: Final = b'{"seq":'
_DATA_KEY: Final = b',"data":'
_TEXT_KEY: Final = b',"text":'
_LINE_BREAKS: Final = (b"\n", b"\r")

SEGMENT_SUFFIX: Final = ".jsonl"
COMPRESSED_SUFFIX: Final = ".jsonl.zst"
_SEGMENT_NAME: Final = re.compile(r"(\d{12,20})\.jsonl(\.zst)?")
SEQ_DIGITS: Final = 12


class BadRecord(ValueError):
    """A line that is not a record line (torn, zeroed, or not written by the recorder)."""


class Record(NamedTuple):
    """One decoded line: the frame text as the upstream sent it (UTF-8 bytes)."""

    seq: int
    position: int | None
    t: float
    raw: bytes


def encode(seq: int, position: int | None, t: float, raw: bytes) -> bytes:
    """The record line of one frame, ``\\n`` included."""
    pos = b"null" if position is None else b"%d" % position
    head = b'{"seq":%d,"pos":%s,"t":%.6f' % (seq, pos, t)
    if b"\n" in raw or b"\r" in raw:
        return head + _TEXT_KEY + orjson.dumps(raw.decode()) + b"}\n"
    return head + _DATA_KEY + raw + b"}\n"


def decode(line: bytes) -> Record:
    """Decode one line (with or without its ``\\n``); raises :class:`BadRecord`.

    Checks the shape only (header, closing brace, no NUL byte: a zeroed page left by a power
    loss is never a record); the frame text itself is not parsed.
    """
    if line.endswith(b"\n"):
        line = line[:-1]
    if not line.startswith(RECORD_PREFIX) or not line.endswith(b"}") or b"\x00" in line:
        raise BadRecord("not a record line")
    cut = line.find(_DATA_KEY)
    try:
        if cut >= 0:
            head = orjson.loads(line[:cut] + b"}")
            raw = line[cut + len(_DATA_KEY) : -1]
        else:
            doc = orjson.loads(line)
            text = doc.get("text") if isinstance(doc, dict) else None
            if not isinstance(text, str):
                raise BadRecord("a record line without data or text")
            head, raw = doc, text.encode()
    except orjson.JSONDecodeError:
        raise BadRecord("not a record line") from None
    seq = head.get("seq") if isinstance(head, dict) else None
    pos = head.get("pos")
    t = head.get("t")
    if type(seq) is not int or seq < 1 or not (pos is None or type(pos) is int):
        raise BadRecord("a record line with a bad seq or pos")
    if type(t) not in (int, float):
        raise BadRecord("a record line with a bad time")
    if not raw:
        raise BadRecord("a record line without a frame")
    return Record(seq, pos, float(t), raw)


def is_record(line: bytes) -> bool:
    """True when *line* looks like a record line (cheap: for telling formats apart)."""
    return line.startswith(RECORD_PREFIX)


def segment_name(first_seq: int, *, compressed: bool = False) -> str:
    return f"{first_seq:0{SEQ_DIGITS}d}" + (COMPRESSED_SUFFIX if compressed else SEGMENT_SUFFIX)


def parse_segment_name(name: str) -> tuple[int, bool] | None:
    """``(first seq, compressed)`` of a segment file name, None for any other name."""
    m = _SEGMENT_NAME.fullmatch(name)
    if m is None:
        return None
    return int(m[1]), m[2] is not None
