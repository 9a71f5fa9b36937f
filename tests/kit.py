"""Helpers for end-to-end tests: a simulator and a whole gateway in this process.

Everything binds 127.0.0.1 port 0. The gateway runs exactly as ``dde-gateway run`` builds it
(``gateway.service.serve`` minus the signal handling, which the process tests cover).
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio
import trio_websocket

from gateway.config import Config, structure_config
from gateway.model import FixtureState
from gateway.service import Gateway
from gateway.simulator import Simulator
from tests.conftest import TEST_TOKEN

TRACKING_PATH = "/ws/soccer/tracking/low_latency"


@attrs.define
class RecordingSink:
    """A FrameSink that keeps what it gets; ``fail_publish`` makes the next N publishes raise."""

    frames: list[str] = attrs.field(factory=list)
    #: The vendor position each frame was published with (None: unsequenced).
    positions: list[int | None] = attrs.field(factory=list)
    states: list[tuple[FixtureState, str]] = attrs.field(factory=list)
    fail_publish: int = 0

    def publish(self, raw: str, position: int | None) -> None:
        if self.fail_publish > 0:
            self.fail_publish -= 1
            raise RuntimeError("sink exploded")
        self.frames.append(raw)
        self.positions.append(position)

    def set_status(self, state: FixtureState, detail: str) -> None:
        self.states.append((state, detail))

    @property
    def ixs(self) -> list[int]:
        return [orjson.loads(f)["ix"] for f in self.frames]


FASTPATH_TEMPLATE = "/soccer/fixtures/{fixture}/actions"


def gateway_config(
    sim_port: int,
    token_file: Path,
    fixtures: list[tuple[str, str]],
    **sections: dict[str, Any],
) -> Config:
    """A test config: tracking + fastpath feeds on the simulator, fast backoff, ports 0."""
    sim = f"ws://127.0.0.1:{sim_port}"
    data: dict[str, Any] = {
        "gateway": {"stream_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0"},
        "upstream": {
            "token_file": str(token_file),
            "connect_rate": 200.0,
            "backoff_initial": 0.02,
            "backoff_max": 0.2,
            "stall_timeout": 5.0,
        },
        "feeds": {
            "tracking": {"kind": "tracking", "url": sim + TRACKING_PATH},
            "actions": {"kind": "fastpath", "url": sim + FASTPATH_TEMPLATE},
        },
        "fixtures": [{"feed": f, "id": i} for f, i in fixtures],
    }
    _merge(data, sections)
    return structure_config(data)


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


@asynccontextmanager
async def running_gateway(config: Config) -> AsyncIterator[Gateway]:
    async with trio.open_nursery() as nursery:
        gw = Gateway(config)
        await nursery.start(gw.run)
        try:
            yield gw
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def simulator_and_gateway(
    tmp_path: Path,
    fixtures: list[tuple[str, str]],
    *,
    rate_hz: float = 100.0,
    **sections: dict[str, Any],
) -> AsyncIterator[tuple[Simulator, Gateway]]:
    token_file = tmp_path / "token"
    token_file.write_text(TEST_TOKEN)
    sim = Simulator(
        tokens={TEST_TOKEN}, rate_hz=rate_hz, heartbeat_interval=1.0, action_interval=0.2
    )
    for feed, fixture in fixtures:
        sim.add_fixture(fixture, kind="tracking" if feed == "tracking" else "fastpath")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve, "127.0.0.1", 0)
        config = gateway_config(port, token_file, fixtures, **sections)
        async with running_gateway(config) as gw:
            yield sim, gw
        nursery.cancel_scope.cancel()


def stream_url(gw: Gateway, path: str = "/v1/stream") -> str:
    assert gw.bound is not None
    return f"ws://{gw.bound.stream}{path}"


def http_url(gw: Gateway, path: str) -> str:
    assert gw.bound is not None
    return f"http://{gw.bound.http}{path}"


async def recv_json(ws: trio_websocket.WebSocketConnection) -> dict[str, Any]:
    msg = await ws.get_message()
    assert isinstance(msg, str), msg
    out: dict[str, Any] = orjson.loads(msg)
    return out


async def next_of_type(ws: trio_websocket.WebSocketConnection, kind: str) -> dict[str, Any]:
    """The next message of this ``type``, skipping heartbeats and status changes."""
    while True:
        msg = await recv_json(ws)
        if msg["type"] == kind:
            return msg
        assert msg["type"] in ("heartbeat", "status"), msg


async def wait_until(
    predicate: Callable[..., bool],  # called without arguments (lambdas may bind defaults)
    timeout: float = 10.0,  # noqa: ASYNC109 - the hard deadline is the point of this helper
    *,
    interval: float = 0.01,
) -> None:
    """Poll state that has no event to wait on (counters of another component).

    Use it instead of sleeping a guessed time and assuming something happened meanwhile: it
    returns as soon as *predicate* holds, and raises ``trio.TooSlowError`` if it still does not
    after *timeout* seconds (of the trio clock, so virtual seconds under ``MockClock``).
    """
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - nothing to wait on but the state itself
            await trio.sleep(interval)


class StepWatch(trio.abc.Instrument):
    """The most a *counter* grew during one task step: work done without yielding (a count of
    items handled, or CPU time: ``lambda: time.thread_time_ns()``)."""

    def __init__(self, counter: Callable[[], int]) -> None:
        self.counter = counter
        self.worst = 0
        # The task that adds the instrument ends its step without having begun it here.
        self._at = counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._at = self.counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.worst = max(self.worst, self.counter() - self._at)


async def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A plain HTTP GET in a worker thread (urllib), returning (status, body)."""

    def fetch() -> tuple[int, bytes]:
        req = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    return await trio.to_thread.run_sync(fetch)


#: journald's priority prefix of a line (sd-daemon(3)): ``<4>`` for a warning.
_PRIORITY = re.compile(rb"<([0-7])>")


class GatewayProcess:
    """A ``dde-gateway run`` subprocess's JSON log lines (stderr), read by :meth:`read_logs`
    in a task of the test; its addresses once the "gateway ready" line came. ``changed`` is
    set (and replaced) after every chunk read, so a test can wait on what the lines say."""

    def __init__(self, process: trio.Process, stderr: trio.abc.ReceiveStream | None = None) -> None:
        self.process = process
        #: The process's stderr (default: its ``stderr`` pipe).
        self.stderr = process.stderr if stderr is None else stderr
        self.logs: list[dict[str, Any]] = []
        #: Per line of ``logs``: its journald priority prefix (``<4>``), None without one.
        self.priorities: list[int | None] = []
        self.raw: list[str] = []
        self.changed = trio.Event()
        self.stream = ""
        self.http = ""
        #: stderr reached its end (the process closed it: it has exited).
        self.eof = False

    def _poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def read_logs(self) -> None:
        assert self.stderr is not None
        buf = b""
        async for chunk in self.stderr:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                self.raw.append(line.decode(errors="replace"))
                prefix = _PRIORITY.match(line)
                text = line if prefix is None else line[prefix.end() :]
                try:
                    rec = orjson.loads(text)
                except orjson.JSONDecodeError:
                    continue
                self.logs.append(rec)
                self.priorities.append(None if prefix is None else int(prefix[1]))
                if rec.get("msg", "").startswith("gateway ready"):
                    self.stream, self.http = rec["stream"], rec["http"]
            self._poke()
        self.eof = True
        self._poke()
