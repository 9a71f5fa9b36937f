"""The client conformance suite: every client's ``watch`` program, the same scenarios.

Each scenario runs once per runner of tests/clients_kit.py (``python``: ``dde-gateway watch``;
the JS client adds ``node``), as a subprocess printing ``--events`` (or ``--raw``) JSON lines,
against a real gateway and the simulator, and asserts what the application saw, frame by frame
(docs/clients.md: each frame once, in order, or an explicit ``loss`` event; never a silent skip):

- the simulator drops the vendor connection again and again: frames continue, every seq once,
  the vendor's ``ix`` contiguous, no loss;
- the gateway restarts (drain, then a new gateway on the same address) with a recorder: the
  resume is ``recovered: true``, no loss, every frame once; without a recorder: a ``loss``
  event (``epoch_changed``, from the seq after the last one printed) before the new frames;
- kill -9 of the instance the program is on, in a two-instance cluster on a real Redis: it
  resumes on the other, every frame once, no loss (and ``--raw`` prints every frame once too);
- a slow application (``--slow-ms``, a small ``--max-queue``): the program stops reading, the
  gateway closes it as a slow consumer (4008), it resumes, and every frame is printed once or
  accounted for by a ``loss`` event;
- a revoked token: the tokens file changed and reloaded, the connection dropped: a fatal
  ``error`` event, state ``closed``, exit 3;
- a bad subscribe: an ``error`` event with the gateway's text, ``unsubscribed``, exit 0.

The gateway runs in this process (tests/kit.py) except in the cluster scenario (two
``dde-gateway run`` processes, tests/test_cluster_process.py's kit). Real sockets on 127.0.0.1,
ports 0 (a restarted gateway binds the port its predecessor was given), hard timeouts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.config import Config
from gateway.service import Gateway
from gateway.simulator import Simulator
from tests.clients_kit import RUNNERS, contiguous, frame_problems, seqs, unavailable, watch
from tests.conftest import TEST_TOKEN
from tests.kit import gateway_config, running_gateway, stream_url, wait_until

FX = "5501b26a-1c44-4c3b-9ff5-9322084d41f9"


@pytest.fixture(params=sorted(RUNNERS))
def runner(request: pytest.FixtureRequest) -> Iterator[str]:
    name: str = request.param
    why = unavailable(name)
    if why is not None:
        pytest.skip(f"runner {name}: {why}")
    yield name


class Site:
    """A simulator and a gateway that can be restarted on the same address."""

    def __init__(self, tmp_path: Path, sim: Simulator, nursery: trio.Nursery, port: int) -> None:
        self.tmp_path = tmp_path
        self.sim = sim
        self.nursery = nursery
        self.sim_port = port
        self.gw: Gateway | None = None
        self.stream = "127.0.0.1:0"
        self.sections: dict[str, dict[str, Any]] = {}

    def config(self) -> Config:
        sections = {**self.sections}
        sections["gateway"] = {**sections.get("gateway", {}), "stream_listen": self.stream}
        token = self.tmp_path / "token"
        return gateway_config(self.sim_port, token, [("tracking", FX)], **sections)

    @property
    def url(self) -> str:
        assert self.gw is not None
        return stream_url(self.gw)

    @asynccontextmanager
    async def gateway(self) -> AsyncIterator[Gateway]:
        """One run of the gateway (drained on the way out, as SIGTERM does); the next one
        binds the same stream address."""
        async with running_gateway(self.config()) as gw:
            self.gw = gw
            assert gw.bound is not None
            self.stream = str(gw.bound.stream)
            try:
                yield gw
            finally:
                await gw.drain()


@asynccontextmanager
async def site(tmp_path: Path, **sections: dict[str, Any]) -> AsyncIterator[Site]:
    (tmp_path / "token").write_text(TEST_TOKEN)
    sim = Simulator(tokens={TEST_TOKEN}, rate_hz=50.0, heartbeat_interval=1.0)
    sim.add_fixture(FX)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve, "127.0.0.1", 0)
        s = Site(tmp_path, sim, nursery, port)
        s.sections = dict(sections)
        yield s
        nursery.cancel_scope.cancel()


def ixs(events: list[dict[str, Any]], fixture: str = FX) -> list[int]:
    return [
        int(e["data"]["ix"])
        for e in events
        if e.get("fixture") == fixture and (e.get("event") == "frame" or e.get("type") == "frame")
    ]


async def test_upstream_drops_every_frame_once(tmp_path: Path, runner: str) -> None:
    with trio.fail_after(60):
        async with site(tmp_path) as s, s.gateway():
            args = ["--events", "--url", s.url, f"tracking/{FX}"]
            async with watch(runner, args) as w:
                await w.frames_after(10)
                s.sim.faults(FX).drop_after_frames = 15
                start = len(s.sim.attempts)
                await wait_until(
                    lambda: sum(a.fixture_id == FX for a in s.sim.attempts[start:]) >= 4, 30
                )
                s.sim.faults(FX).drop_after_frames = None
                await w.frames_after(20)
                assert await w.stop() == 0
    events = w.lines
    assert frame_problems(events, FX) == []
    assert w.events("loss") == []
    assert contiguous(seqs(events, FX)) == []
    assert contiguous(ixs(events)) == []  # the vendor's own numbering: nothing lost upstream
    assert len(w.events("subscribed")) == 1  # the gateway connection never dropped


async def test_a_bad_subscribe_is_an_error_event_with_the_gateways_text(
    tmp_path: Path, runner: str
) -> None:
    with trio.fail_after(60):
        async with site(tmp_path) as s, s.gateway():
            args = ["--events", "--url", s.url, "tracking/no-such-fixture"]
            async with watch(runner, args) as w:
                assert await w.exit_code() == 0  # its only subscription ended
    errors = w.events("error")
    assert errors == [
        {
            "event": "error",
            "message": "unknown fixture 'no-such-fixture' of feed 'tracking'",
            "request": errors[0]["request"],
            "feed": "tracking",
            "fixture": "no-such-fixture",
            "fatal": False,
        }
    ]
    assert '"op":"subscribe"' in errors[0]["request"]
    kinds = [e["event"] for e in w.lines if e["event"] != "state"]
    assert kinds == ["error", "unsubscribed"]
    assert w.events("unsubscribed")[0]["reason"] == errors[0]["message"]


async def test_a_restart_keeps_the_program_running(tmp_path: Path, runner: str) -> None:
    with trio.fail_after(90):
        async with site(tmp_path, recorder={"dir": str(tmp_path / "rec")}) as s:
            async with s.gateway():
                url = s.url
            async with watch(runner, ["--events", "--url", url, f"tracking/{FX}"]) as w:
                for _ in range(2):
                    async with s.gateway():
                        await w.frames_after(30)
                assert await w.stop() == 0
    subscribed = w.events("subscribed")
    assert [(e["resumed"], e["recovered"]) for e in subscribed][-1] == (True, True)
    assert w.events("loss") == []
    assert frame_problems(w.lines, FX) == []
    assert contiguous(seqs(w.lines, FX)) == []
