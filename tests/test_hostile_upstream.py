"""A hostile upstream against a real gateway: huge frames, an echoed token.

The vendor is played by a small trio-websocket server in the test (the simulator is faithful,
this one is not): it authenticates like the vendor, then misbehaves. Real sockets on 127.0.0.1
port 0, real gateway, real subscribers; each test under ``trio.fail_after``.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio_websocket

from gateway.model import FixtureStatus
from gateway.service import Gateway, configure_logging
from tests.conftest import TEST_TOKEN
from tests.kit import (
    gateway_config,
    http_get,
    http_url,
    recv_json,
    running_gateway,
    stream_url,
    wait_until,
)
from tests.test_logging import SPELLING_NAMES, spellings, unfold

FX = "hostile-1"
Vendor = Callable[[trio_websocket.WebSocketConnection], Awaitable[None]]


@asynccontextmanager
async def hostile_vendor(
    tmp_path: Path, vendor: Vendor, **sections: dict[str, Any]
) -> AsyncIterator[Gateway]:
    """A gateway following FX on a tracking feed whose upstream is *vendor*."""

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            await vendor(ws)
        except trio_websocket.ConnectionClosed:
            pass

    token_file = tmp_path / "token"
    token_file.write_text(TEST_TOKEN)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
        port = server.port
        config = gateway_config(port, token_file, [("tracking", FX)], **sections)
        async with running_gateway(config) as gw:
            yield gw
        nursery.cancel_scope.cancel()


async def _accept(ws: trio_websocket.WebSocketConnection) -> None:
    assert orjson.loads(await ws.get_message()) == {"authToken": TEST_TOKEN}
    await ws.send_message('{"message":"Authorisation accepted","level":"INFO"}')
    await ws.get_message()  # the fixture request


async def test_huge_frames_are_bounded_by_history_bytes(tmp_path: Path) -> None:
    """40 valid frames of 15 MiB once took the process to 732 MB: the history keeps at most
    ``history_bytes`` of them, and subscribers still get every frame live."""
    size = 1024 * 1024
    budget = 3 * size

    subscribed = trio.Event()

    async def big_frames(ws: trio_websocket.WebSocketConnection) -> None:
        await _accept(ws)
        await subscribed.wait()  # the subscriber must see every frame live
        for ix in range(1, 21):
            pad = "x" * (size - 40)
            await ws.send_message(orjson.dumps({"ix": ix, "pad": pad}).decode())
        await trio.sleep_forever()

    feeds = {"tracking": {"history_bytes": budget, "history": 1500}}
    room = {"queue_bytes": 64 * size}  # the subscriber is not what this test is about
    with trio.fail_after(60):
        async with hostile_vendor(tmp_path, big_frames, feeds=feeds, subscribers=room) as gw:
            async with trio_websocket.open_websocket_url(
                stream_url(gw), max_message_size=4 * size
            ) as ws:
                await ws.send_message('{"op":"subscribe","feed":"tracking","fixture":"' + FX + '"}')
                await wait_until(lambda: gw.hub.get("tracking", FX) is not None)
                followed = gw.hub.get("tracking", FX)
                assert followed is not None
                await wait_until(lambda: followed.subscriber_count == 1)
                subscribed.set()
                got: list[int] = []
                while len(got) < 20:
                    msg = await recv_json(ws)
                    if msg["type"] == "frame":
                        got.append(msg["data"]["ix"])
                        topic = gw.hub.get("tracking", FX)
                        assert topic is not None and topic.history_bytes <= budget
            assert got == list(range(1, 21))
            topic = gw.hub.get("tracking", FX)
            assert topic is not None
            # 3 MiB hold the last three frames of just under 1 MiB each, never more.
            assert topic.history_len == 3
            assert topic.history_bytes <= budget


async def refused_quoting(tmp_path: Path, text: str) -> tuple[bytes, list[str], FixtureStatus]:
    """A vendor that refuses the token with ``errorMessage`` *text*: the fixture's API answer,
    what a subscriber of it was sent until it was told ``unauthorized``, and its status."""

    async def refuse(ws: trio_websocket.WebSocketConnection) -> None:
        await ws.get_message()
        await ws.send_message(orjson.dumps({"errorMessage": text}).decode())
        await ws.aclose(1008)

    with trio.fail_after(60):
        async with hostile_vendor(tmp_path, refuse) as gw:
            async with trio_websocket.open_websocket_url(stream_url(gw)) as ws:
                await ws.send_message('{"op":"subscribe","feed":"tracking","fixture":"' + FX + '"}')
                seen: list[str] = []
                while not any("unauthorized" in m for m in seen):
                    seen.append(str(await ws.get_message()))
            handle = gw.supervisor.get("tracking", FX)
            assert handle is not None
            await wait_until(lambda: handle.status.last_error is not None)
            status, body = await http_get(http_url(gw, f"/v1/fixtures/tracking/{FX}"))
            assert status == 200
    return body, seen, handle.status


async def test_a_token_echoed_upstream_reaches_no_api_and_no_subscriber(
    tmp_path: Path,
) -> None:
    """The vendor's refusal quoting the token went into ``detail``/``last_error`` over HTTP and
    into ``status`` messages to every subscriber of the fixture."""
    body, seen, status = await refused_quoting(
        tmp_path, f"Supplied token {TEST_TOKEN} could not be authenticated"
    )
    answer = orjson.loads(body)
    assert "Supplied token <redacted> could not be authenticated" in answer["detail"]
    everything = body.decode() + "".join(seen) + repr(status)
    assert TEST_TOKEN not in everything
    assert any("<redacted>" in m for m in seen)  # the subscribers were told, scrubbed


@pytest.mark.usefixtures("root_restored")
@pytest.mark.parametrize("spelled", spellings(TEST_TOKEN), ids=SPELLING_NAMES)
async def test_a_token_echoed_in_another_spelling_reaches_no_api_log_or_subscriber(
    tmp_path: Path, spelled: str
) -> None:
    """Scrubbing matched the exact text only: the token upper-cased or split by U+200B went into
    ``detail``/``last_error``, three log lines and the subscribers' ``status`` messages (and
    the log lines carried the raw U+200B and U+2028)."""
    out = io.StringIO()
    configure_logging(fmt="json", level="debug", stream=out, secrets=lambda: [TEST_TOKEN])
    body, seen, status = await refused_quoting(
        tmp_path, f"Supplied token {spelled} could not be authenticated\u2028forged line"
    )
    answer = orjson.loads(body)
    assert "Supplied token <redacted> could not be authenticated" in answer["detail"]
    assert (
        "Supplied token <redacted> could not be authenticated" in answer["upstream"]["last_error"]
    )
    logged = out.getvalue().splitlines()
    assert any("<redacted>" in line for line in logged)
    # Decoded (JSON escapes undone), so a token spelled with escapes would be found too.
    sources: list[bytes | str] = [body, *seen, *logged]
    texts = [orjson.loads(m) for m in sources]
    everything = orjson.dumps(texts).decode() + repr(status)
    assert TEST_TOKEN.casefold() not in unfold(everything)
    for line in logged:
        assert line.isprintable(), repr(line)  # no raw U+200B, U+2028, ...
