"""permessage-deflate, compressed once (``[subscribers] compression = "deflate"``).

Covers: the shared encoding (raw deflate, the 00 00 ff ff tail left off, every message decodable
alone, RSV1 in the header); negotiation only when configured and offered, always with no
context takeover both ways, an offer limiting the server's window declined; frames decoded by
the ``websockets`` client (which offers permessage-deflate by default and compresses what it
sends) equal to the plain text; a client that does not offer it gets plain frames; one
compression per frame per topic, however many subscribers.

Rules: real sockets on 127.0.0.1 port 0, every test under ``trio.fail_after``.
"""

from __future__ import annotations

import sys
import zlib

import orjson
import pytest
import trio
import websockets.sync.client

from gateway.hub import Frame, deflate_message, envelope_prefix
from gateway.wire import RSV1, read_header
from tests.kit import wait_until
from tests.test_dataplane import ODD_FRAME, RawClient, make_config, serving

OFFER = "Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover\r\n"


def frame_text(i: int) -> str:
    return ODD_FRAME.replace('"ix" :0', f'"ix" :{i}')


def inflate(payload: bytes) -> bytes:
    # A fresh decompressor per message: what a client may do with no context takeover.
    return zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")


def test_deflate_ws_is_the_envelope_compressed_alone_with_rsv1() -> None:
    prefix = envelope_prefix("tracking", "F1")
    for i in range(3):  # consecutive messages: each decodes without the ones before
        frame = Frame(i + 1, frame_text(i), 0.0, prefix)
        ws = frame.deflate_ws
        assert ws is frame.deflate_ws  # built once
        header = read_header(ws, 0)
        assert header is not None
        b0, _, start, n = header
        assert b0 == 0x80 | RSV1 | 0x1
        assert start + n == len(ws)
        plain = read_header(frame.envelope_ws, 0)
        assert plain is not None
        assert inflate(ws[start:]) == frame.envelope_ws[plain[2] :]
        assert not ws.endswith(b"\x00\x00\xff\xff")
    assert inflate(deflate_message((b"",))) == b""


async def test_websockets_client_gets_compressed_frames_that_decode_to_the_same_text() -> None:
    with trio.fail_after(30):
        async with serving(make_config(compression="deflate")) as s:
            topic = s.topic()
            for i in range(5):
                topic.publish(frame_text(i), None)

            def client() -> tuple[list[str], str | None]:
                with websockets.sync.client.connect(s.url, open_timeout=10) as ws:
                    assert ws.response is not None
                    extensions = ws.response.headers.get("Sec-WebSocket-Extensions")
                    # Compressed by the client: wsproto must decode it.
                    ws.send('{"op":"subscribe","feed":"tracking","fixture":"F1","backfill":3}')
                    got = [str(ws.recv(timeout=10)) for _ in range(8)]
                    return got, extensions

            async def publish_live() -> None:
                await wait_until(lambda: topic.subscriber_count >= 1)
                for i in range(5, 8):
                    topic.publish(frame_text(i), None)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(publish_live)
                got, extensions = await trio.to_thread.run_sync(client)
            assert extensions is not None
            assert "permessage-deflate" in extensions
            assert "server_no_context_takeover" in extensions
            assert "client_no_context_takeover" in extensions
            kinds = [orjson.loads(m)["type"] for m in got]
            assert kinds == ["subscribed", "status"] + ["frame"] * 6
            seqs = [orjson.loads(m)["seq"] for m in got[2:]]
            assert seqs == [3, 4, 5, 6, 7, 8]
            for m, seq in zip(got[2:], seqs, strict=True):
                prefix = f'{{"type":"frame","feed":"tracking","fixture":"F1","seq":{seq},"data":'
                assert m == prefix + frame_text(seq - 1) + "}"


async def test_live_frames_compressed_and_shared_once_per_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    frame_module = sys.modules[Frame.__module__]  # where Frame looks deflate_message up
    real = deflate_message

    def counting(parts: tuple[bytes, ...]) -> bytes:
        calls.append(1)
        return real(parts)

    monkeypatch.setattr(frame_module, "deflate_message", counting)
    with trio.fail_after(20):
        async with serving(make_config(compression="deflate")) as s:
            topic = s.topic()
            clients = [await RawClient.connect(s.addr, headers=OFFER) for _ in range(4)]
            plain = await RawClient.connect(s.addr)
            for c in clients:
                assert "permessage-deflate" in c.response_head
                assert "server_no_context_takeover" in c.response_head
            assert "Sec-WebSocket-Extensions" not in plain.response_head
            for c in [*clients, plain]:
                await c.send_json({"op": "subscribe", "feed": "tracking", "fixture": "F1"})
            await wait_until(lambda: topic.subscriber_count == 5)
            for i in range(10):
                topic.publish(frame_text(i), None)
            seqs: list[int] = []
            for c in clients:
                seqs.clear()
                while len(seqs) < 10:
                    frame = await c.read_frame()
                    assert frame is not None
                    if c.last_rsv:
                        assert c.last_rsv == RSV1
                        m = orjson.loads(inflate(frame[1]))
                        assert m["type"] == "frame"
                        seqs.append(m["seq"])
                    else:  # control messages go uncompressed
                        assert orjson.loads(frame[1])["type"] != "frame"
                assert seqs == list(range(1, 11))
            seqs.clear()
            while len(seqs) < 10:
                frame = await plain.read_frame()
                assert frame is not None
                assert plain.last_rsv == 0
                m = orjson.loads(frame[1])
                if m["type"] == "frame":
                    seqs.append(m["seq"])
            assert seqs == list(range(1, 11))
            # Ten frames, four compressing subscribers: ten compressions.
            assert len(calls) == 10
            for c in [*clients, plain]:
                c.close()


async def test_not_negotiated_when_off_or_window_limited() -> None:
    with trio.fail_after(20):
        async with serving(make_config()) as s:
            c = await RawClient.connect(s.addr, headers=OFFER)
            assert c.status == 101
            assert "Sec-WebSocket-Extensions" not in c.response_head
            c.close()
        async with serving(make_config(compression="deflate")) as s:
            limited = "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10\r\n"
            c = await RawClient.connect(s.addr, headers=limited)
            assert c.status == 101
            assert "Sec-WebSocket-Extensions" not in c.response_head
            c.close()
