"""The recorder in a cluster: every instance records what it serves, under the cluster's
numbering (docs/cluster.md, "The recorder in a cluster"; docs/recorder.md).

In a cluster the stream decides each topic's epoch and seq (owned or relayed); the recorder
never does. Each topic the node makes gets a :class:`~gateway.hub.TopicTap` that hands every
frame the topic takes (published by the owner's upstream, relayed, or kept while a relay
primes its history) to the recorder, in seq order:

- a frame at or below the last seq recorded is skipped (a restarted instance primes its topic
  from its last recorded seq, so the recording goes on with nothing twice);
- a seq jump (the stream no longer had the frames) starts a new segment: the gap stays
  visible in the recording (and in its download), and is logged;
- a new epoch with seqs above the last recorded one closes the segment being written and goes
  on under the new epoch (``meta.json``: the old epoch up to its last seq, ``epoch_after``);
- a new epoch that numbers at or below the last recorded seq (Redis lost every stream while no
  instance held the numbering) stops the recording of that fixture with the reason: two
  numberings never share a recording.

The topic's archive (frames older than its memory history: ``backfill: -1``, an old
``after``) is this instance's recording while it carries the topic's epoch, else the stream.
"""

from __future__ import annotations

import logging
from typing import Protocol

from gateway.hub import ArchiveCursor, Topic, TopicArchive
from gateway.logs import LogThrottle, fields
from gateway.recorder import FixtureLog, Recorder

log = logging.getLogger("gateway.recorder")


class TopicRecording(Protocol):
    """What the cluster node asks of the recorder (None: no recorder)."""

    def attach(self, topic: Topic) -> None:
        """*topic* (made or kept for a followed fixture) is recorded from now on."""

    def prime_from(self, feed: str, fixture: str, start: int) -> int:
        """The seq after which a topic about to take the stream's numbering is primed from
        the stream: *start*, or earlier when the recording misses frames after it."""
        ...


class RecordingArchive:
    """A topic's archive: its recording while that carries the topic's epoch (the frames
    after :attr:`FixtureLog.epoch_after`), and *fallback* (the fixture's stream) for what is
    older than the recording (an instance that joined late) or when the recording does not
    carry the topic's epoch."""

    def __init__(self, lg: FixtureLog, topic: Topic, fallback: TopicArchive | None) -> None:
        self.log = lg
        self.topic = topic
        self.fallback = fallback

    def _disk(self) -> bool:
        lg = self.log
        return lg.epoch == self.topic.epoch and not lg.broken

    @property
    def first_seq(self) -> int:
        lg = self.log
        fallback = self.fallback
        if self._disk():
            first = _first_after(lg, lg.epoch_after)
            if fallback is not None and fallback.first_seq < first:
                return fallback.first_seq
            return first
        if fallback is not None:
            return fallback.first_seq
        return lg.written_seq + 1

    @property
    def written_seq(self) -> int:
        if self._disk() or self.fallback is None:
            return self.log.written_seq
        return self.fallback.written_seq

    @property
    def recording(self) -> bool:
        if self._disk() or self.fallback is None:
            return self.log.recording
        return self.fallback.recording

    def open_cursor(self, seq: int) -> ArchiveCursor:
        lg = self.log
        fallback = self.fallback
        if fallback is None:
            return lg.open_cursor(max(seq, lg.epoch_after + 1))
        if self._disk() and seq >= _first_after(lg, lg.epoch_after):
            return lg.open_cursor(max(seq, lg.epoch_after + 1))
        # Older than the recording: the stream holds it, and everything after it.
        return fallback.open_cursor(seq)


def _first_after(lg: FixtureLog, after: int) -> int:
    """The oldest seq above *after* on disk (``written_seq + 1``: none)."""
    if not after:
        return lg.first_seq
    for seg in lg.segments:
        if seg.last_seq > after:
            return max(seg.first_seq, after + 1)
    current = lg.open_segment
    if current is not None and current.count and lg.written_seq > after:
        return max(current.first_seq, after + 1)
    return lg.written_seq + 1


class _Tap:
    """One topic's frames to its recording (a :class:`~gateway.hub.TopicTap`)."""

    __slots__ = ("log", "owner")

    def __init__(self, owner: ClusterRecording, lg: FixtureLog) -> None:
        self.owner = owner
        self.log = lg

    def on_frame(self, topic: Topic, seq: int, position: int | None, raw: bytes) -> None:
        lg = self.log
        if topic.epoch != lg.epoch and not self.owner.renumber(lg, topic.epoch, seq):
            if lg.active:
                lg.frames_dropped += 1
            return
        last = lg.last_seq
        if seq <= last:
            return  # recorded already
        if last and seq != last + 1 and lg.recording:
            self.owner.gaps.info(
                "recording %s/%s: seqs %d-%d are not recorded (not in the stream any more)",
                lg.feed,
                lg.fixture,
                last + 1,
                seq - 1,
                extra=fields(feed=lg.feed, fixture=lg.fixture),
            )
        self.owner.recorder.append(lg, seq, position, raw)


class ClusterRecording:
    """The recorder's side of a cluster node (see the module docstring)."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.gaps = LogThrottle(log)

    def attach(self, topic: Topic) -> None:
        recorder = self.recorder
        lg = recorder.fixture(topic.feed.name, topic.fixture)
        recorder.activate(lg)
        if not isinstance(topic.tap, _Tap):
            topic.tap = _Tap(self, lg)
        archive = topic.archive
        if not isinstance(archive, RecordingArchive):
            topic.archive = RecordingArchive(lg, topic, archive)

    def detach(self, feed: str, fixture: str) -> None:
        """The fixture is no longer followed here: its segment is closed."""
        lg = self.recorder.get(feed, fixture)
        if lg is not None:
            self.recorder.deactivate(lg)

    def prime_from(self, feed: str, fixture: str, start: int) -> int:
        lg = self.recorder.get(feed, fixture)
        if lg is None or lg.broken or not lg.last_seq:
            # Nothing recorded yet (an instance that joins): it records what it serves from
            # now on; the frames before are the stream's (the archive reads them there).
            return start
        return min(start, lg.last_seq)

    def renumber(self, lg: FixtureLog, epoch: str, seq: int) -> bool:
        """The topic of *lg* carries *epoch*, not the recording's: go on under it, unless it
        numbers at or below the last seq recorded (then recording stops: False)."""
        last = lg.last_seq
        continues = bool(last) and lg.prior_epochs.get(epoch) == last
        if last and seq <= last and not continues:
            self.recorder.stop(
                lg,
                f"the cluster's numbering (epoch {epoch}) restarted at seq {seq}, at or below "
                f"the last seq recorded ({last}, epoch {lg.epoch}): not recorded, so that "
                "one recording never holds two numberings",
            )
            return False
        self.recorder.renumber(lg, epoch)
        return True
