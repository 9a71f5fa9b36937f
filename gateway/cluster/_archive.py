"""A fixture's Redis stream as its topic's archive: frames older than the memory history.

The data plane's backfill reads a topic's archive (``gateway.hub.TopicArchive``) for the seqs
before the history, in worker threads, one chunk at a time. In a cluster the stream holds
``stream_maxlen`` frames, far more than a history, so a subscriber that resumes with an old
``after`` (its instance died a minute ago) or asks for ``backfill: -1`` is served from Redis on
any instance: the cursor's blocking ``read`` runs the async request on the event loop from its
worker thread (``trio.from_thread.run``) and waits for it.

The attributes are in-memory values the node keeps current: the oldest seq from each round's
look at the stream, the newest from the topic (a relay has relayed up to there) or the
appender (what Redis confirmed of an owner's frames).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import trio

from gateway.cluster._store import RedisStore, RedisUnavailable

#: A chunk asks for about this many entries at most (and at least one).
MAX_CHUNK_ENTRIES: Final = 500
#: What a chunk's entry is assumed to weigh before any was read (a tracking frame).
TYPICAL_ENTRY_BYTES: Final = 3000


class StreamCursor:
    """A reading position in one stream; its :meth:`read` blocks (call it in a worker thread
    started by trio, one call at a time)."""

    def __init__(self, store: RedisStore, key: str, seq: int) -> None:
        self._store = store
        self._key = key
        self._next = seq
        self._entry_bytes = TYPICAL_ENTRY_BYTES

    def read(self, max_bytes: int) -> list[tuple[int, int | None, bytes]]:
        count = max(1, min(MAX_CHUNK_ENTRIES, max_bytes // max(1, self._entry_bytes)))
        try:
            entries = trio.from_thread.run(self._store.tail, self._key, self._next - 1, count)
        except RedisUnavailable:
            return []  # the backfill reports the frames it could not get as missed
        if not entries:
            return []
        self._next = entries[-1].seq + 1
        self._entry_bytes = max(1, sum(len(e.data) for e in entries) // len(entries))
        return [(e.seq, e.position, e.data) for e in entries]

    def close(self) -> None:
        pass


class StreamArchive:
    """A topic's archive on its fixture's stream (see the module docstring).

    *written* says the newest seq the stream holds now as far as this instance knows (the
    node's view: relayed or confirmed appended); :attr:`oldest` is set each round from the
    stream itself (0: not known yet).
    """

    def __init__(self, store: RedisStore, key: str, written: Callable[[], int]) -> None:
        self._store = store
        self.key = key
        self._written = written
        self.oldest = 0
        #: True while frames published now still reach the stream.
        self.recording = True

    @property
    def first_seq(self) -> int:
        """The oldest seq the stream holds (greater than :attr:`written_seq` when none)."""
        return self.oldest if self.oldest else self.written_seq + 1

    @property
    def written_seq(self) -> int:
        return self._written()

    def open_cursor(self, seq: int) -> StreamCursor:
        return StreamCursor(self._store, self.key, seq)
