"""Optional TLS on both listeners: ``wss://`` on the data plane, ``https://`` on the API.

Covers: wss subscribers (trio-websocket and the ``websockets`` package) get frames byte for
byte with contiguous seq - backfill, bursts and control messages all through the TLS writer; a
drop-in client over TLS; a TLS subscriber that stops reading is disconnected with 4008 (the
byte budget holds under TLS) while the others get every frame; a plaintext client to the TLS
listener fails at once and nobody else notices; a whole gateway with TLS serves a wss://
subscriber from the simulator and the HTTPS API (a plaintext HTTP request fails, HTTPS goes on).

Certificates come from ``trustme`` (a throwaway CA), written to tmp_path. Rules: real sockets on
127.0.0.1 port 0, real time, ``trio.fail_after`` everywhere.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
import trustme
import websockets.exceptions
import websockets.sync.client
from trio_websocket import WebSocketConnection, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from gateway.config import Config, ListenAddress
from tests.kit import simulator_and_gateway, wait_until
from tests.test_dataplane import (
    ODD_FRAME,
    TRACKING_PATH,
    RawClient,
    make_config,
    recv_json,
    recv_type,
    serving,
    subscribe,
)

FRAME = '{"ix":%d,"pad":"' + "x" * 3000 + '"}'


@attrs.frozen
class Certs:
    cert_file: Path
    key_file: Path
    client: ssl.SSLContext


@pytest.fixture
def certs(tmp_path: Path) -> Iterator[Certs]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    cert.private_key_pem.write_to_path(str(key_file))
    with cert_file.open("wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    client = ssl.create_default_context()
    ca.configure_trust(client)
    yield Certs(cert_file, key_file, client)


def tls_config(certs: Certs, **subscribers: Any) -> Config:
    config = make_config(**subscribers)
    gateway = attrs.evolve(
        config.gateway, tls_cert_file=certs.cert_file, tls_key_file=certs.key_file
    )
    return attrs.evolve(config, gateway=gateway)


class TlsRawClient(RawClient):
    """:class:`RawClient` over TLS: a test controls when (and whether) it reads."""

    tls: trio.SSLStream[trio.SocketStream]

    @classmethod
    async def open(
        cls, addr: ListenAddress, ctx: ssl.SSLContext, path: str = "/v1/stream", *, rcvbuf: int
    ) -> TlsRawClient:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((addr.host, addr.port))
        self = cls(sock)
        self.tls = trio.SSLStream(trio.SocketStream(sock), ctx, server_hostname=addr.host)
        ws = WSConnection(ConnectionType.CLIENT)
        await self.tls.send_all(ws.send(Request(host=str(addr), target=path)))
        while True:
            ws.receive_data(bytes(await self.tls.receive_some(65536)))
            if any(isinstance(e, AcceptConnection) for e in ws.events()):
                self.status = 101
                return self

    async def send_all(self, data: bytes) -> None:
        await self.tls.send_all(data)

    async def read_frame(self) -> tuple[int, bytes] | None:
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            try:
                data = await self.tls.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            self.buf += data


async def test_wss_subscribers_get_every_frame_verbatim(certs: Certs) -> None:
    with trio.fail_after(60):
        async with serving(tls_config(certs, heartbeat_interval=0.2)) as s:
            topic = s.topic()
            raws = [ODD_FRAME.replace('"ix" :0', f'"ix" :{i}') for i in range(60)]
            for raw in raws[:30]:
                topic.publish(raw, None)
            url = f"wss://{s.addr}/v1/stream"
            assert s.url.replace("ws://", "wss://") == url
            async with open_websocket_url(url, certs.client) as ws:
                sub = await subscribe(ws, backfill=-1)
                assert sub["seq"] == 30
                for raw in raws[30:]:  # one burst: queued, written as batches
                    topic.publish(raw, None)
                for seq, raw in enumerate(raws, start=1):
                    text = await ws.get_message()
                    while '"type":"heartbeat"' in str(text):
                        text = await ws.get_message()
                    prefix = (
                        f'{{"type":"frame","feed":"tracking","fixture":"F1","seq":{seq},"data":'
                    )
                    assert text == prefix + raw + "}"
                assert (await recv_type(ws, "heartbeat"))["time"].endswith("Z")

            def client() -> list[str]:
                with websockets.sync.client.connect(url, ssl=certs.client, open_timeout=10) as c:
                    c.send('{"op":"subscribe","feed":"tracking","fixture":"F1","backfill":2}')
                    return [str(c.recv(timeout=10)) for _ in range(4)]

            got = await trio.to_thread.run_sync(client)
            assert [orjson.loads(m)["type"] for m in got] == [
                "subscribed",
                "status",
                "frame",
                "frame",
            ]
            assert got[3].endswith(',"data":' + raws[-1] + "}")


async def test_dropin_over_tls(certs: Certs) -> None:
    with trio.fail_after(30):
        async with serving(tls_config(certs)) as s:
            topic = s.topic()
            async with open_websocket_url(f"wss://{s.addr}{TRACKING_PATH}", certs.client) as ws:
                await ws.send_message('{"authToken": "t"}')
                assert (await recv_json(ws))["message"] == "Authorisation accepted"
                await ws.send_message('{"fixtureId": "F1", "backfill": 0}')
                await wait_until(lambda: topic.subscriber_count == 1)
                topic.publish(ODD_FRAME, None)
                assert await ws.get_message() == ODD_FRAME


async def test_stuck_tls_subscriber_is_disconnected_others_get_everything(certs: Certs) -> None:
    with trio.fail_after(90):
        async with serving(tls_config(certs, queue_bytes=64 * 1024)) as s:
            topic = s.topic()
            stuck = await TlsRawClient.open(s.addr, certs.client, rcvbuf=4096)
            await stuck.send_json({"op": "subscribe", "feed": "tracking", "fixture": "F1"})
            await wait_until(lambda: topic.subscriber_count == 1)
            received: list[list[int]] = [[] for _ in range(3)]

            async def healthy(i: int, ws: WebSocketConnection) -> None:
                while True:
                    received[i].append((await recv_type(ws, "frame"))["seq"])

            async def hold(*, task_status: trio.TaskStatus[WebSocketConnection]) -> None:
                async with open_websocket_url(f"wss://{s.addr}/v1/stream", certs.client) as ws:
                    task_status.started(ws)
                    await trio.sleep_forever()

            published = 0
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    ws = await nursery.start(hold)
                    await subscribe(ws)
                    nursery.start_soon(healthy, i, ws)
                while topic.slow_disconnects == 0:
                    assert published < 3000, "the stuck subscriber was never disconnected"
                    for _ in range(10):
                        published += 1
                        topic.publish(FRAME % published, None)
                    await wait_until(lambda n=published: all(len(r) == n for r in received))
                assert s.registry.slow_disconnects == 1
                # What the stuck client finally reads: whole frames in order, then 4008.
                texts, code = await stuck.read_until_close()
                assert code == 4008
                seqs = [orjson.loads(t)["seq"] for t in texts if b'"type":"frame"' in t]
                assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < published
                for _ in range(10):
                    published += 1
                    topic.publish(FRAME % published, None)
                await wait_until(lambda n=published: all(len(r) == n for r in received))
                assert all(r == list(range(1, published + 1)) for r in received)
                nursery.cancel_scope.cancel()
            stuck.close()


async def test_plaintext_client_to_the_tls_listener_fails_alone(certs: Certs) -> None:
    with trio.fail_after(30):
        async with serving(tls_config(certs)) as s:
            topic = s.topic()
            async with open_websocket_url(f"wss://{s.addr}/v1/stream", certs.client) as ws:
                await subscribe(ws)
                for _ in range(3):
                    # A plaintext upgrade: the TLS handshake fails, the server hangs up.
                    sock = trio.socket.socket()
                    await sock.connect((s.addr.host, s.addr.port))
                    await sock.send(
                        f"GET /v1/stream HTTP/1.1\r\nHost: {s.addr}\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
                    )
                    answer = b""
                    while True:
                        try:
                            data = await sock.recv(4096)
                        except ConnectionResetError:
                            break
                        if not data:
                            break
                        answer += data
                    sock.close()
                    assert b"HTTP/1.1 101" not in answer

                    # A WebSocket client speaking ws:// to it fails the same way, at once.
                    # (websockets: trio-websocket 0.12 waits forever when the server hangs up
                    # during its handshake.)
                    def plain_client() -> None:
                        with websockets.sync.client.connect(
                            f"ws://{s.addr}/v1/stream", open_timeout=10
                        ):
                            pass

                    with pytest.raises(websockets.exceptions.InvalidMessage):
                        await trio.to_thread.run_sync(plain_client)
                assert s.registry.accepted == 1 and len(s.registry) == 1
                topic.publish('{"still":"here"}', None)
                assert (await recv_type(ws, "frame"))["data"] == {"still": "here"}


def _https_get(url: str, ctx: ssl.SSLContext | None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_gateway_with_tls_serves_wss_and_https(tmp_path: Path, certs: Certs) -> None:
    fx = "5501b26a-1c44-4c3b-9ff5-9322084d41f9"
    tls = {"tls_cert_file": str(certs.cert_file), "tls_key_file": str(certs.key_file)}
    with trio.fail_after(60):
        async with simulator_and_gateway(tmp_path, [("tracking", fx)], gateway=tls) as (_, gw):
            bound = gw.bound
            assert bound is not None
            wss = f"wss://{bound.stream}/v1/stream"
            https = f"https://{bound.http}"
            async with open_websocket_url(wss, certs.client) as ws:
                await ws.send_message(
                    orjson.dumps({"op": "subscribe", "feed": "tracking", "fixture": fx}).decode()
                )
                seqs: list[int] = []
                while len(seqs) < 5:
                    msg = await recv_json(ws)
                    if msg["type"] == "frame":
                        seqs.append(msg["seq"])
                assert seqs == list(range(seqs[0], seqs[0] + 5))

                status, body = await trio.to_thread.run_sync(
                    _https_get, f"{https}/healthz", certs.client
                )
                assert (status, orjson.loads(body)) == (200, {"status": "ok"})

                # Plain HTTP to the HTTPS listener fails; HTTPS carries on.
                def plain() -> None:
                    conn = http.client.HTTPConnection(str(bound.http), timeout=10)
                    try:
                        conn.request("GET", "/healthz")
                        conn.getresponse().read()
                    finally:
                        conn.close()

                with pytest.raises((http.client.HTTPException, OSError)):
                    await trio.to_thread.run_sync(plain)
                status, body = await trio.to_thread.run_sync(
                    _https_get, f"{https}/v1/subscribers", certs.client
                )
                assert status == 200 and len(orjson.loads(body)) == 1
                status, body = await trio.to_thread.run_sync(
                    _https_get, f"{https}/metrics", certs.client
                )
                assert status == 200 and b"dde_subscriber_auth_failures_total" in body
                # The dashboard learns to use wss:// from /v1/status.
                status, body = await trio.to_thread.run_sync(
                    _https_get, f"{https}/v1/status", certs.client
                )
                assert orjson.loads(body)["stream"] == {
                    "scheme": "wss",
                    "host": None,
                    "port": bound.stream.port,
                    "path": "/v1/stream",
                }


async def test_wss_write_delay_batches_and_keeps_every_frame(certs: Certs) -> None:
    """Under TLS ``write_delay`` holds each batch the delay after its first frame: frames
    published one by one go out in fewer writes than frames, every one of them, in order."""
    with trio.fail_after(60):
        async with serving(tls_config(certs, write_delay=50)) as s:
            topic = s.topic()
            async with open_websocket_url(f"wss://{s.addr}/v1/stream", certs.client) as ws:
                await subscribe(ws)
                (conn,) = s.registry.connections_now()
                for i in range(40):
                    topic.publish(f'{{"ix":{i}}}', i)
                    await trio.sleep(0.005)  # pacing the publisher, not waiting for a result
                seqs: list[int] = []
                while len(seqs) < 40:
                    msg = orjson.loads(await ws.get_message())
                    if msg["type"] == "frame":
                        seqs.append(msg["seq"])
                assert seqs == list(range(1, 41))
                assert 0 < conn.writer_writes < 40
                # After a quiet spell too, a batch goes out a whole delay after its first
                # frame (it opens the batch): a lower bound, trio never wakes a sleep early.
                await trio.sleep(0.1)
                t0 = trio.current_time()
                topic.publish('{"ix":40}', 40)
                msg = orjson.loads(await ws.get_message())
                assert msg["seq"] == 41
                assert trio.current_time() - t0 >= 0.05
