"""A diagnostic trio instrument: every task step longer than a threshold, as JSON lines.

Off unless the environment asks for it (the benchmark's ``--slow-steps PATH`` does)::

    DDE_GATEWAY_SLOW_STEPS=/tmp/steps.jsonl DDE_GATEWAY_SLOW_STEP_MS=10 dde-gateway run ...

Each line: ``{"pid", "t" (monotonic s), "task" (its name), "wall_ms", "cpu_ms", "at"}``.
``cpu_ms`` is the thread's CPU time during the step: a step with far more wall than CPU time
was not running (the host took the virtual CPU, or the process was preempted). ``at`` is where
the task suspended at the end of the step (file:line of the innermost awaiting frame): the
step ran the code between its previous suspension and that line.
"""

from __future__ import annotations

import json
import os
import time
from typing import IO, Final

import trio

ENV_PATH: Final = "DDE_GATEWAY_SLOW_STEPS"
ENV_THRESHOLD: Final = "DDE_GATEWAY_SLOW_STEP_MS"
DEFAULT_THRESHOLD_MS: Final = 10.0
_TRIO_DIR: Final = os.path.dirname(trio.__file__)


class SlowStepLog(trio.abc.Instrument):
    """Appends one JSON line per task step over *threshold_ms* to *out*."""

    def __init__(self, out: IO[str], threshold_ms: float = DEFAULT_THRESHOLD_MS) -> None:
        self._out = out
        self._threshold = threshold_ms / 1000.0
        self._wall = 0.0
        self._cpu = 0.0
        self._pid = os.getpid()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._wall = time.perf_counter()
        self._cpu = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        wall = time.perf_counter() - self._wall
        if wall < self._threshold:
            return
        cpu = time.thread_time() - self._cpu
        record = {
            "pid": self._pid,
            "t": round(time.monotonic(), 4),
            "task": task.name,
            "wall_ms": round(wall * 1000, 3),
            "cpu_ms": round(cpu * 1000, 3),
            "at": _suspended_at(task),
        }
        self._out.write(json.dumps(record) + "\n")
        self._out.flush()


def _suspended_at(task: trio.lowlevel.Task) -> str:
    """file:line of the innermost frame outside trio the task is suspended in ("" if done)."""
    coro: object = task.coro
    where = ""
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        filename = frame.f_code.co_filename
        if _TRIO_DIR not in filename:  # trio's own traps say nothing about the step
            where = f"{filename}:{frame.f_lineno}"
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return where


def instruments_from_env() -> list[trio.abc.Instrument]:
    """``[SlowStepLog]`` when ``DDE_GATEWAY_SLOW_STEPS`` names a file, else ``[]``."""
    path = os.environ.get(ENV_PATH)
    if not path:
        return []
    threshold = float(os.environ.get(ENV_THRESHOLD) or DEFAULT_THRESHOLD_MS)
    out = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the life of the process
    return [SlowStepLog(out, threshold)]
