"""Subscriber tokens on both endpoints, over real sockets, and their reload in a whole gateway.

Covers: ``/v1/stream`` without a token, with an unknown one or with two -> HTTP 401 with
``WWW-Authenticate`` (and nothing of the token in the answer); ``Authorization: Bearer`` and the
browser form ``Sec-WebSocket-Protocol: dde.v1, dde.bearer.<token>`` (answered ``dde.v1``, never
the token's protocol); a token's feed list: a subscription outside it is an ``error`` naming the
feed, the connection stays open and no on-demand follow starts; the drop-in with the same file
(a token of other feeds is the vendor's rejection, 1008); failures counted per endpoint and
logged rate-limited with the peer, never the token (300 wrong drop-in tokens: 300 counted, a
line or two); open access without a file. In a whole gateway: a reload swaps the tokens for
new connections while a connected subscriber keeps its access, a broken file is refused and the
old tokens kept, the metric counts, and no token is in any log line or API answer. As a process:
SIGHUP with a broken then a good file, and a broken file at start (exit 2). ``dde-gateway
watch --token-file``.

Rules: real sockets on 127.0.0.1 port 0, real time, ``trio.fail_after`` everywhere.
"""

from __future__ import annotations

import argparse
import io
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
import websockets.sync.client
from trio_websocket import ConnectionRejected, open_websocket_url
from websockets.typing import Subprotocol

from gateway.client import Watcher
from gateway.config import ConfigError
from tests.kit import http_get, http_url, simulator_and_gateway, stream_url, wait_until
from tests.test_dataplane import (
    FASTPATH_TEMPLATE,
    TRACKING_PATH,
    FakeDirectory,
    RawClient,
    make_config,
    recv_json,
    recv_type,
    send_json,
    serving,
    subscribe,
)
from tests.test_service_process import gateway_process, simulator, write_config

ALL = "sub-all-4b8e1c0d9a7f6e5d"
TRACKING_ONLY = "sub-trk-0f1e2d3c4b5a6978"
NEW = "sub-new-99aa88bb77cc66dd"
SECRETS = (ALL, TRACKING_ONLY, NEW)
ACCEPTED = {"message": "Authorisation accepted", "level": "INFO"}
REJECTED = {"errorMessage": "Supplied token could not be authenticated"}


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


def write_tokens(tmp_path: Path, text: str | None = None) -> Path:
    path = tmp_path / "subscriber-tokens"
    path.write_text(text if text is not None else f"# who\n{ALL}\n{TRACKING_ONLY} tracking\n")
    return path


def assert_no_secret(*texts: str | bytes) -> None:
    for text in texts:
        s = text.decode(errors="replace") if isinstance(text, bytes) else text
        for secret in SECRETS:
            assert secret not in s, secret


async def rejected(url: str, **kw: Any) -> ConnectionRejected:
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(url, **kw):
            pass
    return info.value


async def test_stream_needs_a_token_at_the_upgrade(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.dataplane")
    with trio.fail_after(30):
        async with serving(make_config(tokens_file=write_tokens(tmp_path))) as s:
            topic = s.topic()
            cases: list[dict[str, Any]] = [
                {},
                {"extra_headers": bearer("wrong")},
                {"extra_headers": [(b"authorization", f"Basic {ALL}".encode())]},
                {"subprotocols": ["dde.v1", "dde.bearer.wrong"]},
                {"extra_headers": bearer(ALL), "subprotocols": ["dde.bearer." + ALL]},  # two
            ]
            for kw in cases:
                rej = await rejected(s.url, **kw)
                assert rej.status_code == 401, kw
                headers = dict(rej.headers)
                assert headers[b"www-authenticate"] == b'Bearer realm="dde-gateway"'
                assert b"subscriber token is required" in (rej.body or b"")
                assert_no_secret(rej.body or b"", repr(rej.headers))
            assert s.registry.accepted == 0
            assert len(s.registry) == 0

            # The header form.
            async with open_websocket_url(s.url, extra_headers=bearer(ALL)) as ws:
                await subscribe(ws)
                topic.publish('{"ix":1}', None)
                assert (await recv_type(ws, "frame"))["data"] == {"ix": 1}
            # The browser form, answered with dde.v1 only; a bearer protocol alone gets none.
            async with open_websocket_url(
                s.url, subprotocols=["dde.v1", "dde.bearer." + ALL]
            ) as ws:
                assert ws.subprotocol == "dde.v1"
                await subscribe(ws)
            async with open_websocket_url(s.url, subprotocols=["dde.bearer." + ALL]) as ws:
                assert ws.subprotocol is None
                await subscribe(ws)

            auth = s.auth
            assert auth.failures == {"stream": 5, "dropin": 0}
    lines = [r.getMessage() for r in caplog.records if "authentication failed" in r.getMessage()]
    assert lines and all("from 127.0.0.1:" in line and "/v1/stream" in line for line in lines)
    assert "(1 failures there since start)" in lines[0]
    assert_no_secret(caplog.text)


async def test_browser_form_with_the_websockets_client(tmp_path: Path) -> None:
    """An independent client: the answered protocol is dde.v1, the token never comes back."""
    with trio.fail_after(30):
        async with serving(make_config(tokens_file=write_tokens(tmp_path))) as s:
            s.topic()

            def client() -> tuple[str | None, str, list[str]]:
                with websockets.sync.client.connect(
                    s.url,
                    open_timeout=10,
                    subprotocols=[Subprotocol("dde.v1"), Subprotocol("dde.bearer." + ALL)],
                ) as ws:
                    assert ws.response is not None
                    raw = str(ws.response.headers)
                    ws.send('{"op":"subscribe","feed":"tracking","fixture":"F1"}')
                    return ws.subprotocol, raw, [str(ws.recv(timeout=10)) for _ in range(2)]

            protocol, raw_headers, got = await trio.to_thread.run_sync(client)
            assert protocol == "dde.v1"
            assert "Sec-WebSocket-Protocol: dde.v1" in raw_headers
            assert_no_secret(raw_headers)
            assert [orjson.loads(m)["type"] for m in got] == ["subscribed", "status"]


async def test_a_tokens_feed_list_bounds_its_subscriptions(tmp_path: Path) -> None:
    with trio.fail_after(30):
        directory = FakeDirectory()
        config = make_config(tokens_file=write_tokens(tmp_path))
        async with serving(config, directory) as s:
            topic = s.topic()
            async with open_websocket_url(s.url, extra_headers=bearer(TRACKING_ONLY)) as ws:
                for feed in ("fastpath", "ondemand"):
                    await send_json(ws, {"op": "subscribe", "feed": feed, "fixture": "F1"})
                    err = await recv_type(ws, "error")
                    assert err["message"] == f"feed '{feed}' is not allowed for this subscriber"
                    assert_no_secret(orjson.dumps(err))
                # Refused before the hub: no on-demand follow was asked for.
                assert directory.calls == []
                assert s.hub.get("ondemand", "F1") is None
                # The connection stays usable for the feed the token allows.
                await subscribe(ws)
                topic.publish('{"ix":7}', None)
                assert (await recv_type(ws, "frame"))["data"] == {"ix": 7}
            # Feed refusals are answered, not counted as failed authentications.
            assert s.auth.failures == {"stream": 0, "dropin": 0}


async def test_dropin_uses_the_same_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.dataplane")
    with trio.fail_after(60):
        config = make_config(tokens_file=write_tokens(tmp_path), handshake_timeout=0.5)
        async with serving(config) as s:
            s.topic("F1")
            s.topic("F1", feed="fastpath")
            tracking = f"ws://{s.addr}{TRACKING_PATH}"
            fastpath = f"ws://{s.addr}{FASTPATH_TEMPLATE.replace('{fixture}', 'F1')}"
            for url, token, expected in (
                (tracking, TRACKING_ONLY, ACCEPTED),
                (tracking, ALL, ACCEPTED),
                (fastpath, TRACKING_ONLY, REJECTED),  # a token of other feeds
            ):
                async with open_websocket_url(url) as ws:
                    await send_json(ws, {"authToken": token})
                    if expected is REJECTED:
                        assert await recv_json(ws) == REJECTED
                    else:
                        assert await recv_json(ws) == ACCEPTED
            # The other failures keep their vendor answers and are counted too.
            bad_format = await RawClient.connect(s.addr, TRACKING_PATH)
            await bad_format.send_frame(b"not json")
            assert (await bad_format.read_until_close())[1] == 1008
            silent = await RawClient.connect(s.addr, TRACKING_PATH)
            assert (await silent.read_until_close())[1] == 1008
            for c in (bad_format, silent):
                c.close()
            await wait_until(lambda: s.auth.failures["dropin"] == 3)

            # 300 wrong tokens: every one counted, a few log lines with peer and count.
            for i in range(300):
                raw = await RawClient.connect(s.addr, TRACKING_PATH)
                await raw.send_json({"authToken": f"{ALL}-{i}"})
                texts, code = await raw.read_until_close()
                assert code == 1008 and texts == [orjson.dumps(REJECTED)]
                raw.close()
            assert s.auth.failures == {"stream": 0, "dropin": 303}
    lines = [r.getMessage() for r in caplog.records if "authentication failed" in r.getMessage()]
    assert 1 <= len(lines) <= 10, lines
    assert all("a drop-in endpoint from 127.0.0.1:" in line for line in lines)
    assert "may not read 'fastpath'" in lines[0] and "(1 failures there since start)" in lines[0]
    assert_no_secret(caplog.text)


async def test_without_a_file_access_stays_open() -> None:
    with trio.fail_after(30):
        async with serving(make_config()) as s:
            s.topic()
            async with open_websocket_url(s.url) as ws:
                await subscribe(ws)
            async with open_websocket_url(s.url, extra_headers=bearer("whatever")) as ws:
                await subscribe(ws)
            assert s.auth.failures == {"stream": 0, "dropin": 0}


async def test_reload_swaps_tokens_for_new_connections_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = write_tokens(tmp_path)
    fx = "5501b26a-1c44-4c3b-9ff5-9322084d41f9"
    with trio.fail_after(60):
        async with simulator_and_gateway(
            tmp_path, [("tracking", fx)], subscribers={"tokens_file": str(tokens)}
        ) as (_, gw):
            url = stream_url(gw)
            assert (await rejected(url)).status_code == 401
            async with open_websocket_url(url, extra_headers=bearer(ALL)) as old:
                await send_json(old, {"op": "subscribe", "feed": "tracking", "fixture": fx})
                assert (await recv_type(old, "subscribed"))["fixture"] == fx

                tokens.write_text(f"{NEW} tracking\n")
                changes = gw.apply(gw.config)
                assert changes["needs_restart"] == []
                # New connections: the new file.
                assert (await rejected(url, extra_headers=bearer(ALL))).status_code == 401
                async with open_websocket_url(url, extra_headers=bearer(NEW)) as ws:
                    await send_json(ws, {"op": "subscribe", "feed": "actions", "fixture": "X"})
                    assert "not allowed" in (await recv_type(ws, "error"))["message"]
                # The connected subscriber keeps what it had: every feed.
                await send_json(old, {"op": "subscribe", "feed": "actions", "fixture": "X"})
                while (m := await recv_json(old))["type"] != "error":
                    pass
                assert "not allowed" not in m["message"], m  # refused for another reason

                # A broken file is refused, the running tokens kept.
                tokens.write_text(f"{ALL} tracking,,actions\n")
                with pytest.raises(ConfigError) as info:
                    gw.apply(gw.config)
                assert "line 1" in str(info.value) and "$.subscribers.tokens_file" in str(
                    info.value
                )
                async with open_websocket_url(url, extra_headers=bearer(NEW)):
                    pass
                assert (await rejected(url, extra_headers=bearer(ALL))).status_code == 401

                # Unset: open again, and not a change that needs a restart.
                open_config = attrs.evolve(
                    gw.config, subscribers=attrs.evolve(gw.config.subscribers, tokens_file=None)
                )
                assert gw.apply(open_config)["needs_restart"] == []
                async with open_websocket_url(url):
                    pass

                status, metrics = await http_get(http_url(gw, "/metrics"))
                assert status == 200
                assert b'dde_subscriber_auth_failures_total{endpoint="stream"} 3.0' in metrics
                assert b'dde_subscriber_auth_failures_total{endpoint="dropin"} 0.0' in metrics
                bodies = [metrics]
                for path in ("/v1/status", "/v1/subscribers", "/v1/fixtures"):
                    status, body = await http_get(http_url(gw, path))
                    assert status == 200
                    bodies.append(body)
    assert_no_secret(caplog.text, *bodies, repr(gw.config), repr(gw.auth))


async def test_process_reload_and_start_with_token_files(tmp_path: Path) -> None:
    """``dde-gateway run``: SIGHUP re-reads the token file (a broken one is refused with the
    line and field path, the running tokens kept); a broken file at start is exit 2."""
    tokens = write_tokens(tmp_path, f"{ALL}\n")
    with trio.fail_after(90):
        async with simulator(tmp_path, "A") as (_, port):
            config = tmp_path / "gateway.toml"
            write_config(config, port, ["A"])
            with config.open("a") as f:
                f.write(f'[subscribers]\ntokens_file = "{tokens}"\n')
            async with gateway_process(tmp_path, config) as proc:
                await proc.wait_for(lambda: "READY=1" in proc.notes)
                url = f"ws://{proc.stream}/v1/stream"
                async with open_websocket_url(url, extra_headers=bearer(ALL)):
                    pass
                assert (await rejected(url, extra_headers=bearer(NEW))).status_code == 401

                tokens.write_text(f"{NEW} tracking extra\n")
                proc.process.send_signal(signal.SIGHUP)
                await proc.wait_for(lambda: any("reload refused" in r["msg"] for r in proc.logs))
                refused = next(r["msg"] for r in proc.logs if "reload refused" in r["msg"])
                assert (
                    "line 1: expected TOKEN" in refused and "$.subscribers.tokens_file" in refused
                )
                async with open_websocket_url(url, extra_headers=bearer(ALL)):
                    pass  # the running tokens were kept

                tokens.write_text(f"{NEW} tracking\n")
                proc.process.send_signal(signal.SIGHUP)
                await proc.wait_for(lambda: any(r["msg"].startswith("reloaded") for r in proc.logs))
                assert (await rejected(url, extra_headers=bearer(ALL))).status_code == 401
                async with open_websocket_url(url, extra_headers=bearer(NEW)):
                    pass
                reloaded = next(r for r in proc.logs if r["msg"].startswith("reloaded"))
                assert reloaded["needs_restart"] == []
                proc.process.send_signal(signal.SIGTERM)
                assert await proc.process.wait() == 0
            assert_no_secret("\n".join(proc.raw))
            assert any("authentication failed" in line for line in proc.raw)

            tokens.write_text(f"{ALL} nosuchfeed\n")
            result = await trio.run_process(
                [sys.executable, "-m", "gateway", "run", "--config", str(config)],
                capture_stderr=True,
                check=False,
            )
            assert result.returncode == 2
            err = result.stderr.decode()
            assert "unknown feed 'nosuchfeed'" in err and "$.subscribers.tokens_file" in err
            assert_no_secret(err)


async def test_watch_sends_its_token_file(tmp_path: Path) -> None:
    """``dde-gateway watch --token-file``: subscribes with the token; without one a 401 ends
    the command (exit 3, a fatal error) instead of retrying forever."""
    fx = "5501b26a-1c44-4c3b-9ff5-9322084d41f9"
    token_file = tmp_path / "my-token"
    token_file.write_text(TRACKING_ONLY + "\n")
    with trio.fail_after(60):
        async with simulator_and_gateway(
            tmp_path, [("tracking", fx)], subscribers={"tokens_file": str(write_tokens(tmp_path))}
        ) as (_, gw):

            def args(token: Path | None) -> argparse.Namespace:
                return argparse.Namespace(
                    url=[stream_url(gw)],
                    topics=[f"tracking/{fx}"],
                    backfill=0,
                    raw=False,
                    count=3,
                    token_file=token,
                    ca_file=None,
                )

            out = io.StringIO()
            assert await Watcher(args(token_file), out).run() == 0
            assert out.getvalue().count("frame tracking/") == 3
            err = io.StringIO()
            assert await Watcher(args(None), io.StringIO(), err).run() == 3
            assert "the subscriber token was refused (HTTP 401)" in err.getvalue()
            assert gw.auth.failures["stream"] == 1
