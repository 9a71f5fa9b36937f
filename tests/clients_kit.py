"""Runners for the client conformance suite: each client's ``watch`` program as a subprocess.

A runner turns the common ``watch`` arguments (docs/clients.md: ``--url`` (repeatable),
``--token-file``, ``--ca-file``, ``--backfill N``, ``--events``, ``--raw``, ``--max-queue N``,
``--slow-ms MS``, ``--heartbeat-interval S``, topics ``feed/fixture``) into the argv of one
client's program. The suite (tests/test_client_conformance.py) runs every scenario once per
runner and asserts what the program printed, event by event.

- ``python``: ``dde-gateway watch`` (``python -m gateway watch``), on clients/python.
- ``node``: ``node clients/js/examples/watch.mjs``, on clients/js (Debian's ``nodejs``).

:class:`Watch` reads the program's stdout as JSON lines (``--events``: the events; ``--raw``:
the gateway's envelopes) and keeps its stderr; :func:`frame_problems` says where what a program
printed breaks "each frame once, in order, or an explicit loss".
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import orjson
import trio

ROOT: Final = Path(__file__).resolve().parents[1]

Argv = Callable[[Sequence[str]], list[str]]


def _python(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "gateway", "watch", *args]


#: The JavaScript client's watch program (clients/js/examples/watch.mjs), run by Node.
NODE_WATCH: Final = ROOT / "clients" / "js" / "examples" / "watch.mjs"


def _node(args: Sequence[str]) -> list[str]:
    return [shutil.which("node") or "node", str(NODE_WATCH), *args]


#: Runner name -> argv builder. One entry per client program.
RUNNERS: dict[str, Argv] = {"python": _python, "node": _node}

#: Runner name -> why it cannot run here (None: it can). Checked before each scenario.
REQUIREMENTS: dict[str, Callable[[], str | None]] = {
    "python": lambda: None,
    "node": lambda: _required("node", "nodejs"),
}


def _required(program: str, package: str) -> str | None:
    """Why *program* is missing (Debian's *package*: .ci/test installs it as root), or None.
    In CI (``CI=true``) a missing program fails the suite instead of skipping it."""
    why = which(program)
    if why is not None and os.environ.get("CI") == "true":
        raise AssertionError(f"{why} (apt-get install -y {package}); CI must run every runner")
    return None if why is None else f"{why} (apt-get install -y {package})"


def unavailable(runner: str) -> str | None:
    """Why *runner* cannot run on this machine (a missing ``node``, say), or None."""
    check = REQUIREMENTS.get(runner)
    return None if check is None else check()


def which(program: str) -> str | None:
    """The reason a program is missing from PATH, or None (for :data:`REQUIREMENTS`)."""
    return None if shutil.which(program) else f"{program} is not installed"


class Watch:
    """One running ``watch`` program: its stdout lines parsed as JSON, its stderr kept."""

    def __init__(self, runner: str, process: trio.Process) -> None:
        self.runner = runner
        self.process = process
        #: Every stdout line parsed (objects only; anything else is in :attr:`junk`).
        self.lines: list[dict[str, Any]] = []
        #: When each of :attr:`lines` arrived (trio time).
        self.arrived: list[float] = []
        self.junk: list[str] = []
        self.err: list[str] = []
        self.changed = trio.Event()
        self.eof = False

    def _poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def _read_out(self) -> None:
        assert self.process.stdout is not None
        buf = b""
        async for chunk in self.process.stdout:
            buf += chunk
            *done, buf = buf.split(b"\n")
            for line in done:
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    self.junk.append(line.decode(errors="replace"))
                    continue
                if isinstance(obj, dict):
                    self.lines.append(obj)
                    self.arrived.append(trio.current_time())
                else:
                    self.junk.append(line.decode(errors="replace"))
            self._poke()
        self.eof = True
        self._poke()

    async def _read_err(self) -> None:
        assert self.process.stderr is not None
        buf = b""
        async for chunk in self.process.stderr:
            buf += chunk
            *done, buf = buf.split(b"\n")
            self.err.extend(line.decode(errors="replace") for line in done)
        if buf:
            self.err.append(buf.decode(errors="replace"))

    def events(self, kind: str | None = None, fixture: str | None = None) -> list[dict[str, Any]]:
        """``--events`` lines, of one kind and fixture if given."""
        return [
            e
            for e in self.lines
            if (kind is None or e.get("event") == kind)
            and (fixture is None or e.get("fixture") == fixture)
        ]

    def envelopes(self, kind: str, fixture: str | None = None) -> list[dict[str, Any]]:
        """``--raw`` lines of one ``type`` (and fixture)."""
        return [
            e
            for e in self.lines
            if e.get("type") == kind and (fixture is None or e.get("fixture") == fixture)
        ]

    def describe(self) -> str:
        """The last lines, for a failure message."""
        tail = [orjson.dumps(e).decode()[:200] for e in self.lines[-8:]]
        return "\n".join(["stdout (last lines):", *tail, "stderr:", *self.err[-12:]])

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        what: str,
        timeout: float = 30.0,  # noqa: ASYNC109 - the deadline is the point
    ) -> None:
        """Until *predicate* holds after a line arrived; fails naming *what* after *timeout*."""
        with trio.move_on_after(timeout):
            while not predicate():
                if self.eof:
                    raise AssertionError(f"{self.runner} ended before: {what}\n{self.describe()}")
                await self.changed.wait()
            return
        raise AssertionError(f"{self.runner}: not within {timeout} s: {what}\n{self.describe()}")

    async def frames_after(self, n: int, fixture: str | None = None, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Until *n* more frames (events or raw envelopes) than now have arrived."""
        start = self.frame_count(fixture)
        await self.wait_for(
            lambda: self.frame_count(fixture) >= start + n, f"{n} more frames", timeout
        )

    def first_frame_after(self, t: float, fixture: str) -> float | None:
        """When the first frame of *fixture* printed after trio time *t* arrived."""
        for line, at in zip(self.lines, self.arrived, strict=True):
            is_frame = line.get("event") == "frame" or line.get("type") == "frame"
            if at > t and is_frame and line.get("fixture") == fixture:
                return at
        return None

    def frame_count(self, fixture: str | None = None) -> int:
        return sum(
            1
            for e in self.lines
            if (e.get("event") == "frame" or e.get("type") == "frame")
            and (fixture is None or e.get("fixture") == fixture)
        )

    async def exit_code(self, timeout: float = 20.0) -> int:  # noqa: ASYNC109
        """Its exit status, once it ends by itself (within *timeout*)."""
        with trio.fail_after(timeout):
            return await self.process.wait()

    async def stop(self, timeout: float = 20.0) -> int:  # noqa: ASYNC109
        """SIGTERM, then its exit status (which must come within *timeout*)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await self.exit_code(timeout)


@asynccontextmanager
async def watch(runner: str, args: Sequence[str]) -> AsyncIterator[Watch]:
    """Run *runner*'s ``watch`` program with the common *args*; killed on the way out."""
    argv = RUNNERS[runner](list(args))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    process = await trio.lowlevel.open_process(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT), env=env
    )
    w = Watch(runner, process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(w._read_out)
            nursery.start_soon(w._read_err)
            try:
                yield w
            finally:
                if process.returncode is None:
                    process.kill()
                with trio.move_on_after(10):
                    await process.wait()
                nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()


def frame_problems(events: list[dict[str, Any]], fixture: str) -> list[str]:
    """Where the ``--events`` lines of *fixture* break the client's promise: every frame once,
    in order, or ``loss`` events before the next frame accounting for exactly what is missing.
    An empty list: the promise held.

    The position is (epoch, seq) of the last frame, moved on by each loss to its
    (``epoch_after``, ``to_seq``). A frame must be the position's seq + 1 in its epoch (any seq
    after a loss whose ``to_seq`` is unknown); a loss must start right after the position,
    from its epoch. A frame of another epoch without a loss is accepted only as a numbering
    that goes on (seq + 1: a recorder's new epoch after a crash, ``recovered: true``).
    """
    problems: list[str] = []
    pos: tuple[str, int | None] | None = None
    for e in events:
        if e.get("fixture") != fixture:
            continue
        kind = e.get("event")
        if kind == "loss":
            if pos is not None:
                if e["epoch_before"] != pos[0]:
                    problems.append(f"loss from epoch {e['epoch_before']} at {pos}")
                elif pos[1] is not None and e["from_seq"] != pos[1] + 1:
                    problems.append(f"loss from {e['from_seq']} at {pos}")
            pos = (e["epoch_after"], e["to_seq"])
        elif kind == "frame":
            epoch, seq = e["epoch"], int(e["seq"])
            if pos is not None and (seq != pos[1] + 1 if pos[1] is not None else epoch != pos[0]):
                problems.append(f"{pos} -> ({epoch}, {seq})")
            pos = (epoch, seq)
    return problems


def seqs(events: list[dict[str, Any]], fixture: str, kind: str = "frame") -> list[int]:
    """The seqs of *fixture*'s frames, as printed (``--events`` or ``--raw``)."""
    return [
        int(e["seq"])
        for e in events
        if e.get("fixture") == fixture and (e.get("event") == kind or e.get("type") == kind)
    ]


def contiguous(values: list[int]) -> list[str]:
    """Where *values* do not go up by one."""
    return [f"{a} -> {b}" for a, b in itertools.pairwise(values) if b != a + 1]
