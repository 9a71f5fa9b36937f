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

import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from gateway.config import Config, load_subscriber_tokens
from gateway.service import Gateway
from gateway.simulator import Simulator
from tests.clients_kit import RUNNERS, contiguous, frame_problems, seqs, unavailable, watch
from tests.conftest import TEST_TOKEN
from tests.kit import gateway_config, running_gateway, stream_url, wait_until
from tests.redis_kit import RedisServer
from tests.test_cluster_process import HOME, cluster
from tests.test_dataplane_access import ALL, TRACKING_ONLY, write_tokens

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
        #: Follow the fixture from its first frame (``backfill = -1`` at the vendor): a replay
        #: from the start needs it held.
        self.from_start = False

    def config(self) -> Config:
        sections = {**self.sections}
        sections["gateway"] = {**sections.get("gateway", {}), "stream_listen": self.stream}
        token = self.tmp_path / "token"
        config = gateway_config(self.sim_port, token, [("tracking", FX)], **sections)
        if self.from_start:
            fixtures = tuple(attrs.evolve(f, backfill=-1) for f in config.fixtures)
            config = attrs.evolve(config, fixtures=fixtures)
        return config

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
async def site(
    tmp_path: Path, *, rate_hz: float = 50.0, **sections: dict[str, Any]
) -> AsyncIterator[Site]:
    (tmp_path / "token").write_text(TEST_TOKEN)
    sim = Simulator(tokens={TEST_TOKEN}, rate_hz=rate_hz, heartbeat_interval=1.0)
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


def _peak_rss_kib(pid: int) -> int:
    """The process's peak resident memory (Linux: VmHWM), for the report."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


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


async def test_a_restart_with_a_recorder_is_recovered_without_loss(
    tmp_path: Path, runner: str
) -> None:
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


async def test_a_restart_without_a_recorder_is_an_explicit_loss(
    tmp_path: Path, runner: str
) -> None:
    with trio.fail_after(90):
        async with site(tmp_path) as s:
            async with s.gateway():
                url = s.url
            async with watch(runner, ["--events", "--url", url, f"tracking/{FX}"]) as w:
                async with s.gateway():
                    await w.frames_after(30)
                last = w.events("frame")[-1]
                async with s.gateway():
                    await w.frames_after(30)
                assert await w.stop() == 0
    events = w.lines
    assert frame_problems(events, FX) == []
    (loss,) = w.events("loss")
    first, second = w.events("subscribed")
    assert (first["resumed"], second["resumed"], second["recovered"]) == (False, True, False)
    new_epoch = second["epoch"]
    assert loss == {
        "event": "loss",
        "feed": "tracking",
        "fixture": FX,
        "from_seq": last["seq"] + 1,
        "to_seq": second["seq"] or None,
        "epoch_before": last["epoch"],
        "epoch_after": new_epoch,
        "reason": "epoch_changed",
    }
    # The loss comes before the first frame of the new numbering, which follows on from it.
    at = events.index(loss)
    after = [e for e in events[at:] if e["event"] == "frame"]
    assert after and after[0]["epoch"] == new_epoch and after[0]["seq"] == second["seq"] + 1
    assert [e for e in events[:at] if e["event"] == "frame"][-1] == last


async def test_a_revoked_token_is_fatal(tmp_path: Path, runner: str) -> None:
    tokens = write_tokens(tmp_path)
    mine = tmp_path / "my-token"
    mine.write_text(TRACKING_ONLY + "\n")
    with trio.fail_after(90):
        async with site(tmp_path, subscribers={"tokens_file": str(tokens)}) as s:
            async with s.gateway():
                url = s.url
            args = ["--events", "--token-file", str(mine), "--url", url, f"tracking/{FX}"]
            async with watch(runner, args) as w:
                async with s.gateway() as gw:
                    await w.frames_after(10)
                    # Revoked: the file without it, reloaded (what SIGHUP does); the connection
                    # keeps the access it was given until it drops (the restart below).
                    tokens.write_text(f"{ALL}\n")
                    config = s.config()
                    gw.apply(config, tokens=load_subscriber_tokens(config))
                    await w.frames_after(5)
                async with s.gateway():
                    assert await w.exit_code() == 3
    errors = w.events("error")
    assert [e["fatal"] for e in errors] == [True]
    assert "401" in errors[0]["message"]
    assert w.lines[-1]["event"] == "state" and w.lines[-1]["state"] == "closed"
    assert not any(TRACKING_ONLY in line for line in [*map(str, w.lines), *w.err])
    assert frame_problems(w.lines, FX) == []


async def test_a_slow_application_gets_every_frame_once_or_an_explicit_loss(
    tmp_path: Path, runner: str
) -> None:
    """The program reads slowly (``--slow-ms``) with a small ``--max-queue``: it must stop
    reading (the gateway then closes it with 4008: a client that buffered everything would
    never be seen as slow), resume with ``after``, and print each frame once or a loss."""
    with trio.fail_after(90):
        async with (
            site(tmp_path, rate_hz=400.0, subscribers={"queue_bytes": 16384}) as s,
            s.gateway(),
        ):
            args = ["--events", "--max-queue", "16", "--slow-ms", "10", "--url", s.url]
            async with watch(runner, [*args, f"tracking/{FX}"]) as w:
                await w.wait_for(
                    lambda: any("4008" in e["reason"] for e in w.events("state")),
                    "closed as a slow consumer (4008)",
                    timeout=60,
                )
                await w.frames_after(20)
                peak = _peak_rss_kib(w.process.pid)
                assert await w.stop() == 0
    events = w.lines
    slow = [e for e in w.events("state") if "4008" in e["reason"]]
    print(
        f"[client-conformance] {runner}: slow application: {len(w.events('frame'))} frames, "
        f"{len(slow)} closes 4008, {len(w.events('loss'))} loss events, peak RSS {peak} KiB",
        file=sys.stderr,
    )
    assert frame_problems(events, FX) == []
    resumed = [e for e in w.events("subscribed") if e["resumed"]]
    assert resumed, "resumed after the 4008"
    printed = seqs(events, FX)
    assert len(printed) == len(set(printed))  # never twice


async def test_kill_9_of_the_instance_in_use_resumes_on_the_other(
    tmp_path: Path, runner: str, redis_server: RedisServer
) -> None:
    """Two instances on a real Redis; the programs (``--events`` and ``--raw``) are given
    ``--url A --url B`` and so use A; kill -9 of A: they go on on B, every frame once, no
    loss, for a fixture A owned and one B owned."""
    topics = [f"tracking/{HOME['gw-a'][0]}", f"tracking/{HOME['gw-b'][0]}"]
    with trio.fail_after(100):
        async with cluster(tmp_path, redis_server) as c:
            a, b = c.nodes["gw-a"], c.nodes["gw-b"]
            await c.settle()
            urls = ["--url", f"ws://{a.stream}/v1/stream", "--url", f"ws://{b.stream}/v1/stream"]
            async with (
                watch(runner, ["--events", *urls, *topics]) as w,
                watch(runner, ["--raw", *urls, *topics]) as raw,
            ):
                for p in (w, raw):
                    for t in topics:
                        await p.frames_after(25, t.split("/")[1])
                killed = trio.current_time()
                a.process.kill()
                for p in (w, raw):
                    for t in topics:
                        await p.frames_after(50, t.split("/")[1], timeout=40)
                pauses = [
                    (p.first_frame_after(killed, t.split("/")[1]) or killed) - killed
                    for p in (w, raw)
                    for t in topics
                ]
                print(
                    f"[client-conformance] {runner}: kill -9 of the instance in use: frames "
                    f"again after {min(pauses):.2f}-{max(pauses):.2f} s",
                    file=sys.stderr,
                )
                assert await w.stop() == 0 and await raw.stop() == 0
    for t in topics:
        fx = t.split("/")[1]
        problems = frame_problems(w.lines, fx)
        assert problems == [], (fx, problems, [e for e in w.lines if e.get("event") != "frame"])
        assert contiguous(seqs(w.lines, fx)) == [], fx
        assert contiguous(ixs(w.lines, fx)) == [], fx
        first, again = w.events("subscribed", fx)
        assert (first["resumed"], again["resumed"]) == (False, True)
        # Recovered, unless the survivor was still behind what the program had printed (its
        # topic catching up): the gateway then answers recovered: false with a lower seq and
        # the frames follow live; the client repeats none and reports no loss (checked above).
        before = [e for e in w.lines[: w.lines.index(again)] if e.get("event") == "frame"]
        last_seq = [e["seq"] for e in before if e["fixture"] == fx][-1]
        assert again["recovered"] or again["seq"] < last_seq, (again, last_seq)
        # --raw: what the gateways sent, verbatim: every frame once across the kill too.
        assert contiguous(seqs(raw.lines, fx)) == [], fx
        assert contiguous(ixs(raw.lines, fx)) == [], fx
    assert w.events("loss") == []
    states = [(e["state"], e["url"]) for e in w.events("state")]
    assert ("connected", f"ws://{b.stream}/v1/stream") in states
    assert raw.envelopes("gap") == [] and raw.envelopes("error") == []


async def test_replay_prints_the_match_again_at_its_pace(tmp_path: Path, runner: str) -> None:
    """``--replay PPS``: the fixture's frames from its first, as ``replay_frame`` events (never
    ``frame``), contiguous, then ``replay_end`` (``end``) and exit 0."""
    with trio.fail_after(60):
        async with site(tmp_path, recorder={"dir": str(tmp_path / "rec")}) as s:
            s.from_start = True
            async with s.gateway() as gw:
                await wait_until(lambda: _topic_seq(gw) >= 60, 30)
                args = ["--events", "--replay", "500", "--url", s.url, f"tracking/{FX}"]
                async with watch(runner, args) as w:
                    assert await w.exit_code(timeout=40) == 0
    assert w.events("replay_started"), w.describe()
    (started,) = w.events("replay_started")
    assert (started["from_seq"], started["rate"], started["looped"]) == (1, 500, False)
    replayed = [e["seq"] for e in w.events("replay_frame")]
    assert replayed[0] == 1 and len(replayed) >= 60 and contiguous(replayed) == []
    assert contiguous(ixs([{**e, "event": "frame"} for e in w.events("replay_frame")])) == []
    (end,) = w.events("replay_end")
    assert (end["reason"], end["last_seq"]) == ("end", replayed[-1])
    assert w.events("frame") == [] and w.events("error") == []
    assert [e["event"] for e in w.lines if e["event"] != "state"][-1] == "replay_end"


def _topic_seq(gw: Gateway) -> int:
    topic = gw.hub.get("tracking", FX)
    return 0 if topic is None else topic.seq


async def test_a_feed_the_token_does_not_allow_ends_with_the_gateways_error(
    tmp_path: Path, runner: str
) -> None:
    # A token for the tracking feed only, asking for an actions fixture: refused by the gateway;
    # the command ends (its only subscription ended) and shows the gateway's reason.
    tokens = write_tokens(tmp_path)
    mine = tmp_path / "my-token"
    mine.write_text(TRACKING_ONLY + "\n")
    with trio.fail_after(60):
        async with site(tmp_path, subscribers={"tokens_file": str(tokens)}) as s, s.gateway():
            args = ["--events", "--token-file", str(mine), "--url", s.url, "actions/any-fixture"]
            async with watch(runner, args) as w:
                assert await w.exit_code() == 0
    (error,) = w.events("error")
    assert error["fatal"] is False and error["feed"] == "actions"
    assert "not allowed" in error["message"] or "token" in error["message"], error
    (unsubscribed,) = w.events("unsubscribed")
    assert unsubscribed["reason"] == error["message"]
    assert not any(TRACKING_ONLY in line for line in [*map(str, w.lines), *w.err])


async def test_without_events_a_loss_is_printed_as_such(tmp_path: Path) -> None:
    # The default output (frames summarised): a restart without a recorder shows the resume
    # with recovered: false and the loss, as JSON lines between the frame lines.
    with trio.fail_after(90):
        async with site(tmp_path) as s:
            async with s.gateway():
                url = s.url
            async with watch("python", ["--url", url, f"tracking/{FX}"]) as w:
                async with s.gateway():
                    await w.wait_for(lambda: len(w.junk) >= 30, "30 frame lines")
                async with s.gateway():
                    await w.wait_for(lambda: bool(w.events("loss")), "the loss line")
                assert await w.stop() == 0
    first, second = w.events("subscribed")
    assert (first["resumed"], second["resumed"], second["recovered"]) == (False, True, False)
    (loss,) = w.events("loss")
    assert loss["reason"] == "epoch_changed" and loss["from_seq"] >= 30
    assert all(line.startswith(f"frame tracking/{FX} seq=") for line in w.junk)
