"""The Python client's adapters and examples over real sockets (clients/python).

- trio: ``wss://`` with a private CA (``ca_file``) and the token as a subprotocol (the way a
  browser sends it), the token never in ``repr``; several topics in one merged stream;
- asyncio (``websockets``, run in a worker thread next to the trio gateway): the token as a
  header, frames in order, ``unsubscribe`` ends the iteration;
- the heartbeat watchdog: a server that accepts and then says nothing is left after
  ``heartbeat_misses`` x ``heartbeat_interval``, and the next URL is tried;
- the examples in clients/python/examples, run as programs: the 15-line consumer gets every
  frame once across a gateway restart (with a recorder), and its asyncio twin runs too.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import trio
import trio_websocket
import trustme
from dde_gateway_client import (
    AsyncioClient,
    Client,
    Error,
    Event,
    Frame,
    StateChanged,
    Subscribed,
    Unsubscribed,
)

from gateway import cli
from gateway.service import Gateway
from tests.clients_kit import ROOT, contiguous
from tests.kit import simulator_and_gateway, stream_url, wait_until
from tests.test_client_conformance import FX, site
from tests.test_dataplane_access import TRACKING_ONLY, write_tokens

FX2 = "08456e52-9cf7-48cc-913c-f45ec0a1b2c3"
EXAMPLES = ROOT / "clients" / "python" / "examples"


async def test_trio_client_over_tls_with_a_private_ca_and_a_subprotocol_token(
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "ca.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    ca.cert_pem.write_to_path(str(ca_file))
    tls = {"tls_cert_file": str(cert_file), "tls_key_file": str(key_file)}
    subscribers = {"tokens_file": str(write_tokens(tmp_path))}
    got: list[Event] = []
    with trio.fail_after(60):
        async with simulator_and_gateway(
            tmp_path, [("tracking", FX), ("tracking", FX2)], gateway=tls, subscribers=subscribers
        ) as (_, gw):
            url = stream_url(gw).replace("ws://", "wss://")
            client = Client(url, token=TRACKING_ONLY, token_in="subprotocol", ca_file=ca_file)
            assert TRACKING_ONLY not in repr(client) and TRACKING_ONLY not in repr(client.options)
            async with client:
                async for event in client.subscribe_many([("tracking", FX), ("tracking", FX2)]):
                    got.append(event)
                    if all(
                        sum(isinstance(e, Frame) and e.fixture == f for e in got) >= 5
                        for f in (FX, FX2)
                    ):
                        break
            assert gw.auth.failures["stream"] == 0
    assert [e.state for e in got if isinstance(e, StateChanged)] == ["connecting", "connected"]
    for fx in (FX, FX2):
        frames = [e for e in got if isinstance(e, Frame) and e.fixture == fx]
        assert contiguous([f.seq for f in frames]) == []
        assert all(orjson.loads(f.text)["id"] == fx for f in frames)


async def test_asyncio_client_gets_frames_in_order_and_unsubscribes(tmp_path: Path) -> None:
    subscribers = {"tokens_file": str(write_tokens(tmp_path))}

    async def consume(url: str) -> list[Event]:
        got: list[Event] = []
        async with AsyncioClient(url, token=TRACKING_ONLY) as client:
            sub = client.subscribe("tracking", FX, backfill=3)
            async for event in sub:
                got.append(event)
                if sum(isinstance(e, Frame) for e in got) == 10:
                    client.unsubscribe("tracking", FX)
        return got

    async def refused(url: str) -> list[Event]:
        async with AsyncioClient(url) as client:  # no token: 401, fatal
            return [event async for event in client.subscribe("tracking", FX)]

    with trio.fail_after(60):
        async with simulator_and_gateway(tmp_path, [("tracking", FX)], subscribers=subscribers) as (
            _,
            gw,
        ):
            url = stream_url(gw)
            got = await trio.to_thread.run_sync(asyncio.run, consume(url))
            fatal = await trio.to_thread.run_sync(asyncio.run, refused(url))
    assert [type(e).__name__ for e in fatal] == ["StateChanged", "Error", "StateChanged"]
    assert isinstance(fatal[1], Error) and fatal[1].fatal and "HTTP 401" in fatal[1].message
    assert fatal[2] == StateChanged("closed", url, fatal[1].message)
    frames = [e.seq for e in got if isinstance(e, Frame)]
    assert len(frames) == 10 and contiguous(frames) == []
    (sub,) = [e for e in got if isinstance(e, Subscribed)]
    assert frames[0] == max(1, sub.seq - 2)  # the last 3 first
    assert got[-1] == Unsubscribed("tracking", FX, "unsubscribe")


async def test_the_heartbeat_watchdog_leaves_a_silent_gateway_for_the_next(
    tmp_path: Path,
) -> None:
    """A gateway that accepts and then sends nothing (not even heartbeats) is dead to the
    client after 3 heartbeat intervals: it disconnects, saying why, and tries the next URL."""
    accepted = 0

    async def silent(request: trio_websocket.WebSocketRequest) -> None:
        nonlocal accepted
        await request.accept()
        accepted += 1
        await trio.sleep_forever()  # the connection stays open, silent

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                trio_websocket.serve_websocket, silent, "127.0.0.1", 0, None
            )
            url = f"ws://127.0.0.1:{server.port}/v1/stream"
            states: list[StateChanged] = []
            async with Client([url, url], heartbeat_interval=0.2) as client:
                async for event in client.subscribe("tracking", FX):
                    if isinstance(event, StateChanged):
                        states.append(event)
                        if len(states) == 5:
                            break
            nursery.cancel_scope.cancel()
    assert [s.state for s in states] == [
        "connecting",
        "connected",
        "disconnected",
        "connecting",
        "connected",
    ]
    assert states[2].reason == "no message for 0.6 s (heartbeat watchdog)"
    assert accepted == 2


async def _run_example(name: str, url: str, count: int) -> tuple[int, list[str]]:
    process = await trio.lowlevel.open_process(
        [sys.executable, str(EXAMPLES / name), url, f"tracking/{FX}", str(count)],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    out = b""
    async for chunk in process.stdout:
        out += chunk
    return await process.wait(), out.decode().splitlines()


async def test_the_15_line_consumer_gets_every_frame_across_a_gateway_restart(
    tmp_path: Path,
) -> None:
    source = (EXAMPLES / "consumer.py").read_text().splitlines()
    body = [line for line in source if line.strip() and not line.lstrip().startswith(("#", '"""'))]
    assert len(body) <= 20  # docs/clients.md shows it: short enough to copy
    with trio.fail_after(90):
        async with site(tmp_path, recorder={"dir": str(tmp_path / "rec")}) as s:
            async with s.gateway():
                url = s.url
            result: list[tuple[int, list[str]]] = []

            async def run() -> None:
                result.append(await _run_example("consumer.py", url, 120))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                for _ in range(2):  # 50 frames a second: 30 in each run, 120 in all
                    async with s.gateway() as gw:
                        await wait_until(lambda gw=gw: _subscribed(gw), 30)
                        start = _seq(gw)
                        await wait_until(lambda gw=gw, start=start: _seq(gw) >= start + 30, 30)
                async with s.gateway():
                    await wait_until(lambda: bool(result), 60)
    code, lines = result[0]
    assert code == 0
    assert not [line for line in lines if line.startswith("LOST")]
    seqs = [int(line.split()[0]) for line in lines]
    assert len(seqs) == 120 and contiguous(seqs) == []
    assert [orjson.loads(line.split(" ", 1)[1])["ix"] for line in lines][-1] > 0


def _subscribed(gw: Gateway) -> bool:
    topic = gw.hub.get("tracking", FX)
    return topic is not None and topic.subscriber_count > 0


def _seq(gw: Gateway) -> int:
    topic = gw.hub.get("tracking", FX)
    return 0 if topic is None else topic.seq


async def test_the_asyncio_consumer_runs(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with simulator_and_gateway(tmp_path, [("tracking", FX)]) as (_, gw):
            code, lines = await _run_example("consumer_asyncio.py", stream_url(gw), 20)
    assert code == 0
    seqs = [int(line.split()[0]) for line in lines]
    assert len(seqs) == 20 and contiguous(seqs) == []


def test_watch_exits_2_on_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad arguments end ``dde-gateway watch`` with 2 before any connection, saying why."""
    cases = [
        (["--max-queue", "0", "tracking/F"], "--max-queue"),
        (["--url", "http://x/v1/stream", "tracking/F"], "not a ws:// or wss:// URL"),
        (["--token-file", str(tmp_path / "missing"), "tracking/F"], "missing"),
        (["tracking"], "expected FEED/FIXTURE"),
    ]
    for args, says in cases:
        assert cli.main(["watch", *args]) == 2, args
        assert says in capsys.readouterr().err, args
    with pytest.raises(SystemExit) as exc:
        cli.main(["watch", "--raw", "--events", "tracking/F"])
    assert exc.value.code == 2
