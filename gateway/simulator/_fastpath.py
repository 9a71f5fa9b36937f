"""The synthetic fastpath action script: action ``k`` is a pure function of (fixture, seed, k).

Only the score needs history (it counts earlier goals); :class:`ActionScript` keeps the running
score of the actions generated so far, which is one small tuple per action (one every few
seconds), and the texts are split around ``fixtureSeqNum`` because that number is per
connection: a connection's message is ``prefix + str(seq) + suffix``, no re-encoding.
"""

from __future__ import annotations

import datetime
import random
import uuid
from typing import Final

import attrs
import orjson

from gateway.simulator._messages import utc_stamp
from gateway.simulator._tracking import DEFAULT_KICKOFF_UT_MS

# (type, weight); goals are rare, passes common.
_ACTION_TYPES: Final = (
    ("Pass", 40),
    ("ThrowIn", 8),
    ("Foul", 8),
    ("FreeKick", 7),
    ("Tackle", 10),
    ("Shot", 8),
    ("Corner", 5),
    ("Offside", 3),
    ("Save", 4),
    ("YellowCard", 2),
    ("Substitution", 2),
    ("Goal", 3),
)
_SEQ_MARK: Final = 987654321987654321  # placeholder, replaced by the per-connection number


@attrs.frozen
class Action:
    """One generated action, split around its ``fixtureSeqNum``."""

    index: int  # 0-based position in the fixture's action list (what startPosition counts)
    prefix: str
    suffix: str

    def text(self, seq: int) -> str:
        return f"{self.prefix}{seq}{self.suffix}"


class ActionScript:
    """The deterministic action list of one fastpath fixture."""

    def __init__(self, fixture_id: str, seed: int, action_interval: float) -> None:
        if not action_interval > 0:
            raise ValueError(f"action_interval must be > 0, got {action_interval!r}")
        self.fixture_id = fixture_id
        self.action_interval = action_interval
        self._seed = seed
        self._types = [name for name, _ in _ACTION_TYPES]
        self._weights = [w for _, w in _ACTION_TYPES]
        self._scores: list[tuple[int, int]] = []  # score after action k

    def generated_at(self, k: int) -> float:
        """Seconds after the fixture was added at which the scorer records action ``k``."""
        return (k + 1) * self.action_interval

    def action(self, k: int) -> Action:
        """Action ``k`` (actions must be asked for in order the first time: the score grows)."""
        if k > len(self._scores):
            for i in range(len(self._scores), k):
                self.action(i)
        rng = random.Random(f"dde-sim/fastpath/{self._seed}/{self.fixture_id}/{k}")
        kind = rng.choices(self._types, self._weights)[0]
        home, away = self._scores[k - 1] if k > 0 else (0, 0)
        if k == len(self._scores):
            if kind == "Goal":
                if rng.random() < 0.5:
                    home += 1
                else:
                    away += 1
            self._scores.append((home, away))
        home, away = self._scores[k]
        stamp = datetime.datetime.fromtimestamp(
            DEFAULT_KICKOFF_UT_MS / 1000 + self.generated_at(k), datetime.UTC
        )
        doc = {
            "fixtureAction": {
                "actionId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "fixtureActionType": kind,
                "fixtureId": self.fixture_id,
                "fixtureSeqNum": _SEQ_MARK,
                "period": 1,
                "sendType": "New",
                "timestamp": utc_stamp(stamp, micro=True),
            },
            "fixtureSummary": {
                "homeTeamScore": home,
                "awayTeamScore": away,
                "currentStatus": "Live",
            },
        }
        prefix, suffix = orjson.dumps(doc).decode().split(str(_SEQ_MARK))
        return Action(k, prefix, suffix)
