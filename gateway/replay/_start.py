"""Where a replay begins (:class:`Start`) and the positions of a frame it is matched against.

A replay starts at the first frame held (the default), at a seq, at a match time (tracking:
phase ``ph`` and the phase clock ``mt``, ms) or at a vendor time (``ut``, UNIX ms): the first
frame at or after it. Times are read from the frame's text without parsing it whole (a
tracking frame's top-level ``mt``, ``ph`` and ``ut`` come before its lists of people; see
docs/vendor-protocol.md): the first occurrence of each key is the frame's own.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

_PH: Final = re.compile(rb'"ph":\s*(-?\d+)')
_MT: Final = re.compile(rb'"mt":\s*(-?\d+)')
_UT: Final = re.compile(rb'"ut":\s*(-?\d+)')


def _field(pattern: re.Pattern[bytes], raw: bytes) -> int | None:
    m = pattern.search(raw)
    return None if m is None else int(m[1])


@attrs.frozen
class Start:
    """Where a replay begins. Make it with :meth:`first`, :meth:`at_seq`,
    :meth:`at_match_time` or :meth:`at_ut`; at most one way is set."""

    seq: int | None = None
    phase: int | None = None
    mt: int | None = None
    ut: int | None = None

    @classmethod
    def first(cls) -> Start:
        """The first frame held (for the drop-in: the fixture's first frame)."""
        return cls()

    @classmethod
    def at_seq(cls, seq: int) -> Start:
        if seq < 1:
            raise ValueError(f"seq must be >= 1, got {seq}")
        return cls(seq=seq)

    @classmethod
    def at_match_time(cls, phase: int, mt: int) -> Start:
        """The first frame of phase *phase* with ``mt >= mt``, or of a later phase."""
        if mt < 0:
            raise ValueError(f"mt must be >= 0, got {mt}")
        return cls(phase=phase, mt=mt)

    @classmethod
    def at_ut(cls, ut: int) -> Start:
        """The first frame with vendor time ``ut >= ut`` (UNIX ms)."""
        return cls(ut=ut)

    @property
    def is_first(self) -> bool:
        return self.seq is None and self.phase is None and self.ut is None

    @property
    def by_time(self) -> bool:
        """Found by reading the frames (match time or vendor time), not by seq."""
        return self.phase is not None or self.ut is not None

    def reached(self, seq: int, raw: bytes) -> bool:
        """Frame *seq* with text *raw* is at or after this start. A frame without the time
        this start is about (a status packet) has not reached it."""
        if self.seq is not None:
            return seq >= self.seq
        if self.ut is not None:
            ut = _field(_UT, raw)
            return ut is not None and ut >= self.ut
        if self.phase is not None:
            ph = _field(_PH, raw)
            if ph is None or ph < self.phase:
                return False
            if ph > self.phase:
                return True
            mt = _field(_MT, raw)
            return mt is not None and mt >= (self.mt or 0)
        return True

    def before(self, seq: int, raw: bytes) -> bool:
        """Frame *seq* is strictly before this start, and says so (its time is known): a
        source whose first frame is before the start holds the start, if it is held at all."""
        if self.seq is not None:
            return seq < self.seq
        if self.ut is not None:
            ut = _field(_UT, raw)
            return ut is not None and ut < self.ut
        if self.phase is not None:
            ph = _field(_PH, raw)
            if ph is None:
                return False
            if ph != self.phase:
                return ph < self.phase
            mt = _field(_MT, raw)
            return mt is not None and mt < (self.mt or 0)
        return False

    def describe(self) -> str:
        if self.seq is not None:
            return f"seq {self.seq}"
        if self.ut is not None:
            return f"ut {self.ut}"
        if self.phase is not None:
            return f"phase {self.phase} mt {self.mt}"
        return "the first frame"
