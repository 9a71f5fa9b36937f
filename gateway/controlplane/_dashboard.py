"""The dashboard: a single page served by the control plane, from files shipped in the package.

The files live in ``gateway/controlplane/dashboard/`` (plain HTML, CSS and JavaScript modules:
no build step, nothing fetched from elsewhere) and are package data, read once through
:mod:`importlib.resources` when the app is built, so an installed wheel serves them as a
checkout does. ``GET /`` is the page, ``GET /dashboard/{name}`` its other files. They hold no
data, so they are open even with read tokens configured; the page reads the API with the token
the user gives it (docs/dashboard.md).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Mapping
from typing import Final

import attrs

#: The package and folder the files are read from.
DASHBOARD_PACKAGE: Final = "gateway.controlplane"
DASHBOARD_FOLDER: Final = "dashboard"
#: The URL prefix of the page's files (``/`` serves ``index.html``).
DASHBOARD_PREFIX: Final = "/dashboard/"
INDEX: Final = "index.html"

_MEDIA_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

#: Everything the page loads comes from this origin; only the stream (another port) is a
#: WebSocket elsewhere. Violations show up in the browser console (the browser tests fail).
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
_HEADERS: Final = {
    # Served from memory and small: always revalidate, so an upgrade shows at once.
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "content-security-policy": CONTENT_SECURITY_POLICY,
}


@attrs.frozen
class Asset:
    body: bytes
    media_type: str


def load_assets() -> dict[str, Asset]:
    """Every file of the dashboard folder by name (read now, kept in memory)."""
    folder = importlib.resources.files(DASHBOARD_PACKAGE).joinpath(DASHBOARD_FOLDER)
    assets: dict[str, Asset] = {}
    for entry in folder.iterdir():
        suffix = entry.name[entry.name.rfind(".") :] if "." in entry.name else ""
        media_type = _MEDIA_TYPES.get(suffix)
        if media_type is None or not entry.is_file():
            continue
        assets[entry.name] = Asset(entry.read_bytes(), media_type)
    if INDEX not in assets:
        raise RuntimeError(f"the dashboard's {INDEX} is missing from the package")
    return assets


def asset_headers() -> Mapping[str, str]:
    return dict(_HEADERS)
