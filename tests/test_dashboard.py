"""The dashboard's files and how the control plane serves them (in a browser: see
tests/test_dashboard_browser.py).

Covers: the files are package data found through :mod:`importlib.resources` (what an installed
wheel has), every one of them is matched by the ``package-data`` of pyproject.toml, and
everything the page loads is a relative URL of one of them (no CDN, nothing off-host); ``GET /``
and ``GET /dashboard/<name>`` are open with read tokens configured, with their content types
and headers (CSP, nosniff, no-cache), while the API stays closed, writes stay closed, and no
path that merely starts like a dashboard path gets past the token check; the stream address the
page gets from ``/v1/status`` (same host, wildcard, another address); the page's script knows
every key of ``/v1/status`` the document lists (``degraded`` and ``cluster`` rendered, not
dumped) and classes every fixture state (``degraded`` failing); the role and owner columns are
there and hidden unless a fixture has a role.

Rules: the HTTP tests run the control plane on 127.0.0.1 port 0 under ``trio.fail_after``
(tests/test_controlplane.py's ``serving``).
"""

from __future__ import annotations

import fnmatch
import importlib.resources
import re
import tomllib
from pathlib import Path

import orjson
import pytest
import yaml

from gateway.config import ListenAddress
from gateway.controlplane import (
    CONTENT_SECURITY_POLICY,
    DASHBOARD_FOLDER,
    DASHBOARD_PACKAGE,
    StreamEndpoint,
    load_assets,
)
from gateway.model import FixtureState
from tests.test_controlplane import READ_TOKEN, make_config, serving

ROOT = Path(__file__).resolve().parent.parent
FILES = {"index.html", "app.js", "pitch.js", "client.js", "core.js", "style.css", "favicon.svg"}
# What a page may load: src/href attributes, CSS url(), JS module imports.
_REFERENCES = re.compile(
    r"""(?:\b(?:src|href)=["']([^"']+)["'])|(?:url\(([^)]+)\))|(?:\bfrom\s+["']([^"']+)["'])"""
)


def test_files_are_package_data_found_through_importlib_resources() -> None:
    folder = importlib.resources.files(DASHBOARD_PACKAGE).joinpath(DASHBOARD_FOLDER)
    shipped = {entry.name for entry in folder.iterdir() if entry.is_file()}
    assert shipped == FILES
    assets = load_assets()
    assert set(assets) == FILES
    for name, asset in assets.items():
        assert asset.body == folder.joinpath(name).read_bytes()
    assert assets["index.html"].media_type.startswith("text/html")
    assert assets["app.js"].media_type.startswith("text/javascript")


def test_pyproject_ships_every_file_in_the_wheel() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["gateway"]
    for name in FILES:
        relative = f"controlplane/{DASHBOARD_FOLDER}/{name}"
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative


def test_the_page_loads_only_its_own_files() -> None:
    assets = load_assets()
    for name, asset in assets.items():
        if name == "favicon.svg":
            continue
        text = asset.body.decode()
        for groups in _REFERENCES.findall(text):
            ref = next(g for g in groups if g).strip("'\"")
            assert "//" not in ref and not ref.startswith("/"), (name, ref)
            target = ref.removeprefix("dashboard/").removeprefix("./")
            assert target in assets, (name, ref)
        # No absolute URL anywhere (a CDN, a font service, an analytics snippet).
        assert not re.search(r"https?://", text), name


async def test_served_open_while_the_api_needs_a_token(tmp_path: Path) -> None:
    async with serving(make_config(tmp_path, admin=True, read=True)) as (client, _):
        page = await client.get("/")
        assert page.status == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["cache-control"] == "no-cache"
        assert b'<canvas id="pitch"' in page.body
        assert (await client.request("HEAD", "/")).status == 200
        js = await client.get("/dashboard/app.js")
        assert (js.status, js.headers["content-type"]) == (200, "text/javascript; charset=utf-8")
        css = await client.get("/dashboard/style.css")
        assert css.headers["content-type"] == "text/css; charset=utf-8"
        svg = await client.get("/dashboard/favicon.svg")
        assert svg.headers["content-type"] == "image/svg+xml"
        missing = await client.get("/dashboard/secrets.txt")
        assert missing.status == 404
        assert orjson.loads(missing.body) == {"error": "no such dashboard file"}
        # The data stays behind the token; so do writes and anything else.
        assert (await client.get("/v1/status")).status == 401
        assert (await client.get("/v1/status", token=READ_TOKEN)).status == 200
        assert (await client.request("PUT", "/")).status == 401
        assert (await client.request("DELETE", "/dashboard/app.js")).status == 401
        for sneaky in (
            "/dashboard/../v1/status",
            "/dashboard/%2e%2e/v1/status",
            "/dashboard//v1/status",
            "/dashboard/",
            "/dashboard",
            "//v1/status",
        ):
            reply = await client.get(sneaky)
            assert reply.status == 401, (sneaky, reply)


@pytest.mark.parametrize(
    ("stream", "http_host", "expected_host"),
    [
        ("127.0.0.1:8765", "127.0.0.1", None),  # same address: the page's own host
        ("0.0.0.0:8765", "127.0.0.1", None),  # every address: the page's own host
        ("[::]:8765", "::1", None),
        ("10.1.2.3:8765", "127.0.0.1", "10.1.2.3"),  # elsewhere: that address
    ],
)
def test_stream_endpoint_host(stream: str, http_host: str, expected_host: str | None) -> None:
    endpoint = StreamEndpoint.for_listener(
        ListenAddress.parse(stream), http_host, tls=False, path="/v1/stream"
    )
    assert endpoint == StreamEndpoint(expected_host, 8765, False, "/v1/stream")


def _js_set(name: str) -> set[str]:
    """The strings of ``const NAME = new Set([...])`` in app.js."""
    text = load_assets()["app.js"].body.decode()
    match = re.search(rf"const {name} = new Set\(\[(.*?)\]\);", text, re.DOTALL)
    assert match is not None, name
    return set(re.findall(r'"([^"]+)"', match.group(1)))


def test_the_page_knows_every_status_key_and_state() -> None:
    spec = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())
    documented = set(spec["components"]["schemas"]["Status"]["properties"])
    # Keys the page renders itself; any other (a newer gateway's) is listed as it comes.
    assert _js_set("STATUS_KEYS") == documented
    assert {"degraded", "cluster"} <= documented
    failing, pending = _js_set("FAILING"), _js_set("PENDING")
    assert "degraded" in failing
    # Every state is classed: failing (red), pending (amber), or live / stopped (neither).
    assert failing | pending | {"live", "stopped"} == {s.value for s in FixtureState}
    assert not failing & pending


def test_role_and_owner_columns_only_in_a_cluster() -> None:
    assets = load_assets()
    html = assets["index.html"].body.decode()
    heads = re.findall(r'<th class="cluster-col"[^>]*>([^<]+)</th>', html)
    assert heads == ["role", "owner"]
    css = assets["style.css"].body.decode()
    assert "#fixtures:not(.clustered) .cluster-col { display: none; }" in css
    # app.js sets it when a fixture has a role (seen in a browser: test_dashboard_browser.py).
    assert '"clustered"' in assets["app.js"].body.decode()
