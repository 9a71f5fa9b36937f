"""The synthetic tracking match: ``frame(ix)`` is a pure function of (fixture, seed, rate, ix).

Nothing per frame is stored: every entity moves on a closed-form path, so any frame - the first,
the live one or one in the middle of a backfill - is computed directly from its index. Each
player runs around a circle whose centre is his formation spot (shifted slowly with his team);
the speed ``v`` is ``a + b*sin(w*t + p)`` and the distance ``d`` is its exact integral, and the
angle on the circle is ``d / r``, so ``d`` only grows and agrees with the movement.
"""

from __future__ import annotations

import math
import random
import uuid
from typing import Any, Final

import attrs

PITCH_HALF_LENGTH: Final = 52.5
PITCH_HALF_WIDTH: Final = 34.0
DEFAULT_KICKOFF_UT_MS: Final = 1682899391822
"""``ut`` of frame 0 (vendor's example). A fixed epoch keeps frames byte-identical across runs."""
DEFAULT_PHASE_SECONDS: Final = 45 * 60.0

# Formation spots (metres, home team attacking towards +x), goalkeeper first: a 4-4-2.
_FORMATION: Final = (
    (-47.0, 0.0),
    (-33.0, -24.0),
    (-35.0, -8.0),
    (-35.0, 8.0),
    (-33.0, 24.0),
    (-16.0, -22.0),
    (-18.0, -7.0),
    (-18.0, 7.0),
    (-16.0, 22.0),
    (-4.0, -8.0),
    (-4.0, 8.0),
)
_REFEREE_ROLES: Final = (5, 4, 3)  # the vendor example's order: main referee ids vary, roles 3-5


@attrs.frozen
class _Mover:
    """One tracked person: identity plus the parameters of his closed-form path."""

    tr: str
    ro: int
    jn: int
    pl: str | None
    ax: float  # circle centre
    ay: float
    r: float  # circle radius
    a: float  # mean speed
    b: float  # speed swing (< a)
    w: float  # speed swing frequency (rad/s)
    p: float  # speed swing phase
    q: float  # starting angle on the circle
    team: int  # +1 home, -1 away, 0 referee
    line: bool  # an assistant referee: runs along a touchline

    def state(self, t: float, shift: float) -> tuple[float, float, float, float]:
        """(x, y, distance, speed) at ``t`` seconds since kickoff."""
        v = self.a + self.b * math.sin(self.w * t + self.p)
        d = self.a * t + (self.b / self.w) * (math.cos(self.p) - math.cos(self.w * t + self.p))
        angle = d / self.r + self.q
        if self.line:
            x = self.ax + self.r * math.sin(angle)
            y = self.ay
        else:
            x = self.ax + shift + self.r * math.cos(angle)
            y = self.ay + self.r * math.sin(angle)
        x = min(max(x, -PITCH_HALF_LENGTH), PITCH_HALF_LENGTH)
        y = min(max(y, -PITCH_HALF_WIDTH), PITCH_HALF_WIDTH)
        return x, y, d, v


class TrackingMatch:
    """The deterministic synthetic match of one fixture.

    Two instances built with the same arguments produce byte-identical frames.
    """

    def __init__(
        self,
        fixture_id: str,
        seed: int,
        rate_hz: float,
        *,
        phase_seconds: float = DEFAULT_PHASE_SECONDS,
        kickoff_ut_ms: int = DEFAULT_KICKOFF_UT_MS,
    ) -> None:
        if not rate_hz > 0:
            raise ValueError(f"rate_hz must be > 0, got {rate_hz!r}")
        self.fixture_id = fixture_id
        self.rate_hz = rate_hz
        self._phase_frames = max(2, round(phase_seconds * rate_hz))
        self._phase_ms = round(phase_seconds * 1000)
        self._kickoff_ut_ms = kickoff_ut_ms
        rng = random.Random(f"dde-sim/tracking/{seed}/{fixture_id}")
        track_ids = [str(i) for i in range(1, 26)]
        rng.shuffle(track_ids)
        self._home = self._team(rng, +1, track_ids[0:11])
        self._away = self._team(rng, -1, track_ids[11:22])
        ref_ids = track_ids[22:25]
        self._refs = tuple(
            self._referee(rng, role, tr) for role, tr in zip(_REFEREE_ROLES, ref_ids, strict=True)
        )
        self._ball_phase = tuple(rng.uniform(0, math.tau) for _ in range(4))
        self._shift_phase = rng.uniform(0, math.tau)

    @staticmethod
    def _team(rng: random.Random, side: int, track_ids: list[str]) -> tuple[_Mover, ...]:
        jerseys = [1, *rng.sample(range(2, 100), 10)]
        out = []
        for i, (fx, fy) in enumerate(_FORMATION):
            keeper = i == 0
            a = rng.uniform(0.4, 1.0) if keeper else rng.uniform(1.2, 3.2)
            out.append(
                _Mover(
                    tr=track_ids[i],
                    ro=1 if keeper else 2,
                    jn=jerseys[i],
                    pl=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    ax=fx * side,
                    ay=fy * side,
                    r=rng.uniform(1.5, 4.0) if keeper else rng.uniform(4.0, 11.0),
                    a=a,
                    b=a * rng.uniform(0.3, 0.9),
                    w=rng.uniform(0.05, 0.4),
                    p=rng.uniform(0, math.tau),
                    q=rng.uniform(0, math.tau),
                    team=side,
                    line=False,
                )
            )
        return tuple(out)

    @staticmethod
    def _referee(rng: random.Random, role: int, tr: str) -> _Mover:
        a = rng.uniform(1.0, 2.5)
        line = role != 3
        return _Mover(
            tr=tr,
            ro=role,
            jn=-1,
            pl=None,
            ax=0.0,
            ay=(PITCH_HALF_WIDTH if role == 4 else -PITCH_HALF_WIDTH) if line else 0.0,
            r=rng.uniform(15.0, 30.0) if line else rng.uniform(8.0, 16.0),
            a=a,
            b=a * rng.uniform(0.3, 0.8),
            w=rng.uniform(0.05, 0.3),
            p=rng.uniform(0, math.tau),
            q=rng.uniform(0, math.tau),
            team=0,
            line=line,
        )

    def frame_time(self, ix: int) -> float:
        """Seconds from kickoff to frame ``ix``."""
        return ix / self.rate_hz

    def frame(self, ix: int) -> dict[str, Any]:
        """Frame ``ix`` as a dict in the vendor's field order (docs/vendor-protocol.md)."""
        if ix < 0:
            raise ValueError(f"ix must be >= 0, got {ix}")
        t = ix / self.rate_hz
        k = ix % self._phase_frames
        # Phases alternate 1, 2, 1, 2, ... so the simulator can run for ever.
        ph = (ix // self._phase_frames) % 2 + 1
        st = "start" if k == 0 else "end" if k == self._phase_frames - 1 else "running"
        shift = 10.0 * math.sin(0.013 * t + self._shift_phase)
        b0, b1, b2, b3 = self._ball_phase
        home_has_ball = math.sin(0.05 * t + b3) >= 0
        holders = self._home if home_has_ball else self._away
        holder = holders[1 + int(t / 4.0 + b3) % 10]
        ball = {
            "jn": holder.jn,
            "pn": [
                round(45.0 * math.sin(0.041 * t + b0) * math.cos(0.011 * t), 2),
                round(28.0 * math.sin(0.067 * t + b1), 2),
                round(max(0.0, 4.0 * math.sin(0.9 * t + b2)) + 0.11, 2),
            ],
            "tr": "0",
            "tm": "home" if home_has_ball else "away",
        }
        return {
            "id": self.fixture_id,
            "ix": ix,
            "mt": (ph - 1) * self._phase_ms + round(k * 1000 / self.rate_hz),
            "ph": ph,
            "st": st,
            "ut": self._kickoff_ut_ms + round(t * 1000),
            "ba": ball,
            "hm": [self._entry(m, t, shift) for m in self._home],
            "aw": [self._entry(m, t, -shift) for m in self._away],
            "rf": [self._entry(m, t, 0.0) for m in self._refs],
        }

    @staticmethod
    def _entry(m: _Mover, t: float, shift: float) -> dict[str, Any]:
        x, y, d, v = m.state(t, shift)
        out: dict[str, Any] = {"tr": m.tr, "ro": m.ro, "jn": m.jn}
        if m.pl is not None:
            out["pl"] = m.pl
        out["d"] = round(d, 3)
        out["v"] = round(v, 3)
        out["pn"] = [round(x, 2), round(y, 2)]
        return out
