"""The vendor drop-in endpoint, tracking and fastpath flavours, over real sockets.

Covers: tracking auth (accepted, bad format -> vendor ERROR + 1008, wrong token -> vendor
errorMessage + 1008, no auth in time -> 1008), vendor heartbeats, the fixture request with
backfill, unknown fixture WARN with the connection staying open, later requests ignored,
frames verbatim one per message; fastpath with the fixture in the path, Accept header allowed,
``startPosition`` counting sequenced events only, Disconnected once / Connected before the next
frame, bad startPosition -> 400,
without a valid token the same answer for a followed and an unfollowed fixture (after it: the
vendor's not-found body and 1000); drop-in subscribers are disconnected (4008) when slow even
under ``drop-oldest``; the feed option ``path`` gives a colliding feed its own drop-in path.

Rules: real sockets on 127.0.0.1 port 0, real time, ``trio.fail_after`` everywhere. Both
trio-websocket and the ``websockets`` package (sync client in a thread) are used as clients.
"""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import orjson
import pytest
import trio
import websockets.sync.client
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from gateway.config import FeedConfig
from gateway.model import FixtureState
from tests.kit import wait_until
from tests.test_dataplane import (
    FASTPATH_TEMPLATE,
    ODD_FRAME,
    TRACKING_PATH,
    RawClient,
    Served,
    make_config,
    recv_json,
    serving,
)

ACCEPTED = {"message": "Authorisation accepted", "level": "INFO"}
ACCEPT_HEADER = ("Accept", "application/vnd.imggaming.dde.api+json;version=1")
HEARTBEAT = re.compile(r"^Heartbeat sent at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _tokens(tmp_path: Path) -> Path:
    p = tmp_path / "subscriber-tokens"
    p.write_text("# subscribers\nsub-token-1\nsub-token-2\n")
    return p


def _action(n: int) -> str:
    return (
        f'{{"fixtureAction":{{"actionId":"a-{n}","fixtureActionType":"Pass","fixtureId":"F1",'
        f'"fixtureSeqNum":{n},"period":1,"sendType":"New",'
        '"timestamp":"2026-05-06T19:05:08.376151Z"},'
        '"fixtureSummary":{"homeTeamScore":0,"awayTeamScore":0,"currentStatus":"Live"}}'
    )


STATE_PACKET = (
    '{"timestamp":"2024-11-10T17:00:49.087Z","eventElementType":"ConnectionStateChanged",'
    '"state":"Connected"}'
)


async def test_tracking_dropin_protocol_websockets_client(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with serving(make_config(tokens_file=_tokens(tmp_path))) as s:
            topic = s.topic("F1")
            other = s.topic("F2")
            raws = [ODD_FRAME.replace('"ix" :0', f'"ix" :{i}') for i in range(5)]
            for raw in raws:
                topic.publish(raw, None)
            url = f"ws://{s.addr}{TRACKING_PATH}"

            def client() -> list[str]:
                got: list[str] = []
                with websockets.sync.client.connect(url, open_timeout=10) as ws:
                    ws.send('{"authToken": "sub-token-2"}')
                    got.append(str(ws.recv(timeout=10)))
                    ws.send('{"fixtureId": "NOPE", "backfill": 0}')
                    got.append(str(ws.recv(timeout=10)))
                    ws.send('{"fixtureId": "F1", "backfill": 2}')
                    got.extend(str(ws.recv(timeout=10)) for _ in range(2))
                    # Later requests are ignored; F2's frames never come.
                    ws.send('{"fixtureId": "F2", "backfill": -1}')
                    ws.send("garbage")
                    trio.from_thread.run_sync(other.publish, '{"other":1}', None)
                    trio.from_thread.run_sync(topic.publish, '{"live": 1}', None)
                    got.append(str(ws.recv(timeout=10)))
                return got

            got = await trio.to_thread.run_sync(client)
            assert orjson.loads(got[0]) == ACCEPTED
            assert orjson.loads(got[1]) == {
                "message": "Could not find fixture topic soccer.tracking.enrichment.NOPE",
                "level": "WARN",
            }
            assert got[2:4] == raws[3:5]  # verbatim, one frame per message
            assert got[4] == '{"live": 1}'


async def test_tracking_auth_failures(tmp_path: Path) -> None:
    with trio.fail_after(30):
        config = make_config(tokens_file=_tokens(tmp_path), handshake_timeout=0.5)
        async with serving(config) as s:
            url = f"ws://{s.addr}{TRACKING_PATH}"
            cases = [
                (
                    "not json",
                    {"message": "Authentication message had incorrect format", "level": "ERROR"},
                ),
                (
                    '{"authToken": 5}',
                    {"message": "Authentication message had incorrect format", "level": "ERROR"},
                ),
                (
                    '{"authToken": "wrong"}',
                    {"errorMessage": "Supplied token could not be authenticated"},
                ),
            ]
            for sent, expected in cases:
                async with open_websocket_url(url) as ws:
                    await ws.send_message(sent)
                    assert await recv_json(ws) == expected
                    with pytest.raises(ConnectionClosed) as info:
                        await ws.get_message()
                    assert info.value.reason is not None and info.value.reason.code == 1008
            # No authentication message within handshake_timeout.
            async with open_websocket_url(url) as ws:
                with pytest.raises(ConnectionClosed) as info:
                    await ws.get_message()
                assert info.value.reason is not None and info.value.reason.code == 1008


async def test_tracking_without_tokens_file_accepts_any_token_and_heartbeats() -> None:
    with trio.fail_after(30):
        async with serving(make_config(heartbeat_interval=0.1)) as s:
            s.topic("F1")
            async with open_websocket_url(f"ws://{s.addr}{TRACKING_PATH}") as ws:
                await ws.send_message('{"authToken": "anything"}')
                assert await recv_json(ws) == ACCEPTED
                for _ in range(2):
                    hb = await recv_json(ws)
                    assert hb["level"] == "INFO" and HEARTBEAT.match(hb["message"]), hb
                await ws.send_message('{"fixtureId": 12}')  # bad format: ERROR, stays open
                while (m := await recv_json(ws)).get("level") == "INFO":
                    pass
                assert m["level"] == "ERROR"
                await ws.send_message('{"fixtureId": "F1", "backfill": 0}')
                await wait_until(lambda: s.topic("F1").subscriber_count == 1)
                s.topic("F1").publish('{"x":1}', None)
                while (text := await ws.get_message()) != '{"x":1}':
                    assert "Heartbeat" in str(text)


async def test_fastpath_start_position_and_connection_state(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with serving(make_config(tokens_file=_tokens(tmp_path))) as s:
            topic = s.topic("F1", feed="fastpath")
            topic.set_status(FixtureState.LIVE, "")
            history = [
                (_action(1), 1),
                (STATE_PACKET, None),
                (_action(2), 2),
                (_action(3), 3),
                (STATE_PACKET, None),
                (_action(4), 4),
            ]
            for raw, position in history:
                topic.publish(raw, position)
            path = FASTPATH_TEMPLATE.replace("{fixture}", "F1")
            url = f"ws://{s.addr}{path}?startPosition=2"

            def client() -> list[str]:
                got: list[str] = []
                with websockets.sync.client.connect(
                    url, open_timeout=10, additional_headers=[ACCEPT_HEADER]
                ) as ws:
                    ws.send('{"authToken": "sub-token-1"}')
                    got.extend(str(ws.recv(timeout=10)) for _ in range(3))
                    trio.from_thread.run_sync(topic.set_status, FixtureState.BACKOFF, "retry")
                    trio.from_thread.run_sync(topic.set_status, FixtureState.CONNECTING, "")
                    got.append(str(ws.recv(timeout=10)))
                    trio.from_thread.run_sync(topic.set_status, FixtureState.LIVE, "")
                    trio.from_thread.run_sync(topic.publish, _action(5), 5)
                    got.extend(str(ws.recv(timeout=10)) for _ in range(2))
                return got

            got = await trio.to_thread.run_sync(client)
            # startPosition=2 skips two actions (and the status packet between them).
            assert got[:3] == [_action(3), STATE_PACKET, _action(4)]
            disconnected = orjson.loads(got[3])
            assert disconnected["eventElementType"] == "ConnectionStateChanged"
            assert disconnected["state"] == "Disconnected"
            assert disconnected["timestamp"].endswith("Z")
            assert orjson.loads(got[4])["state"] == "Connected"  # once, before the next frame
            assert got[5] == _action(5)


async def test_fastpath_rejections(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with serving(make_config(tokens_file=_tokens(tmp_path))) as s:
            s.topic("F1", feed="fastpath")
            base = f"ws://{s.addr}{FASTPATH_TEMPLATE.replace('{fixture}', 'F1')}"
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(base + "?startPosition=minus-one"):
                    pass
            assert info.value.status_code == 400
            async with open_websocket_url(base) as ws:  # no Accept header: fine
                await ws.send_message('{"authToken": "wrong"}')
                assert await recv_json(ws) == {
                    "errorMessage": "Supplied token could not be authenticated"
                }


async def _fastpath_answer(
    s: Served, fixture: str, first: bytes | None
) -> tuple[int, str, list[bytes], int | None, str]:
    """What a fastpath client of *fixture* sees when its first message is *first* (None:
    nothing): the status, the response head (without the per-key ``Sec-WebSocket-Accept``),
    then the texts until the close, its code and reason (or the refusal's body)."""
    path = FASTPATH_TEMPLATE.replace("{fixture}", fixture)
    raw = await RawClient.connect(s.addr, path, headers=f"{': '.join(ACCEPT_HEADER)}\r\n")
    head = re.sub(r"(?im)^sec-websocket-accept:.*$", "", raw.response_head)
    if raw.status != 101:
        raw.close()
        return raw.status, head, [raw.buf], None, ""
    if first is not None:
        await raw.send_frame(first)
    texts, code = await raw.read_until_close()
    raw.close()
    return raw.status, head, texts, code, raw.close_reason


async def test_fastpath_does_not_tell_a_followed_fixture_before_authentication(
    tmp_path: Path,
) -> None:
    """Hardening II, finding 8. Before: a fixture not followed was refused at the handshake
    (HTTP 404) before any token was seen, so anyone could enumerate the followed fixtures.
    Now a client without a valid token gets exactly the same answer for a followed and an
    unfollowed fixture (status, headers, messages, close code and reason); an authenticated
    client still gets the vendor's not-found body, then 1000."""
    with trio.fail_after(60):
        config = make_config(tokens_file=_tokens(tmp_path), handshake_timeout=0.5)
        async with serving(config) as s:
            s.topic("F1", feed="fastpath").set_status(FixtureState.LIVE, "")
            for first in (b'{"authToken": "wrong"}', b'{"authToken": 5}', b"not json", None):
                followed = await _fastpath_answer(s, "F1", first)
                unfollowed = await _fastpath_answer(s, "NOPE", first)
                assert followed == unfollowed, first
                assert followed[0] == 101 and followed[3] == 1008, followed
            assert s.auth.failures["dropin"] == 8  # each attempt counted, either fixture

            status, _, texts, code, reason = await _fastpath_answer(
                s, "NOPE", b'{"authToken": "sub-token-1"}'
            )
            assert (status, code, reason) == (101, 1000, "fixture not found")
            assert texts == [b'{"error":"fixture not found","status":404}']


async def test_dropin_slow_subscriber_always_disconnected() -> None:
    with trio.fail_after(60):
        config = make_config(queue_bytes=64 * 1024, slow_policy="drop-oldest")
        async with serving(config) as s:
            topic = s.topic("F1")
            stuck = await RawClient.connect(s.addr, TRACKING_PATH, rcvbuf=4096)
            await stuck.send_json({"authToken": "t"})
            assert await stuck.read_frame() == (1, orjson.dumps(ACCEPTED))
            await stuck.send_json({"fixtureId": "F1", "backfill": 0})
            await wait_until(lambda: topic.subscriber_count == 1)
            n = 0
            while topic.slow_disconnects == 0:
                assert n < 5000
                n += 1
                topic.publish(f'{{"ix":{n},"pad":"{"y" * 3000}"}}', None)
            assert topic.drops == 0
            texts, code = await stuck.read_until_close()
            assert code == 4008
            assert texts and texts[-1].startswith(b'{"ix":')
            stuck.close()


async def test_feed_path_option_moves_the_dropin_endpoint() -> None:
    """Two feeds on the same upstream path: ``path`` gives the second its own drop-in path."""
    with trio.fail_after(30):
        config = make_config()
        feeds = dict(config.feeds)
        feeds["replay"] = FeedConfig(
            kind="tracking", url=f"wss://other.example.test{TRACKING_PATH}", path="/ws/replay"
        )
        async with serving(attrs.evolve(config, feeds=feeds)) as s:
            main, replay = s.topic("F1"), s.topic("F1", feed="replay")
            for path, topic in ((TRACKING_PATH, main), ("/ws/replay", replay)):
                async with open_websocket_url(f"ws://{s.addr}{path}") as ws:
                    await ws.send_message('{"authToken": "t"}')
                    assert await recv_json(ws) == ACCEPTED
                    await ws.send_message('{"fixtureId": "F1", "backfill": 0}')
                    await wait_until(lambda t=topic: t.subscriber_count == 1)
                    main.publish('{"feed":"main"}', None)
                    replay.publish('{"feed":"replay"}', None)
                    expected = '{"feed":"main"}' if topic is main else '{"feed":"replay"}'
                    assert await ws.get_message() == expected
                await wait_until(lambda t=topic: t.subscriber_count == 0)
