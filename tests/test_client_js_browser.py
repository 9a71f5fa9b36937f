"""The JavaScript client in a browser: headless Chromium (Debian's ``chromium``, playwright).

One run of the conformance promise where it matters most for a browser (whose WebSocket cannot
set headers or stop reading): a page imports clients/js and subscribes with the browser's own
WebSocket to a real gateway with a recorder, following the simulator. The page and clients/js
come from a static HTTP server of the checkout on 127.0.0.1 port 0. The simulator drops the
gateway's upstream connection (frames go on: no event but frames), then the gateway restarts on
the same address: the page's client reconnects and resumes with ``after`` + ``epoch``,
``recovered: true``. Asserted on the events the page collected: every frame once, in order, no
``loss``, the state changes, and no console error but Chromium's own line for each connection
refused while the gateway restarted.

Browser set-up as tests/test_dashboard_browser.py (its ``chromium`` fixture: never a downloaded
browser; fails in CI without it, skips elsewhere); the gateway as the conformance suite's
``site`` (tests/test_client_conformance.py). Hard deadlines everywhere; waits on what the page
collected (playwright's ``wait_for_function`` with a deadline), never a guessed sleep.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from tests.clients_kit import contiguous, frame_problems, seqs
from tests.kit import wait_until
from tests.test_client_conformance import FX, site
from tests.test_dashboard_browser import WAIT_MS, BrowserThread, chromium  # noqa: F401

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.slow

JS = Path(__file__).resolve().parent.parent / "clients" / "js"
PAGE = """<!doctype html><meta charset="utf-8"><title>client</title><link rel="icon" href="data:,">
<script type="module">
import { Client } from "./index.js";
const url = new URLSearchParams(location.search).get("stream");
window.events = [];
window.client = new Client(url, { onEvent: (e) => window.events.push(e) });
window.client.subscribe("tracking", "%s", { backfill: 0 });
</script>
"""


class _Files(http.server.SimpleHTTPRequestHandler):
    """clients/js as it is in the checkout, and the test's page."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, directory=str(JS), **kwargs)

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/page.html":
            super().do_GET()
            return
        body = (PAGE % FX).encode()
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet


@contextmanager
def serving_clients_js() -> Iterator[str]:
    """A static HTTP server of clients/js on 127.0.0.1 port 0 (a page from a real local
    address: Chromium's local network access checks let it open a WebSocket to 127.0.0.1)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=server.serve_forever, name="clients-js", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class PageRun:
    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        page.set_default_timeout(WAIT_MS)
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))


def _open(browser: Browser, origin: str, stream: str) -> PageRun:
    run = PageRun(browser.new_context().new_page())
    run.page.goto(f"{origin}/page.html?stream={stream}")
    return run


def _frames(page: Page) -> int:
    count: int = page.evaluate("window.events.filter((e) => e.event === 'frame').length")
    return count


def _wait_frames(page: Page, n: int) -> None:
    from playwright.sync_api import TimeoutError  # noqa: PLC0415 - optional

    try:
        page.wait_for_function(
            f"window.events.filter((e) => e.event === 'frame').length >= {n}", timeout=WAIT_MS
        )
    except TimeoutError:
        seen = page.evaluate("JSON.stringify((window.events || []).slice(-8))")
        raise AssertionError(f"not {n} frames; the last events: {seen}") from None


def _events(page: Page) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = page.evaluate("window.client.close(), window.events")
    return events


async def test_the_client_in_chromium_resumes_recovered(
    tmp_path: Path,
    chromium: BrowserThread,  # noqa: F811 - the fixture of tests/test_dashboard_browser.py
) -> None:
    with trio.fail_after(90), serving_clients_js() as origin:
        async with site(tmp_path, recorder={"dir": str(tmp_path / "rec")}) as s:
            async with s.gateway():
                url = s.url
                run = await chromium.run(lambda b: _open(b, origin, url))
                page = run.page
                await chromium.run(lambda b: _wait_frames(page, 10))
                # The vendor drops the gateway's connection: frames go on, nothing to tell.
                s.sim.faults(FX).drop_after_frames = 15
                start = len(s.sim.attempts)
                await wait_until(
                    lambda: sum(a.fixture_id == FX for a in s.sim.attempts[start:]) >= 2, 30
                )
                s.sim.faults(FX).drop_after_frames = None
                before = await chromium.run(lambda b: _frames(page))
                await chromium.run(lambda b: _wait_frames(page, before + 10))
            # Drained (1001 going away) and restarted on the same address, same recording.
            async with s.gateway():
                before = await chromium.run(lambda b: _frames(page))
                await chromium.run(lambda b: _wait_frames(page, before + 30))
                events = await chromium.run(lambda b: _events(page))
            await chromium.run(lambda b: page.context.close())
    # Chromium logs every WebSocket it could not open (the gateway was restarting): nothing else.
    refused = f"WebSocket connection to '{url}' failed: Error in connection establishment: "
    assert [e for e in run.errors if not e.startswith(refused)] == []
    assert frame_problems(events, FX) == []
    assert contiguous(seqs(events, FX)) == []
    assert [e for e in events if e["event"] == "loss"] == []
    subscribed = [(e["resumed"], e["recovered"]) for e in events if e["event"] == "subscribed"]
    assert subscribed == [(False, False), (True, True)]
    states = [e["state"] for e in events if e["event"] == "state"]
    assert states[:2] == ["connecting", "connected"]
    assert "disconnected" in states and states[-1] == "closed"
    drops = [e["reason"] for e in events if e["event"] == "state" and e["state"] == "disconnected"]
    assert drops[0].startswith("closed 1001"), drops
