"""The HTTP API of a whole running gateway (simulator upstream, real subscribers), not a fake.

Covers: every documented (path, method, status) of docs/openapi.yaml requested from a real
``Gateway`` with both token lists configured, each answer validated by schemathesis against the
document (so the real facade's views match the schema, not just ``MemoryTarget``'s); the auth
rules (401 without/with a wrong token, 403 for a read token on a write, open probes); a real
subscriber listed by ``/v1/subscribers`` (and untouched by the DELETE of another fixture);
``/metrics`` of the real gateway parsed back with prometheus_client's parser; ``/readyz`` 503
after a drain. No response may contain the upstream token. The real facade in cluster mode
(``[cluster]``, not started, so no Redis is needed): ``/v1/cluster`` with every counter of
``CLUSTER_COUNTERS`` from ``Gateway.cluster_view`` (none missing, none unknown), the
``dde_cluster_*`` metrics, fixtures as relays with no owner yet; no Redis URL or password in any
answer.

Rules: real sockets on 127.0.0.1 port 0, real time, one ``trio.fail_after``. schemathesis sends
with ``requests`` (blocking), so the requests run in a worker thread while the gateway runs on
the test's trio loop; steps that touch the gateway run back on the trio thread.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.checks import not_a_server_error

from gateway.config import ListenAddress
from gateway.controlplane import CLUSTER_COUNTERS, MAX_BODY_BYTES, run
from gateway.service import Gateway
from gateway.wire import CLOSE_DISCONNECTED, DISCONNECTED_REASON_PREFIX
from tests.conftest import TEST_TOKEN
from tests.kit import (
    gateway_config,
    next_of_type,
    simulator_and_gateway,
    stream_url,
    wait_until,
)
from tests.test_controlplane import (
    ADMIN_TOKENS,
    READ_TOKEN,
    REDIS_PASSWORD,
    assert_bounded_labels,
)
from tests.test_controlplane_openapi import documented_statuses, schema

FX = "5501b26a-1c44-4c3b-9ff5-9322084d41f9"
FX2 = "08456e52-9cf7-48cc-913c-f45ec0a1b2c3"
FX3 = "7b1d0c7e-5a43-4f0e-9d0b-2c4a1e6f8a90"
NO_FRAMES = "99999999-0000-4000-8000-000000000000"  # unknown to the simulator: never a frame
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKENS[0]}"}
READ = {"Authorization": f"Bearer {READ_TOKEN}"}
WRONG = {"Authorization": "Bearer not-a-token"}
ONE = "/v1/fixtures/{feed}/{fixture}"
LATEST = "/v1/fixtures/{feed}/{fixture}/latest"
RECORDING = "/v1/fixtures/{feed}/{fixture}/recording"
SUBSCRIBER = "/v1/subscribers/{id}"
#: The second subscriber of the test below: the one the API disconnects.
SECOND = {"id": "2"}
_Step = Callable[[Gateway], Awaitable[None]] | None
#: What only a gateway with ``[cluster]`` answers.
CLUSTER_ONLY = {
    ("/v1/cluster", "GET", 200),
    # A DELETE of a fixture this instance does not follow while Redis cannot tell.
    ("/v1/fixtures/{feed}/{fixture}", "DELETE", 503),
}


def _fx(fixture: str, feed: str = "tracking") -> dict[str, str]:
    return {"feed": feed, "fixture": fixture}


async def _wait_for_a_frame(gw: Gateway) -> None:
    await wait_until(lambda: gw.latest("tracking", FX) is not None)


async def _wait_for_a_recorded_frame(gw: Gateway) -> None:
    assert gw.recorder is not None
    log = gw.recorder.get("tracking", FX)
    await wait_until(lambda: log is not None and log.written_seq > 0)


async def _drain(gw: Gateway) -> None:
    await gw.drain()


# (path, method, path params, headers, body, expected status, step run on the trio thread first)
CASES: list[tuple[str, str, dict[str, str], dict[str, str], Any, int, _Step]] = [
    ("/", "GET", {}, {}, None, 200, None),
    ("/dashboard/{name}", "GET", {"name": "pitch.js"}, {}, None, 200, None),
    ("/dashboard/{name}", "GET", {"name": "missing.css"}, WRONG, None, 404, None),
    ("/healthz", "GET", {}, {}, None, 200, None),
    ("/readyz", "GET", {}, {}, None, 200, None),
    ("/v1/status", "GET", {}, ADMIN, None, 200, None),
    ("/v1/status", "GET", {}, {}, None, 401, None),
    ("/v1/status", "GET", {}, WRONG, None, 401, None),
    ("/v1/cluster", "GET", {}, READ, None, 404, None),  # a single node
    ("/v1/cluster", "GET", {}, {}, None, 401, None),
    ("/v1/fixtures", "GET", {}, READ, None, 200, None),
    ("/v1/fixtures", "GET", {}, {}, None, 401, None),
    (ONE, "GET", _fx(FX), READ, None, 200, None),
    (ONE, "GET", _fx(FX), {}, None, 401, None),
    (ONE, "GET", _fx(FX, "nofeed"), ADMIN, None, 404, None),
    (ONE, "GET", _fx(FX2), ADMIN, None, 404, None),  # not followed
    (LATEST, "GET", _fx(FX), READ, None, 200, _wait_for_a_frame),
    (LATEST, "GET", _fx(FX), {}, None, 401, None),
    (ONE, "PUT", _fx(NO_FRAMES), ADMIN, None, 201, None),
    (LATEST, "GET", _fx(NO_FRAMES), ADMIN, None, 404, None),  # followed, no frame yet
    (ONE, "PUT", _fx(FX2), ADMIN, {"backfill": 3}, 201, None),
    (ONE, "PUT", _fx(FX), ADMIN, {"backfill": 3}, 200, None),
    (ONE, "PUT", _fx(FX2), ADMIN, {"backfill": -5}, 400, None),
    (ONE, "PUT", _fx(FX3), ADMIN, None, 429, None),  # [api] max_fixtures = 2: full
    (ONE, "PUT", _fx(FX2), ADMIN, {"backfill": 1, "pad": "x" * MAX_BODY_BYTES}, 413, None),
    (ONE, "PUT", _fx(FX2, "nofeed"), ADMIN, None, 404, None),
    (ONE, "PUT", _fx(FX2), {}, None, 401, None),
    (ONE, "PUT", _fx(FX2), READ, None, 403, None),
    (ONE, "DELETE", _fx(FX2), {}, None, 401, None),
    (ONE, "DELETE", _fx(FX2), READ, None, 403, None),
    (ONE, "DELETE", _fx(FX2), ADMIN, None, 204, None),
    (ONE, "DELETE", _fx(FX2), ADMIN, None, 404, None),
    ("/v1/subscribers", "GET", {}, READ, None, 200, None),
    ("/v1/subscribers", "GET", {}, {}, None, 401, None),
    ("/metrics", "GET", {}, READ, None, 200, None),
    ("/metrics", "GET", {}, {}, None, 401, None),
    (RECORDING, "GET", _fx(FX), READ, None, 200, _wait_for_a_recorded_frame),
    (RECORDING, "GET", _fx(FX), {}, None, 401, None),
    (RECORDING, "GET", _fx(FX, "nofeed"), READ, None, 404, None),
    (RECORDING, "GET", _fx(NO_FRAMES, "actions"), READ, None, 404, None),  # never recorded
    ("/v1/recordings", "GET", {}, READ, None, 200, None),
    ("/v1/recordings", "GET", {}, {}, None, 401, None),
    (SUBSCRIBER, "DELETE", SECOND, {}, None, 401, None),
    (SUBSCRIBER, "DELETE", SECOND, READ, None, 403, None),
    (SUBSCRIBER, "DELETE", SECOND, ADMIN, {"reason": "bad\u0007"}, 400, None),
    (SUBSCRIBER, "DELETE", SECOND, ADMIN, {"reason": "x" * MAX_BODY_BYTES}, 413, None),
    (SUBSCRIBER, "DELETE", SECOND, ADMIN, {"reason": "maintenance"}, 204, None),
    (SUBSCRIBER, "DELETE", {"id": "999"}, ADMIN, None, 404, None),
    ("/readyz", "GET", {}, {}, None, 503, _drain),  # last: it stops the gateway's traffic
]
# With a query string: (path, method, path params, query, headers, status).
QUERY_CASES: list[tuple[str, str, dict[str, str], dict[str, Any], dict[str, str], int]] = [
    (RECORDING, "GET", _fx(FX), {"after": 0, "limit": 2}, READ, 200),
    (RECORDING, "GET", _fx(FX), {"limit": 0}, READ, 400),
    ("/v1/fixtures", "GET", {}, {"limit": 1}, READ, 200),
    ("/v1/fixtures", "GET", {}, {"after": "tracking"}, READ, 400),
    ("/v1/recordings", "GET", {}, {"limit": 1001}, READ, 400),
    ("/v1/subscribers", "GET", {}, {"limit": 0}, READ, 400),
    ("/v1/subscribers", "GET", {}, {"sort": "-frames_sent", "after": "999"}, READ, 404),
]


def _run_cases(base_url: str, gw: Gateway) -> tuple[set[tuple[str, str, int]], dict[str, Any]]:
    """Every case, validated against the document; the bodies of interest by name."""
    loaded = schema()
    seen: set[tuple[str, str, int]] = set()
    bodies: dict[str, Any] = {}
    with requests.Session() as session:
        for path, method, params, headers, body, status, step in CASES:
            if step is not None:
                trio.from_thread.run(step, gw)
            kwargs: dict[str, Any] = {"path_parameters": params, "headers": dict(headers)}
            if body is not None:
                kwargs["body"] = body
                kwargs["media_type"] = "application/json"
            case = loaded[path][method].Case(**kwargs)
            response = case.call(base_url=base_url, session=session)
            excluded = [not_a_server_error] if status == 503 else []
            case.validate_response(response, headers=headers, excluded_checks=excluded)
            assert response.status_code == status, (path, method, params, response.text)
            assert TEST_TOKEN not in response.text
            assert TEST_TOKEN not in repr(response.headers)
            seen.add((path, method, status))
            if status == 200 and path in ("/v1/subscribers", "/metrics", LATEST, RECORDING):
                bodies[path] = response.text
        for path, method, params, query, headers, status in QUERY_CASES:
            case = loaded[path][method].Case(
                path_parameters=params, query=query, headers=dict(headers)
            )
            response = case.call(base_url=base_url, session=session)
            case.validate_response(response, headers=headers)
            assert response.status_code == status, (path, method, query, response.text)
            seen.add((path, method, status))
            if status == 200 and path == RECORDING:
                bodies["limit=2"] = response.text
            elif status == 200:  # a page of one fixture of several, and the link to the next
                assert len(response.json()) == query["limit"]
                (link,) = response.headers["link"]  # schemathesis: every value of a header
                assert link.endswith('; rel="next"')
    return seen, bodies


async def test_every_documented_status_from_a_real_gateway(tmp_path: Path) -> None:
    (tmp_path / "admin").write_text("\n".join(ADMIN_TOKENS) + "\n")
    (tmp_path / "read").write_text(READ_TOKEN + "\n")
    api = {
        "admin_tokens_file": str(tmp_path / "admin"),
        "read_tokens_file": str(tmp_path / "read"),
        "max_fixtures": 2,
    }
    recorder = {"dir": str(tmp_path / "recordings")}
    stopped: list[dict[str, Any]] = []
    with trio.fail_after(90):
        async with simulator_and_gateway(
            tmp_path, [("tracking", FX)], api=api, recorder=recorder
        ) as (sim, gw):
            sim.add_fixture(FX2, kind="tracking")
            assert gw.bound is not None
            async with (
                trio_websocket.open_websocket_url(stream_url(gw)) as ws,
                trio.open_nursery() as nursery,
            ):
                await ws.send_message(
                    orjson.dumps({"op": "subscribe", "feed": "tracking", "fixture": FX}).decode()
                )
                await next_of_type(ws, "subscribed")

                async def read_until_stopped() -> None:
                    # Keeps the subscriber reading; DELETE of FX2 must not touch FX's stream,
                    # and the drain at the end closes it (1001).
                    try:
                        while True:
                            msg = orjson.loads(await ws.get_message())
                            if msg["type"] == "status" and msg["state"] == "stopped":
                                stopped.append(msg)
                    except trio_websocket.ConnectionClosed:
                        pass

                nursery.start_soon(read_until_stopped)
                async with trio_websocket.open_websocket_url(stream_url(gw)) as second:
                    await wait_until(lambda: len(gw.registry) == 2)
                    seen, bodies = await trio.to_thread.run_sync(
                        _run_cases, f"http://{gw.bound.http}", gw, abandon_on_cancel=True
                    )
                    # The DELETE closed it with the operator's reason.
                    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                        while True:
                            await second.get_message()
                    assert closed.value.reason is not None
                    assert (closed.value.reason.code, closed.value.reason.reason) == (
                        CLOSE_DISCONNECTED,
                        f"{DISCONNECTED_REASON_PREFIX}: maintenance",
                    )
    # A single node with a recorder (which [cluster] does not allow yet): /v1/cluster 200 is the
    # test below's.
    assert seen == documented_statuses() - CLUSTER_ONLY
    assert stopped == []  # the subscriber followed FX, never the deleted FX2

    sub, second_view = orjson.loads(bodies["/v1/subscribers"])
    assert (second_view["id"], second_view["subscriptions"]) == ("2", [])
    assert (sub["endpoint"], sub["subscriptions"]) == ("/v1/stream", [f"tracking/{FX}"])
    assert sub["peer"].startswith("127.0.0.1:")
    assert orjson.loads(bodies[LATEST])["id"] == FX
    # The download: record lines with the frame verbatim, from seq 1.
    lines = bodies[RECORDING].encode().splitlines()
    assert lines and orjson.loads(lines[0])["seq"] == 1
    assert all(orjson.loads(line)["data"]["id"] == FX for line in lines)
    assert [orjson.loads(line)["seq"] for line in bodies["limit=2"].encode().splitlines()] == [1, 2]

    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(bodies["/metrics"])
        for s in family.samples
    }
    assert got[("dde_frames_received_total", (("feed", "tracking"),))] > 0
    assert got[("dde_frames_received_total", (("feed", "actions"),))] == 0
    assert got[("dde_fixtures", (("feed", "tracking"), ("state", "live")))] >= 1
    assert got[("dde_subscribers", ())] == 2  # the second one is disconnected after this
    assert got[("dde_frames_sent_total", ())] > 0
    inf = got[("dde_fanout_latency_seconds_bucket", (("le", "+Inf"),))]
    assert inf == got[("dde_fanout_latency_seconds_count", ())]
    assert got[("dde_subscriber_auth_failures_total", (("endpoint", "stream"),))] == 0
    assert_bounded_labels(got)
    # Bytes in and out, the vendor's data age (the simulator stamps every frame), the frame age.
    assert got[("dde_upstream_received_bytes_total", (("feed", "tracking"),))] > 0
    assert got[("dde_subscriber_sent_bytes_total", ())] > 0
    assert got[("dde_upstream_data_age_seconds_count", (("feed", "tracking"),))] > 0
    assert got[("dde_fixture_frame_age_seconds", (("feed", "tracking"), ("fixture", FX)))] >= 0


def _cluster_answers(base_url: str) -> dict[str, requests.Response]:
    """The answers that change in a cluster, each validated against the document."""
    loaded = schema()
    out: dict[str, requests.Response] = {}
    with requests.Session() as session:
        for path, status in (
            ("/v1/cluster", 200),
            ("/v1/status", 200),
            ("/v1/fixtures", 200),
            ("/metrics", 200),
            ("/readyz", 503),  # not started
        ):
            headers = {} if path == "/readyz" else READ
            case = loaded[path]["GET"].Case(headers=dict(headers))
            response = case.call(base_url=base_url, session=session)
            excluded = [not_a_server_error] if status == 503 else []
            case.validate_response(response, headers=headers, excluded_checks=excluded)
            assert response.status_code == status, (path, response.text)
            out[path] = response
    return out


async def test_cluster_views_of_a_real_gateway(tmp_path: Path) -> None:
    redis_url = "redis://127.0.0.1:1/5"  # never connected to: the gateway is not started
    (tmp_path / "token").write_text(TEST_TOKEN)
    (tmp_path / "redis-password").write_text(REDIS_PASSWORD)
    (tmp_path / "read").write_text(READ_TOKEN + "\n")
    config = gateway_config(
        1,
        tmp_path / "token",
        [("tracking", FX), ("actions", FX2)],
        cluster={
            "redis_url": redis_url,
            "instance": "gw-t",
            "lease_ttl": 4.0,
            "password_file": str(tmp_path / "redis-password"),
        },
        api={"read_tokens_file": str(tmp_path / "read")},
    )
    gw = Gateway(config)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address: ListenAddress = await nursery.start(run, config, gw)
            answers = await trio.to_thread.run_sync(
                _cluster_answers, f"http://{address}", abandon_on_cancel=True
            )
            nursery.cancel_scope.cancel()
    for response in answers.values():
        for secret in (TEST_TOKEN, REDIS_PASSWORD, redis_url, "127.0.0.1:1/"):
            assert secret not in response.text
            assert secret not in repr(response.headers)

    cluster = answers["/v1/cluster"].json()
    assert (cluster["instance"], cluster["state"], cluster["lease_ttl"]) == ("gw-t", "ok", 4.0)
    assert cluster["instances"] == []  # no heartbeat yet
    assert (cluster["owned"], cluster["relayed"]) == (0, 2)
    assert cluster["counters"] == dict.fromkeys(CLUSTER_COUNTERS, 0)
    # The facade gives exactly the documented counters: none missing, none the API drops.
    view = gw.cluster_view()
    assert view is not None
    assert list(view.counters) == list(CLUSTER_COUNTERS)

    status = answers["/v1/status"].json()
    assert status["cluster"] == {"instance": "gw-t", "state": "ok"}
    assert status["degraded"] is None
    fixtures = answers["/v1/fixtures"].json()
    assert {(f["fixture"], f["owner"], f["role"]) for f in fixtures} == {
        (FX, None, "relay"),
        (FX2, None, "relay"),
    }
    got = {
        s.name: s.value
        for family in text_string_to_metric_families(answers["/metrics"].text)
        for s in family.samples
        if s.name.startswith("dde_cluster_")
    }
    assert got == {
        "dde_cluster_instances": 0,
        "dde_cluster_instances_silent": 0,
        "dde_cluster_view_age_seconds": 0,
        "dde_cluster_leases_owned": 0,
        "dde_cluster_fixtures_relayed": 2,
        "dde_cluster_standby_connections": 0,
        **{f"dde_cluster_{name}_total": 0 for name in CLUSTER_COUNTERS},
        "dde_cluster_relay_lag_seconds": 0,
        "dde_cluster_append_queued_bytes": 0,
        "dde_cluster_degraded": 0,
    }
