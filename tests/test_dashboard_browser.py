"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``) driven by playwright.

Covers, against a whole gateway following the simulator: the page loads with no console error
and no request to any host but 127.0.0.1; a row per configured fixture (``data-fixture``); the
pitch canvas of a tracking fixture changes between two screenshots a second apart (frames
arrive over ``/v1/stream`` with ``max_rate``, and the gateway counts what it conflated); a
fastpath fixture shows its score and actions; a fixture the simulator puts into a failure
state (removed: ``not_found``) shows that state within 2 s of the gateway knowing it; on this
single node the role and owner columns stay hidden. With read tokens and subscriber tokens
configured: the page asks for a token, then reads the API with it (Bearer) and the stream with
the other one (``dde.bearer.<token>`` subprotocol), and no token ever appears in a URL. A
cluster instance (the control plane over ``MemoryTarget`` with a degraded cluster view): the
role and owner columns, a ``degraded`` fixture marked failing, the instance's name, state and
reason in the instance panel. Across a restart of the gateway (same addresses, a recorder) the
fastpath view's stream (the JS client) resumes: no action listed twice.

Chromium is never downloaded: ``executable_path`` is Debian's ``/usr/bin/chromium`` (``.ci/test``
installs it when missing, as root). Without it these tests fail in CI (``CI=true``) and skip
elsewhere, saying why. One browser per module, started once; it lives in a thread of its own
(playwright's sync API is bound to the thread that started it), while the gateway runs on the
test's trio loop. Screenshots are saved in ``test-artifacts/`` (or ``$DDE_TEST_ARTIFACTS``).

Rules: real sockets on 127.0.0.1 port 0, real time, ``trio.fail_after`` on every test; the
browser waits on what the page shows (playwright's waits have deadlines), never a guessed
sleep - except the one second between the two pitch screenshots, which is the point.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import pytest
import trio
import trio_websocket

from gateway.dataplane import SubscriberView
from gateway.model import FixtureState
from gateway.service import Gateway
from gateway.simulator import Simulator
from tests.conftest import TEST_TOKEN
from tests.kit import (
    gateway_config,
    http_url,
    running_gateway,
    simulator_and_gateway,
    stream_url,
    wait_until,
)
from tests.memory_target import MemoryTarget
from tests.test_controlplane import make_config, sample_cluster, serving

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("DDE_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("DDE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
#: playwright's own deadline for each wait (the trio deadline of each test is above it).
WAIT_MS = 20_000

FX1 = "5501b26a-1c44-4c3b-9ff5-9322084d41f9"
FX2 = "08456e52-9cf7-48cc-913c-f45ec0a1b2c3"
FXA = "2ed1cba1-7c3e-4b5e-9a51-0d1f1c2b3a4d"
FIXTURES = [("tracking", FX1), ("tracking", FX2), ("actions", FXA)]

T = TypeVar("T")


def _unavailable() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401, PLC0415 - only to ask whether it is there
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/test does it as root)"
    return None


class BrowserThread:
    """Headless Chromium in a thread of its own; :meth:`run` calls a function there."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[Browser], Any], Future[Any]] | None] = queue.Queue()
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._main, name="chromium", daemon=True)
        self._thread.start()
        self._ready.result(timeout=60)

    def _main(self) -> None:
        from playwright.sync_api import sync_playwright  # noqa: PLC0415 - optional

        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
                self._ready.set_result(None)
                while (job := self._jobs.get()) is not None:
                    fn, future = job
                    try:
                        future.set_result(fn(browser))
                    except BaseException as exc:
                        future.set_exception(exc)
                browser.close()
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
            raise

    def call(self, fn: Callable[[Browser], T]) -> T:
        future: Future[T] = Future()
        self._jobs.put((fn, future))
        return future.result()

    async def run(self, fn: Callable[[Browser], T]) -> T:
        """Run *fn* in the browser's thread while the trio loop (the gateway) keeps going."""
        return await trio.to_thread.run_sync(self.call, fn, abandon_on_cancel=True)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)


@pytest.fixture(scope="module")
def chromium() -> Iterator[BrowserThread]:
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run in CI: {reason}")
        pytest.skip(reason)
    started = time.monotonic()
    browser = BrowserThread()
    print(f"chromium started in {time.monotonic() - started:.1f} s")
    try:
        yield browser
    finally:
        browser.close()


class Session:
    """One page with everything it logged and requested (filled in the browser's thread)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.urls: list[str] = []
        page.set_default_timeout(WAIT_MS)
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("request", lambda r: self.urls.append(r.url))
        page.on("websocket", lambda ws: self.urls.append(ws.url))

    def off_host(self) -> list[str]:
        return [u for u in self.urls if urllib.parse.urlsplit(u).hostname != "127.0.0.1"]


def _save(name: str, data: bytes) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / name).write_bytes(data)


def _open(browser: Browser, url: str) -> Session:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    session = Session(context.new_page())
    session.page.goto(url)
    return session


# Waits go through locators: a string predicate (wait_for_function) is an eval, which the
# page's Content-Security-Policy refuses - as it should.


def _rows(page: Page, n: int) -> list[tuple[str, str]]:
    from playwright.sync_api import expect  # noqa: PLC0415 - optional

    rows = page.locator("#fixtures tbody tr")
    expect(rows).to_have_count(n, timeout=WAIT_MS)
    return [
        (
            rows.nth(i).get_attribute("data-feed") or "",
            rows.nth(i).get_attribute("data-fixture") or "",
        )
        for i in range(n)
    ]


def _open_tracking(page: Page, fixture: str) -> None:
    from playwright.sync_api import expect  # noqa: PLC0415 - optional

    page.locator(f'#fixtures tr[data-fixture="{fixture}"]').click()
    # The view is open and frames are drawn: the info line counts them once one arrived.
    expect(page.locator("#pitch")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#fv-info")).to_contain_text("drawn", timeout=WAIT_MS)


def _fastpath_shown(page: Page) -> None:
    from playwright.sync_api import expect  # noqa: PLC0415 - optional

    expect(page.locator("#score")).to_contain_text(":", timeout=WAIT_MS)
    page.locator("#actions li").first.wait_for()


def _two_pitch_shots(page: Page, prefix: str) -> tuple[bytes, bytes]:
    pitch = page.locator("#pitch")
    first = pitch.screenshot()
    page.wait_for_timeout(1000)  # the requirement: two screenshots a second apart
    second = pitch.screenshot()
    _save(f"{prefix}-pitch-1.png", first)
    _save(f"{prefix}-pitch-2.png", second)
    return first, second


def _readme_shot(page: Page) -> bytes:
    page.set_viewport_size({"width": 1280, "height": 720})
    shot = page.screenshot()
    page.set_viewport_size({"width": 1400, "height": 1000})
    return shot


async def _drain(ws: trio_websocket.WebSocketConnection) -> None:
    while True:
        await ws.get_message()


async def _state(gw: Gateway, fixture: str, state: FixtureState) -> None:
    def check() -> bool:
        view = gw.fixture_view("tracking", fixture)
        return view is not None and view.state is state

    await wait_until(check, timeout=30)


async def test_dashboard_fixtures_pitch_actions_and_a_failure(
    tmp_path: Path, chromium: BrowserThread
) -> None:
    with trio.fail_after(90):
        async with simulator_and_gateway(tmp_path, FIXTURES, rate_hz=25.0) as (sim, gw):
            for fixture in (FX1, FX2):
                await _state(gw, fixture, FixtureState.LIVE)
            url = http_url(gw, "/")
            session = await chromium.run(lambda b: _open(b, url))
            page = session.page
            rows = await chromium.run(lambda b: _rows(page, 3))
            assert sorted(rows) == sorted(FIXTURES)
            # A single node: no role or owner column.
            assert await chromium.run(lambda b: page.locator("th.cluster-col").first.is_hidden())

            # The pitch: frames over /v1/stream with max_rate, drawn as they come.
            await chromium.run(lambda b: _open_tracking(page, FX1))
            first, second = await chromium.run(lambda b: _two_pitch_shots(page, "open"))
            assert first != second, "the pitch did not change in a second"
            await wait_until(lambda: any(v.conflated > 0 for v in gw.registry.views()))
            _save("dashboard-tracking.png", await chromium.run(lambda b: page.screenshot()))

            # A subscriber with a write delay, written with its batch group: the delay column.
            url = stream_url(gw, "/v1/stream?write_delay=5")
            request = orjson.dumps({"op": "subscribe", "feed": "tracking", "fixture": FX1})
            async with (
                trio_websocket.open_websocket_url(url) as ws,
                trio.open_nursery() as readers,
            ):
                readers.start_soon(_drain, ws)  # it keeps up: it stays in its group
                await ws.send_message(request.decode())
                await wait_until(lambda: any(v.batched for v in gw.registry.views()), timeout=30)
                delay = await chromium.run(
                    lambda b: page.locator(
                        '#subscribers tr[data-batched="true"] td.delay'
                    ).first.inner_text(timeout=5000)
                )
                assert delay == "5 ms, shared"
                readers.cancel_scope.cancel()

            # A failure the simulator causes: the fixture disappears upstream (not_found).
            sim.remove_fixture(FX2)
            await _state(gw, FX2, FixtureState.NOT_FOUND)
            started = trio.current_time()
            await chromium.run(
                lambda b: page.wait_for_selector(
                    f'#fixtures tr.failing[data-fixture="{FX2}"][data-state="not_found"]',
                    timeout=2000,
                )
            )
            shown_after = trio.current_time() - started
            print(f"not_found shown {shown_after:.2f} s after the gateway knew it")
            failing = await chromium.run(
                lambda b: page.locator(".card.bad .label").all_inner_texts()
            )
            assert "fixtures failing" in failing
            _save("dashboard-failing.png", await chromium.run(lambda b: page.screenshot()))
            # What docs/img/dashboard.png is made from: the fold of a smaller window.
            _save("dashboard.png", await chromium.run(lambda b: _readme_shot(page)))

            # A fastpath fixture: the score and the latest actions.
            await chromium.run(
                lambda b: page.locator(f'#fixtures tr[data-fixture="{FXA}"]').click()
            )
            await chromium.run(lambda b: _fastpath_shown(page))
            assert await chromium.run(lambda b: page.locator("#fv-tracking").is_hidden())
            _save("dashboard-fastpath.png", await chromium.run(lambda b: page.screenshot()))
            await chromium.run(lambda b: page.context.close())
    assert session.errors == []
    assert session.off_host() == []
    assert any(u.startswith("ws://127.0.0.1:") for u in session.urls)  # the stream


async def test_dashboard_with_api_and_subscriber_tokens(
    tmp_path: Path, chromium: BrowserThread
) -> None:
    api_token = "read-dashboard-7d1e"
    stream_token = "stream-dashboard-4b2a"
    (tmp_path / "read").write_text(api_token + "\n")
    (tmp_path / "subscribers").write_text(stream_token + " tracking\n")
    with trio.fail_after(90):
        async with simulator_and_gateway(
            tmp_path,
            FIXTURES[:2],
            rate_hz=25.0,
            api={"read_tokens_file": str(tmp_path / "read")},
            subscribers={"tokens_file": str(tmp_path / "subscribers")},
        ) as (_, gw):
            await _state(gw, FX1, FixtureState.LIVE)
            url = http_url(gw, "/")
            session = await chromium.run(lambda b: _open(b, url))
            page = session.page

            def give_tokens(b: Browser) -> None:
                page.wait_for_selector("#api-state:text('token required')")
                # The one refused request so far: /v1/status, before the token was given.
                assert len(session.errors) == 1 and "401" in session.errors[0]
                session.errors.clear()
                page.fill("#api-token", api_token)
                page.fill("#stream-token", stream_token)
                page.click("#token-form button[type=submit]")

            await chromium.run(give_tokens)
            rows = await chromium.run(lambda b: _rows(page, 2))
            assert sorted(rows) == sorted(FIXTURES[:2])
            kept = await chromium.run(
                lambda b: page.evaluate("Object.values(sessionStorage).sort()")
            )
            assert kept == sorted([api_token, stream_token])
            # The stream authenticates with the subscriber token (dde.bearer subprotocol).
            await chromium.run(lambda b: _open_tracking(page, FX1))
            first, second = await chromium.run(lambda b: _two_pitch_shots(page, "tokens"))
            assert first != second
            assert gw.auth.failures["stream"] == 0
            await chromium.run(lambda b: page.context.close())
    assert session.errors == []
    assert session.off_host() == []
    for u in session.urls:
        assert api_token not in u and stream_token not in u


def _cluster_shown(page: Page, reason: str) -> dict[str, list[str]]:
    from playwright.sync_api import expect  # noqa: PLC0415 - optional

    degraded = page.locator('#fixtures tr.failing[data-state="degraded"][data-role="relay"]')
    expect(degraded).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator("#instance-info dd.bad")).to_have_text(
        f"gw-a · degraded: {reason}", timeout=WAIT_MS
    )
    expect(page.locator("th.cluster-col").first).to_be_visible()
    return {
        fixture: page.locator(
            f'#fixtures tr[data-fixture="{fixture}"] td.cluster-col'
        ).all_inner_texts()
        for fixture in ("123", "124")
    } | {
        "failing": page.locator(".card.bad .label").all_inner_texts(),
        "header": [page.locator("#instance").inner_text()],
    }


async def test_dashboard_of_a_cluster_instance(tmp_path: Path, chromium: BrowserThread) -> None:
    reason = "cluster: redis unreachable: Connection refused"
    config = make_config(tmp_path, cluster=True)
    target = MemoryTarget(config, version="9.9.9")
    target.cluster = sample_cluster(reason)
    target.degraded = reason
    target.follow("soccer", "124", 0)
    target.set_state("soccer", "123", FixtureState.LIVE)
    target.set_role("soccer", "123", owner="gw-a", role="owner")
    target.set_state("soccer", "124", FixtureState.DEGRADED, "cluster: redis unreachable")
    target.set_role("soccer", "124", owner=None, role="relay")
    with trio.fail_after(90):
        async with serving(config, target) as (client, _):
            assert (await client.get("/v1/status")).json()["degraded"] == reason
            url = f"http://{client.address}/"
            session = await chromium.run(lambda b: _open(b, url))
            page = session.page
            shown = await chromium.run(lambda b: _cluster_shown(page, reason))
            _save("dashboard-cluster.png", await chromium.run(lambda b: page.screenshot()))
            await chromium.run(lambda b: page.context.close())
    assert shown["123"] == ["owner", "gw-a"]
    assert shown["124"] == ["relay", "none"]  # the lease is free
    assert "fixtures failing" in shown["failing"]
    assert shown["header"][0].startswith("v9.9.9 · gw-a · up ")
    assert session.errors == []
    assert session.off_host() == []


def _actions_shown(page: Page) -> int:
    return page.locator("#actions li").count()


async def test_the_fastpath_view_resumes_across_a_restart_without_repeating_actions(
    tmp_path: Path, chromium: BrowserThread
) -> None:
    """The view's stream (the JS client) resumes with after + epoch when the gateway restarts
    (same addresses, a recorder): the actions already shown are not added again - a view that
    subscribed with its backfill again listed them twice - and the new ones follow. The page
    shows at most one line per frame the topic has (its seq), never more."""
    token_file = tmp_path / "token"
    token_file.write_text(TEST_TOKEN)
    sim = Simulator(tokens={TEST_TOKEN}, rate_hz=25.0, heartbeat_interval=1.0, action_interval=0.5)
    sim.add_fixture(FXA, kind="fastpath")
    sections: dict[str, Any] = {"recorder": {"dir": str(tmp_path / "rec")}}
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(sim.serve, "127.0.0.1", 0)
            first = gateway_config(port, token_file, [FIXTURES[2]], **sections)
            async with running_gateway(first) as gw:
                assert gw.bound is not None
                ports = {"stream_listen": str(gw.bound.stream), "http_listen": str(gw.bound.http)}
                session = await chromium.run(lambda b: _open(b, http_url(gw, "/")))
                page = session.page
                await chromium.run(lambda b: _rows(page, 1))
                row = page.locator(f'#fixtures tr[data-fixture="{FXA}"]')
                await chromium.run(lambda b: row.click())
                await chromium.run(lambda b: _fastpath_shown(page))
                await chromium.run(lambda b: page.locator("#actions li").nth(2).wait_for())
                await gw.drain()
            before = await chromium.run(lambda b: _actions_shown(page))
            again = gateway_config(port, token_file, [FIXTURES[2]], gateway=ports, **sections)
            async with running_gateway(again) as gw:
                more = page.locator("#actions li").nth(before + 3)
                await chromium.run(lambda b: more.wait_for())
                shown = await chromium.run(lambda b: _actions_shown(page))
                topic = gw.hub.get("actions", FXA)
                assert topic is not None
                published = topic.seq  # read after the page: the page can only lag behind it
                await chromium.run(lambda b: page.context.close())
            nursery.cancel_scope.cancel()
    # Under 30 frames in all, a second backfill of 30 would have listed every one of them
    # again (the list keeps 30): the page would show more lines than there are frames.
    assert before >= 3 and published < 30, (before, published)
    assert before + 3 < shown <= published, (before, shown, published)
    # Chromium's line for each connection refused while the gateway restarted; nothing else.
    assert [e for e in session.errors if "ERR_CONNECTION_REFUSED" not in e] == []


def _subscriber_rows(page: Page, count_text: str) -> list[str]:
    """The subscriber ids shown once the panel's count reads *count_text*."""
    page.wait_for_function(
        "t => document.querySelector('#subscribers-count').textContent === t",
        arg=count_text,
        timeout=WAIT_MS,
    )
    return [
        str(page.locator("#subscribers tbody tr").nth(i).get_attribute("data-subscriber"))
        for i in range(page.locator("#subscribers tbody tr").count())
    ]


async def test_dashboard_pages_and_filters_the_subscribers(
    tmp_path: Path, chromium: BrowserThread
) -> None:
    # 130 subscribers: more than a page (100). Every third on fixture 1; every fifth slow.
    config = make_config(tmp_path)
    target = MemoryTarget(config, version="9.9.9")
    views = [
        SubscriberView(
            id=str(i),
            peer=f"10.0.0.{i % 250}:4000",
            endpoint="/v1/stream",
            subscriptions=(f"soccer/{i % 3}",),
            queued_bytes=(i * 37) % 1009,
            frames_sent=i,
            frames_dropped=0,
            connected_at=1000.0 + i,
            slow=i % 5 == 0,
        )
        for i in range(1, 131)
    ]
    for view in views:
        target.add_subscriber(view)
    by_queued = [v.id for v in sorted(views, key=lambda v: (-v.queued_bytes, int(v.id)))]
    with trio.fail_after(90):
        async with serving(config, target) as (client, _):
            assert (await client.get("/v1/subscribers?limit=1")).status == 200
            session = await chromium.run(lambda b: _open(b, f"http://{client.address}/"))
            page = session.page
            first = await chromium.run(lambda b: _subscriber_rows(page, "(130, 1-100 shown)"))
            await chromium.run(lambda b: page.locator("#sf-next").click())
            second = await chromium.run(lambda b: _subscriber_rows(page, "(130, 101-130 shown)"))
            await chromium.run(lambda b: page.locator("#sf-prev").click())
            again = await chromium.run(lambda b: _subscriber_rows(page, "(130, 1-100 shown)"))

            def filter_fixture_1(b: Browser) -> list[str]:
                page.locator("#sf-fixture").fill("1")
                page.locator("#sf-fixture").press("Tab")  # change: back to the first page
                return _subscriber_rows(page, "(44, 1-44 shown)")

            fixture_1 = await chromium.run(filter_fixture_1)

            def slow_only(b: Browser) -> list[str]:
                page.locator("#sf-slow").check()
                return _subscriber_rows(page, "(9, 1-9 shown)")

            slow_1 = await chromium.run(slow_only)
            slow_marked = await chromium.run(
                lambda b: page.locator("#subscribers tbody tr.slow").count()
            )
            _save("dashboard-subscribers.png", await chromium.run(lambda b: page.screenshot()))
            await chromium.run(lambda b: page.context.close())
    # Pages in the gateway's order (most queued first), each subscriber once.
    assert first + second == by_queued and again == first
    assert fixture_1 == [
        v.id
        for v in sorted(views, key=lambda v: (-v.queued_bytes, int(v.id)))
        if v.subscriptions == ("soccer/1",)
    ]
    assert sorted(slow_1, key=int) == [
        v.id for v in views if v.subscriptions == ("soccer/1",) and v.slow
    ]
    assert slow_marked == len(slow_1)
    assert session.errors == []
    assert session.off_host() == []
