"""The whole gateway in one process against the simulator: upstream -> hub -> subscribers.

Covers what only the composition shows: frames verbatim end to end, seq contiguous across many
upstream drops, the vendor drop-in endpoint driven by the same client code that talks to the
simulator, on-demand follow and linger, the HTTP API over the real pieces, and the token never
leaking. Real sockets on 127.0.0.1 port 0, real time, generous ``fail_after`` guards.
"""

from __future__ import annotations

import argparse
import io
import logging
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio_websocket

from gateway.client import Watcher
from gateway.hub import Topic
from gateway.model import FixtureState
from gateway.upstream import WebSocketConnector
from tests.conftest import TEST_TOKEN
from tests.kit import (
    TRACKING_PATH,
    http_get,
    http_url,
    next_of_type,
    recv_json,
    simulator_and_gateway,
    stream_url,
    wait_until,
)

FX = "5501b26a-1c44-4c3b-9ff5-9322084d41f9"
FX2 = "08456e52-9cf7-48cc-913c-f45ec0a1b2c3"
ACT = "2ed1cba1-7c3e-4b5e-9a51-0d1f1c2b3a4d"


async def subscribe(
    ws: trio_websocket.WebSocketConnection, feed: str, fixture: str, **extra: Any
) -> dict[str, Any]:
    await ws.send_message(
        orjson.dumps({"op": "subscribe", "feed": feed, "fixture": fixture, **extra}).decode()
    )
    return await next_of_type(ws, "subscribed")


async def test_frames_flow_verbatim_with_contiguous_seq(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with simulator_and_gateway(tmp_path, [("tracking", FX)]) as (_, gw):
            async with trio_websocket.open_websocket_url(stream_url(gw)) as ws:
                sub = await subscribe(ws, "tracking", FX)
                assert sub["epoch"] and sub["recovered"] is False
                seqs, ixs = [], []
                for _ in range(50):
                    msg = await next_of_type(ws, "frame")
                    assert msg["data"]["id"] == FX
                    seqs.append(msg["seq"])
                    ixs.append(msg["data"]["ix"])
                assert seqs == list(range(seqs[0], seqs[0] + 50))
                assert ixs == list(range(ixs[0], ixs[0] + 50))
            status, body = await http_get(http_url(gw, f"/v1/fixtures/tracking/{FX}"))
            assert status == 200
            view = orjson.loads(body)
            assert view["state"] == "live" and view["seq"] >= 50
            assert view["upstream"]["connects"] >= 1
            status, latest = await http_get(http_url(gw, f"/v1/fixtures/tracking/{FX}/latest"))
            assert status == 200 and orjson.loads(latest)["id"] == FX


async def test_envelope_carries_upstream_text_byte_for_byte(tmp_path: Path) -> None:
    """The `data` value is the upstream text itself, not a re-serialisation."""
    with trio.fail_after(60):
        async with simulator_and_gateway(tmp_path, [("tracking", FX)]) as (_, gw):
            async with trio_websocket.open_websocket_url(stream_url(gw)) as ws:
                await subscribe(ws, "tracking", FX)
                while True:
                    text = await ws.get_message()
                    assert isinstance(text, str)
                    if '"type":"frame"' in text:
                        break
            prefix = f'{{"type":"frame","feed":"tracking","fixture":"{FX}","seq":'
            assert text.startswith(prefix) and text.endswith("}")
            data_text = text[text.index(',"data":') + len(',"data":') : -1]
            ix = orjson.loads(data_text)["ix"]
            topic = gw.hub.get("tracking", FX)
            assert topic is not None
            held = [f.raw for f in topic.history if orjson.loads(f.raw)["ix"] == ix]
            assert held == [data_text]


async def test_seq_contiguous_across_20_upstream_drops(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with simulator_and_gateway(tmp_path, [("tracking", FX)], rate_hz=200.0) as (sim, gw):
            async with trio_websocket.open_websocket_url(stream_url(gw)) as ws:
                await subscribe(ws, "tracking", FX)
                sim.faults(FX).drop_after_frames = 15
                handle = gw.supervisor.get("tracking", FX)
                assert handle is not None
                seqs: list[int] = []
                ixs: list[int] = []
                while handle.status.counters.reconnects < 20 or len(ixs) < 400:
                    msg = await next_of_type(ws, "frame")
                    seqs.append(msg["seq"])
                    ixs.append(msg["data"]["ix"])
                sim.faults(FX).drop_after_frames = None
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            assert ixs == list(range(ixs[0], ixs[0] + len(ixs)))


async def vendor_tracking_client(
    url: str, token: str, fixture: str, backfill: int, n: int
) -> list[str]:
    """A client written for the vendor's tracking protocol (docs/vendor-protocol.md): the same
    code is pointed at the simulator and at the gateway's drop-in endpoint."""
    frames: list[str] = []
    async with trio_websocket.open_websocket_url(url) as ws:
        await ws.send_message(orjson.dumps({"authToken": token}).decode())
        accepted = orjson.loads(await ws.get_message())
        assert accepted == {"message": "Authorisation accepted", "level": "INFO"}
        await ws.send_message(orjson.dumps({"fixtureId": fixture, "backfill": backfill}).decode())
        while len(frames) < n:
            text = await ws.get_message()
            assert isinstance(text, str)
            msg = orjson.loads(text)
            if "message" in msg:  # heartbeat
                assert msg["message"].startswith("Heartbeat sent at "), msg
                continue
            frames.append(text)
    return frames


async def test_dropin_endpoint_with_the_client_code_that_talks_to_the_simulator(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        async with simulator_and_gateway(tmp_path, [("tracking", FX)]) as (_, gw):
            sim_port = int(gw.config.feeds["tracking"].url.split(":")[2].split("/")[0])
            direct = await vendor_tracking_client(
                f"ws://127.0.0.1:{sim_port}{TRACKING_PATH}", TEST_TOKEN, FX, 5, 10
            )
            via = await vendor_tracking_client(stream_url(gw, TRACKING_PATH), "any", FX, 5, 10)
            for batch in (direct, via):
                ixs = [orjson.loads(t)["ix"] for t in batch]
                assert ixs == list(range(ixs[0], ixs[0] + 10))
            # The gateway forwards the vendor's bytes: frames with the same ix are identical.
            by_ix = {orjson.loads(t)["ix"]: t for t in direct}
            topic = gw.hub.get("tracking", FX)
            assert topic is not None
            held = {orjson.loads(f.raw)["ix"]: f.raw for f in topic.history}
            common = set(by_ix) & set(held)
            assert common and all(by_ix[i] == held[i] for i in common)


async def test_on_demand_follow_and_linger_stop(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with simulator_and_gateway(
            tmp_path,
            [],
            feeds={"actions": {"on_demand": True, "linger": 0.5}},
        ) as (sim, gw):
            sim.add_fixture(ACT, kind="fastpath")
            assert not gw.is_followed("actions", ACT)
            async with trio_websocket.open_websocket_url(stream_url(gw)) as ws:
                await subscribe(ws, "actions", ACT, backfill=-1)
                msg = await next_of_type(ws, "frame")
                assert msg["data"]["fixtureAction"]["fixtureId"] == ACT
                assert gw.is_followed("actions", ACT)
                await ws.send_message(
                    orjson.dumps({"op": "unsubscribe", "feed": "actions", "fixture": ACT}).decode()
                )
                await wait_until(lambda: not gw.is_followed("actions", ACT))
            status, _ = await http_get(http_url(gw, f"/v1/fixtures/actions/{ACT}"))
            assert status == 404


async def test_on_demand_cap_refuses_with_a_reason_and_counts(tmp_path: Path) -> None:
    # max_on_demand bounds the upstream connections subscribers can open; a lingering fixture
    # still counts, and its stop makes room again.
    act2 = "7f3c9a10-5b2d-4e8f-a1c3-2b4d6e8f0a1b"
    with trio.fail_after(60):
        async with simulator_and_gateway(
            tmp_path,
            [],
            feeds={"actions": {"on_demand": True, "linger": 1.0, "max_on_demand": 1}},
        ) as (sim, gw):
            for fx in (ACT, act2):
                sim.add_fixture(fx, kind="fastpath")
            async with trio_websocket.open_websocket_url(stream_url(gw)) as ws:
                await subscribe(ws, "actions", ACT)
                await ws.send_message(
                    orjson.dumps({"op": "subscribe", "feed": "actions", "fixture": act2}).decode()
                )
                err = await next_of_type(ws, "error")
                assert "max_on_demand" in err["message"] and act2 in err["message"]
                assert not gw.is_followed("actions", act2)
                _, body = await http_get(http_url(gw, "/metrics"))
                assert 'dde_on_demand_refused_total{feed="actions"} 1.0' in body.decode()
                await ws.send_message(
                    orjson.dumps({"op": "unsubscribe", "feed": "actions", "fixture": ACT}).decode()
                )
                await wait_until(lambda: not gw.is_followed("actions", ACT))
                await subscribe(ws, "actions", act2)  # room again after ACT's linger
                msg = await next_of_type(ws, "frame")
                assert msg["fixture"] == act2 and gw.is_followed("actions", act2)


async def test_put_and_delete_through_the_api(tmp_path: Path) -> None:

    with trio.fail_after(60):
        async with simulator_and_gateway(tmp_path, [("tracking", FX)]) as (sim, gw):
            sim.add_fixture(FX2, kind="tracking")
            base = http_url(gw, "")

            def call(method: str, path: str, body: bytes | None = None) -> int:
                req = urllib.request.Request(base + path, data=body, method=method)
                req.add_header("Content-Type", "application/json")
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return int(resp.status)

            assert (
                await trio.to_thread.run_sync(
                    call, "PUT", f"/v1/fixtures/tracking/{FX2}", b'{"backfill": 3}'
                )
                == 201
            )
            async with trio_websocket.open_websocket_url(stream_url(gw)) as ws:
                await subscribe(ws, "tracking", FX2)
                await next_of_type(ws, "frame")
                assert (
                    await trio.to_thread.run_sync(call, "DELETE", f"/v1/fixtures/tracking/{FX2}")
                    == 204
                )
                while True:
                    msg = await recv_json(ws)
                    if msg["type"] == "status" and msg["state"] == "stopped":
                        break
            assert not gw.is_followed("tracking", FX2)
            assert gw.is_followed("tracking", FX)


async def test_token_never_leaks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(60):
        async with simulator_and_gateway(tmp_path, [("tracking", FX)]) as (sim, gw):
            sim.faults(FX).drop_after_frames = 20
            handle = gw.supervisor.get("tracking", FX)
            assert handle is not None
            await wait_until(lambda: handle.status.counters.reconnects >= 2)
            sim.set_tokens({"another"})  # now rejected: the rejection path logs too
            await wait_until(lambda: handle.status.state is FixtureState.UNAUTHORIZED)
            bodies = []
            for path in (
                "/v1/status",
                "/v1/fixtures",
                f"/v1/fixtures/tracking/{FX}",
                "/metrics",
                "/v1/subscribers",
            ):
                status, body = await http_get(http_url(gw, path))
                assert status == 200, path
                bodies.append(body)
    assert TEST_TOKEN not in caplog.text
    assert all(TEST_TOKEN.encode() not in b for b in bodies)
    assert TEST_TOKEN not in repr(gw.config) and TEST_TOKEN not in repr(handle.status)


async def test_watch_client_prints_frames(tmp_path: Path) -> None:
    """``dde-gateway watch`` against a running gateway: one summary line per frame, the other
    events as JSON lines, connection states on stderr. (Resuming across drops, restarts and
    failover: tests/test_client_conformance.py, against the real command.)"""
    out, err = io.StringIO(), io.StringIO()
    with trio.fail_after(60):
        async with simulator_and_gateway(tmp_path, [("tracking", FX)]) as (_, gw):
            args = argparse.Namespace(
                url=[stream_url(gw)], topics=[f"tracking/{FX}"], backfill=3, raw=False, count=10
            )
            assert await Watcher(args, out, err).run() == 0
    lines = out.getvalue().splitlines()
    subscribed = [orjson.loads(line) for line in lines if line.startswith('{"event":"subscribed"')]
    assert [(s["recovered"], s["resumed"]) for s in subscribed] == [(False, False)]
    seqs = [int(line.split("seq=")[1].split()[0]) for line in lines if line.startswith("frame ")]
    assert len(seqs) == 10 and seqs == list(range(seqs[0], seqs[0] + 10))
    assert all(" ix=" in line for line in lines if line.startswith("frame "))
    assert f"# connected {stream_url(gw)}" in err.getvalue().splitlines()


async def test_trio_websocket_client_stays_selectable(tmp_path: Path) -> None:
    """``[upstream] client = "trio-websocket"`` is the fallback to the lean default client."""
    with trio.fail_after(60):
        async with (
            simulator_and_gateway(
                tmp_path, [("tracking", FX)], upstream={"client": "trio-websocket"}
            ) as (_, gw),
            trio_websocket.open_websocket_url(stream_url(gw)) as ws,
        ):
            assert isinstance(gw.supervisor.connector, WebSocketConnector)
            await subscribe(ws, "tracking", FX)
            msg = await next_of_type(ws, "frame")
            assert msg["data"]["id"] == FX


async def test_an_upstream_crash_is_counted_in_the_api_and_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``crashes`` (a bug in a fixture's task) reaches /v1/fixtures and /metrics of a real gateway.

    The first publish raises, as a bug in the hub would: the fixture's task restarts after a
    backoff, the count shows everywhere the other upstream counters do, and frames flow again.
    """
    real_publish = Topic.publish
    failures = [1]

    def publish_once_broken(self: Topic, raw: str, position: int | None) -> None:
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError("simulated bug in the hub")
        real_publish(self, raw, position)

    monkeypatch.setattr(Topic, "publish", publish_once_broken)
    with trio.fail_after(60):
        async with simulator_and_gateway(
            tmp_path, [("tracking", FX)], upstream={"backoff_initial": 0.05}
        ) as (_, gw):
            await wait_until(lambda: gw.latest("tracking", FX) is not None)
            status, body = await http_get(http_url(gw, f"/v1/fixtures/tracking/{FX}"))
            assert status == 200
            assert orjson.loads(body)["upstream"]["crashes"] == 1
            status, body = await http_get(http_url(gw, "/metrics"))
            assert status == 200
            metrics = body.decode()
    assert 'dde_upstream_crashes_total{feed="tracking"} 1.0' in metrics.splitlines()
