"""One simulated fixture: its timeline, its frames or actions, its faults.

Tracking fixtures need no task: frame ``ix`` exists from ``t0 + ix / rate_hz`` on (``t0`` is the
trio time the fixture was added), so a connection just sleeps until the frame it wants exists.
Fastpath fixtures have a "scorer" task (run by ``Simulator.serve``) that appends actions and
ConnectionStateChanged packets to an append-only log which every connection follows; that task
is what makes outages, late delivery and the vendor's status-check rule possible.
"""

from __future__ import annotations

import enum
import functools
import math
import pathlib
from collections.abc import Callable
from typing import Final, Literal

import attrs
import orjson
import trio

from gateway.recorder import BadRecord, is_record, open_segment, read_recording
from gateway.simulator._fastpath import Action, ActionScript
from gateway.simulator._faults import Faults
from gateway.simulator._messages import connection_state
from gateway.simulator._tracking import TrackingMatch

FRAME_CACHE_SIZE: Final = 4096
"""Encoded tracking frames kept per fixture: many connections at one ix encode it once."""
DEFAULT_STATUS_CHECK_INTERVAL: Final = 10.0
DEFAULT_SILENCE_TIMEOUT: Final = 30.0

FixtureKind = Literal["tracking", "fastpath"]


class ScorerState(enum.StrEnum):
    CONNECTED = "Connected"
    DISCONNECTED = "Disconnected"


@attrs.frozen
class StatusPacket:
    """A ConnectionStateChanged packet in a fastpath log (no sequence number)."""

    text: str
    state: ScorerState


LogEntry = Action | StatusPacket


class SimFixture:
    """A fixture the simulator serves. Create it with :meth:`Simulator.add_fixture`."""

    def __init__(
        self,
        fixture_id: str,
        kind: FixtureKind,
        *,
        rate_hz: float,
        seed: int,
        action_interval: float,
        recording: pathlib.Path | None,
        status_check_interval: float,
        silence_timeout: float,
    ) -> None:
        if kind not in ("tracking", "fastpath"):
            raise ValueError(f"kind must be 'tracking' or 'fastpath', got {kind!r}")
        if not fixture_id or "/" in fixture_id:
            raise ValueError(f"fixture id must be non-empty and contain no '/', got {fixture_id!r}")
        if not rate_hz > 0:
            raise ValueError(f"rate_hz must be > 0, got {rate_hz!r}")
        self.id: Final = fixture_id
        self.kind: Final = kind
        self.rate_hz: Final = rate_hz
        self.seed: Final = seed
        self.faults = Faults()
        # None until a trio run is there to read the clock (Simulator.serve starts it).
        self.t0: float | None = None
        self._match = TrackingMatch(fixture_id, seed, rate_hz)
        self._recording = load_recording(recording) if recording is not None else None
        self.frame_text: Callable[[int], str] = functools.lru_cache(maxsize=FRAME_CACHE_SIZE)(
            self._encode
        )
        # fastpath
        self.script = ActionScript(fixture_id, seed, action_interval)
        self.log: list[LogEntry] = []
        self.scorer_state = ScorerState.CONNECTED
        self.status_check_interval = status_check_interval
        self.silence_timeout = silence_timeout
        self._events = 0
        self._outage_start: float | None = None
        self._outage_until = -math.inf
        self._log_changed = trio.Event()
        self._scorer_wake = trio.Event()
        self.removed = trio.Event()

    def __repr__(self) -> str:
        return f"SimFixture(id={self.id!r}, kind={self.kind!r}, rate_hz={self.rate_hz})"

    def start_clock(self, now: float) -> None:
        if self.t0 is None:
            self.t0 = now

    # -- tracking -------------------------------------------------------------------------

    def _encode(self, ix: int) -> str:
        if self._recording is not None:
            return self._recording[ix]
        return orjson.dumps(self._match.frame(ix)).decode()

    @property
    def frame_limit(self) -> int | None:
        """How many frames there will ever be (a recording's length), or None (for ever)."""
        return None if self._recording is None else len(self._recording)

    def frame_due(self, ix: int) -> float:
        """The trio time at which frame ``ix`` exists."""
        if self.t0 is None:
            return math.inf
        return self.t0 + ix / self.rate_hz

    def available(self, now: float | None = None) -> int:
        """How many tracking frames exist now (frames ``0 .. available-1``)."""
        if self.t0 is None:
            return 0
        now = trio.current_time() if now is None else now
        if now < self.t0:
            return 0
        n = int((now - self.t0) * self.rate_hz) + 1
        # Guard the float rounding so that available() and frame_due() always agree.
        while self.frame_due(n) <= now:
            n += 1
        while n > 0 and self.frame_due(n - 1) > now:
            n -= 1
        limit = self.frame_limit
        return n if limit is None else min(n, limit)

    def current_ix(self) -> int:
        """The index of the newest tracking frame, -1 before the first."""
        return self.available() - 1

    async def wait_frame(self, ix: int) -> None:
        """Sleep until frame ``ix`` exists (for ever past the end of a recording)."""
        limit = self.frame_limit
        if limit is not None and ix >= limit:
            await trio.sleep_forever()
        # available() counts exactly the frames whose frame_due() has passed, so one sleep does.
        await trio.sleep_until(self.frame_due(ix))

    # -- fastpath -------------------------------------------------------------------------

    def events_so_far(self) -> int:
        """Fastpath: actions delivered so far (what ``startPosition`` counts)."""
        return self._events

    def outage(self, seconds: float) -> None:
        """Fastpath: the scorer goes silent for ``seconds`` from now (trio clock).

        Actions recorded meanwhile are delivered all at once when it is back. Disconnected is
        sent at the first status check that finds ``silence_timeout`` passed since the outage
        began; Connected is sent when the scorer is back, before the late actions.
        """
        if not seconds > 0:
            raise ValueError(f"outage seconds must be > 0, got {seconds!r}")
        now = trio.current_time()
        if self._outage_start is None or now >= self._outage_until:
            self._outage_start = now
        self._outage_until = max(self._outage_until, now + seconds)
        self._scorer_wake.set()

    @property
    def in_outage(self) -> bool:
        return trio.current_time() < self._outage_until

    def _append(self, entry: LogEntry) -> None:
        self.log.append(entry)
        if isinstance(entry, Action):
            self._events += 1
        self._log_changed.set()
        self._log_changed = trio.Event()

    async def wait_log(self, length: int) -> None:
        """Sleep until the fastpath log is longer than ``length``."""
        while len(self.log) <= length:
            await self._log_changed.wait()

    async def run_scorer(self) -> None:
        """The fastpath scorer: runs until cancelled (Simulator.serve owns it)."""
        assert self.t0 is not None
        t0 = self.t0
        generated = self._events
        next_check = t0 + self.status_check_interval
        while True:
            now = trio.current_time()
            if now < self._outage_until:
                assert self._outage_start is not None
                while next_check <= now:
                    silent_for = next_check - self._outage_start
                    if (
                        silent_for >= self.silence_timeout
                        and self.scorer_state is not ScorerState.DISCONNECTED
                    ):
                        self._set_state(ScorerState.DISCONNECTED)
                    next_check += self.status_check_interval
                generated = max(generated, self._events)
                while t0 + self.script.generated_at(generated) <= now:
                    generated += 1  # recorded by the scorer, delivered when it is back
            else:
                if self.scorer_state is ScorerState.DISCONNECTED:
                    self._set_state(ScorerState.CONNECTED)
                while t0 + self.script.generated_at(self._events) <= now:
                    self._append(self.script.action(self._events))
                generated = self._events
                while next_check <= now:
                    next_check += self.status_check_interval
            wake = min(t0 + self.script.generated_at(generated), next_check)
            if now < self._outage_until:
                wake = min(wake, self._outage_until)
            self._scorer_wake = trio.Event()
            with trio.move_on_at(wake):
                await self._scorer_wake.wait()

    def _set_state(self, state: ScorerState) -> None:
        self.scorer_state = state
        self._append(StatusPacket(connection_state(state.value), state))


def load_recording(path: pathlib.Path) -> list[str]:
    """Read a recording: the frames to serve, in order.

    Either a JSONL file of vendor frames (one JSON object per line, blank lines skipped), or
    what the gateway's recorder wrote (docs/recorder.md): a fixture's recording directory, one
    of its segments (``.jsonl`` or ``.jsonl.zst``) or a download of
    ``/v1/fixtures/{feed}/{fixture}/recording``. Record lines are told apart by their start
    (``{"seq":``); their frames are served verbatim.

    Raises ValueError naming the file and line of the first line that is not a JSON object (or
    not a record line, in a recording of the gateway's).
    """
    try:
        if path.is_dir() or _holds_records(path):
            frames = [r.raw.decode() for r in read_recording(path)]
        else:
            frames = _load_jsonl(path)
    except OSError as exc:
        raise ValueError(f"cannot read recording {path}: {exc.strerror}") from None
    except BadRecord as exc:
        raise ValueError(str(exc)) from None
    if not frames:
        raise ValueError(f"{path}: no frames")
    return frames


def _holds_records(path: pathlib.Path) -> bool:
    """True when the first line of the file is a record line of the gateway's recorder."""
    with open_segment(path, path.name.endswith(".zst")) as f:
        for line in f:
            if line.strip():
                return is_record(line)
    return False


def _load_jsonl(path: pathlib.Path) -> list[str]:
    frames: list[str] = []
    text = path.read_text(encoding="utf-8")
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not JSON") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object per line")
        frames.append(line)
    return frames
