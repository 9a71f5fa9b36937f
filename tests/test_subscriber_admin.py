"""Subscriber administration (issue 25 item 7): ``GET /v1/subscribers`` filtered, sorted and
paged without stalling the event loop; ``DELETE /v1/subscribers/{id}`` disconnects one with
the operator's reason, counted."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest
import trio
import trio_websocket

from gateway.dataplane import QUERY_STEP, Facts, SubscriberQuery, SubscriberView, run_query
from gateway.wire import CLOSE_DISCONNECTED, DISCONNECTED_REASON_PREFIX, MAX_CLOSE_REASON_BYTES
from tests.kit import (
    StepWatch,
    http_get,
    http_url,
    next_of_type,
    simulator_and_gateway,
    stream_url,
    wait_until,
)
from tests.test_controlplane import ADMIN_TOKENS, Client, make_config, serving

ENDPOINTS = ("/v1/stream", "/ws/soccer/tracking/low_latency")


def _view(i: int) -> SubscriberView:
    """Subscriber i: fixture fx(i % 3), every other one on the drop-in, every fifth slow."""
    return SubscriberView(
        id=str(i),
        peer=f"10.0.0.{i}:4000",
        endpoint=ENDPOINTS[i % 2],
        subscriptions=(f"soccer/fx{i % 3}",),
        queued_bytes=(i * 37) % 101,
        frames_sent=(i * 7919) % 1000,
        frames_dropped=i % 4,
        connected_at=1000.0 + i,
        slow=i % 5 == 0,
    )


VIEWS = [_view(i) for i in range(1, 41)]


async def _pages(client: Client, path: str) -> tuple[list[str], list[int]]:
    """Every id over every page, following the Link headers; and each page's total."""
    ids: list[str] = []
    totals: list[int] = []
    while True:
        reply = await client.get(path)
        assert reply.status == 200, reply.body
        ids += [s["id"] for s in reply.json()]
        totals.append(int(reply.headers["x-total-count"]))
        link = reply.headers.get("link")
        if link is None:
            return ids, totals
        found = re.fullmatch(r'<(subscribers\?[^>]*)>; rel="next"', link)
        assert found is not None, link
        path = "/v1/" + found.group(1)


@pytest.mark.parametrize(
    ("query", "chosen", "order"),
    [
        ("", lambda v: True, lambda v: int(v.id)),
        ("fixture=fx1", lambda v: v.subscriptions == ("soccer/fx1",), lambda v: int(v.id)),
        (
            "feed=soccer&fixture=fx2&sort=-frames_sent",
            lambda v: v.subscriptions == ("soccer/fx2",),
            lambda v: (-v.frames_sent, int(v.id)),
        ),
        (
            "endpoint=%2Fv1%2Fstream&sort=queued_bytes",
            lambda v: v.endpoint == "/v1/stream",
            lambda v: (v.queued_bytes, int(v.id)),
        ),
        ("slow=true&sort=-connected_at", lambda v: v.slow, lambda v: -v.connected_at),
        (
            "slow=false&sort=-frames_dropped",
            lambda v: not v.slow,
            lambda v: (-v.frames_dropped, int(v.id)),
        ),
        ("feed=hoops", lambda v: False, lambda v: 0),
    ],
)
async def test_filters_sort_and_pages_that_keep_them(
    tmp_path: Path, query: str, chosen: object, order: object
) -> None:
    assert callable(chosen) and callable(order)
    expected = [v.id for v in sorted(filter(chosen, VIEWS), key=order)]
    async with serving(make_config(tmp_path)) as (client, target):
        for view in VIEWS:
            target.add_subscriber(view)
        ids, totals = await _pages(client, f"/v1/subscribers?{query}&limit=3")
    assert ids == expected  # every one, once, in order, over pages of 3
    assert set(totals) == {len(expected)}


async def test_bad_queries_are_400_with_the_parameter(tmp_path: Path) -> None:
    async with serving(make_config(tmp_path)) as (client, _):
        for query, name in [
            ("sort=peer", "query.sort"),
            ("slow=yes", "query.slow"),
            ("sort=-queued_bytes&after=1&after_value=x", "query.after_value"),
            ("sort=queued_bytes&after=1&after_value=inf", "query.after_value"),
        ]:
            reply = await client.get(f"/v1/subscribers?{query}")
            assert reply.status == 400 and name in reply.json()["error"], (query, reply.body)


async def test_the_query_yields_to_the_event_loop() -> None:
    # 10 000 subscribers, filtered: no task step examines more than QUERY_STEP of them.
    examined = 0

    def facts(view: SubscriberView) -> Facts:
        nonlocal examined
        examined += 1
        return Facts(
            view.id,
            view.endpoint,
            view.subscriptions,
            view.queued_bytes,
            view.frames_dropped,
            view.frames_sent,
            view.connected_at,
            view.slow,
        )

    views = [_view(i) for i in range(1, 10_001)]
    watch = StepWatch(lambda: examined)
    trio.lowlevel.add_instrument(watch)
    try:
        page = await run_query(
            views, facts, SubscriberQuery(feed="soccer", sort="queued_bytes", limit=10)
        )
    finally:
        trio.lowlevel.remove_instrument(watch)
    assert examined == 10_000 and page.total == 10_000 and len(page.items) == 10
    assert 0 < watch.worst <= QUERY_STEP


async def test_delete_disconnects_one_with_the_reason_and_counts_it(tmp_path: Path) -> None:
    (tmp_path / "admin").write_text(ADMIN_TOKENS[0] + "\n")
    admin = {"Authorization": f"Bearer {ADMIN_TOKENS[0]}"}
    closes: dict[str, tuple[int, str]] = {}
    with trio.fail_after(60):
        async with simulator_and_gateway(
            tmp_path,
            [("tracking", "fa"), ("tracking", "fb")],
            api={"admin_tokens_file": str(tmp_path / "admin")},
        ) as (_sim, gw):

            async def subscriber(fixture: str, *, task_status: trio.TaskStatus[None]) -> None:
                async with trio_websocket.open_websocket_url(stream_url(gw)) as ws:
                    await ws.send_message(
                        orjson.dumps(
                            {"op": "subscribe", "feed": "tracking", "fixture": fixture}
                        ).decode()
                    )
                    await next_of_type(ws, "subscribed")
                    task_status.started()
                    try:
                        while True:
                            await ws.get_message()
                    except trio_websocket.ConnectionClosed as exc:
                        assert exc.reason is not None
                        closes[fixture] = (exc.reason.code, exc.reason.reason or "")

            async with trio.open_nursery() as nursery:
                await nursery.start(subscriber, "fa")
                await nursery.start(subscriber, "fb")
                status, body = await http_get(http_url(gw, "/v1/subscribers?fixture=fb"), admin)
                assert status == 200
                (victim,) = orjson.loads(body)
                assert victim["subscriptions"] == ["tracking/fb"]
                long_reason = "é" * 150  # more than a close frame holds: cut on a character
                deleted = await trio.to_thread.run_sync(
                    _delete, http_url(gw, f"/v1/subscribers/{victim['id']}"), admin, long_reason
                )
                assert deleted == 204
                await wait_until(lambda: "fb" in closes and len(gw.registry) == 1)
                assert (
                    await trio.to_thread.run_sync(
                        _delete, http_url(gw, f"/v1/subscribers/{victim['id']}"), admin, ""
                    )
                    == 404
                )
                _, metrics = await http_get(http_url(gw, "/metrics"), admin)
                nursery.cancel_scope.cancel()
    code, reason = closes["fb"]
    assert code == CLOSE_DISCONNECTED
    assert reason.startswith(f"{DISCONNECTED_REASON_PREFIX}: éé")
    assert len(reason.encode()) <= MAX_CLOSE_REASON_BYTES
    assert "fa" not in closes  # the other subscriber stays
    assert b"dde_subscribers_disconnected_total 1.0" in metrics


def _delete(url: str, headers: dict[str, str], reason: str) -> int:
    body = orjson.dumps({"reason": reason}) if reason else b""
    req = urllib.request.Request(url, data=body, headers=headers, method="DELETE")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
