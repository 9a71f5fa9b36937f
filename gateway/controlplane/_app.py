"""The ASGI application: routes, JSON bodies and errors, over a :class:`ControlTarget`.

Every handler is ``async def`` on purpose: Starlette runs plain ``def`` endpoints in a worker
thread, and the facade is not thread-safe (it reads the data path's live state). Handlers call
the facade synchronously and never await while holding its data, so a response is a consistent
snapshot.

Errors are ``{"error": "<message>"}`` with the proper status, including the router's own 404 and
405. A facade exception becomes a 500 with a generic message (the details go to the
``gateway.http`` log, through hypercorn's error logger), never a traceback to the client.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Protocol, TypeVar
from urllib.parse import quote

import orjson
import trio
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.config import ApiSection
from gateway.controlplane._auth import ApiTokens, BearerAuthMiddleware
from gateway.controlplane._dashboard import INDEX, asset_headers, load_assets
from gateway.controlplane._downloads import DownloadResponse, DownloadSlots
from gateway.controlplane._metrics import make_registry
from gateway.controlplane._process import ProcessMetrics
from gateway.controlplane._rates import RateSampler
from gateway.controlplane._target import (
    CLUSTER_COUNTERS,
    CLUSTER_INFO_KEYS,
    ClusterView,
    ControlTarget,
    FixtureView,
    FollowLimitError,
    RecordingView,
    StreamEndpoint,
)
from gateway.dataplane import CursorGone, SubscriberQuery, SubscriberView
from gateway.errors import BadRequest
from gateway.hub import FIXTURE_ID_PATTERN, UnknownFeedError, valid_fixture_id
from gateway.model import FixtureState, snapshot_keys

logger = logging.getLogger("gateway.http")

DEFAULT_FOLLOW_BACKFILL: Final = 0  # live only, as for a configured fixture without backfill
MAX_BODY_BYTES: Final = 4096
#: Longest ``reason`` of ``DELETE /v1/subscribers/{id}`` (the close frame takes the first bytes).
MAX_DISCONNECT_REASON: Final = 200
_CONTROL_CHAR: Final = re.compile("[\x00-\x1f\x7f-\x9f]")
#: Seconds a client has to send a whole request body; a slower one is answered 408.
BODY_TIMEOUT: Final = 10.0
#: The keys of a fixture's ``upstream`` object: every upstream counter, defined once.
UPSTREAM_KEYS: Final = snapshot_keys()
#: ``GET /v1/cluster`` on a single node.
NOT_A_CLUSTER: Final = "not a cluster: no [cluster] section"
#: ``?limit=`` of the list routes (``/v1/subscribers``, ``/v1/fixtures``, ``/v1/recordings``):
#: items per answer by default and at most.
DEFAULT_PAGE_LIMIT: Final = 1000
MAX_PAGE_LIMIT: Final = 1000
#: Items a list answer renders between two checkpoints: other tasks (subscribers' frames, other
#: requests) run in between, so no request holds the event loop for a whole page.
RENDER_STEP: Final = 100

_T = TypeVar("_T")


class _OfFixture(Protocol):
    @property
    def feed(self) -> str: ...
    @property
    def fixture(self) -> str: ...


_F = TypeVar("_F", bound=_OfFixture)


class JSONResponse(Response):
    """A JSON response encoded by orjson (enums and str subclasses serialise as their value)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _describe(value: object) -> str:
    """A short type name for error messages; never the value itself (it could be anything)."""
    return "null" if value is None else type(value).__name__


def parse_follow_body(body: bytes) -> int:
    """The ``backfill`` of a ``PUT /v1/fixtures/...`` body; empty means the default.

    Strict: an object with at most the key ``backfill``, an integer >= -1 (booleans and floats
    are not integers here). Raises :class:`BadRequest` with the field path.
    """
    if not body.strip():
        return DEFAULT_FOLLOW_BACKFILL
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("$: body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest(f"$: expected an object, got {_describe(data)}")
    for key in sorted(data):
        if key != "backfill":
            raise BadRequest(f"$.{key}: unknown key (allowed: backfill)")
    backfill = data.get("backfill", DEFAULT_FOLLOW_BACKFILL)
    if type(backfill) is not int:
        raise BadRequest(f"$.backfill: expected an integer, got {_describe(backfill)}")
    if backfill < -1:
        raise BadRequest("$.backfill: must be >= -1 (-1 = all, 0 = live only, n = last n)")
    return backfill


def parse_disconnect_body(body: bytes) -> str:
    """The ``reason`` of a ``DELETE /v1/subscribers/{id}`` body; empty means none.

    Strict: an object with at most the key ``reason``, a string of at most
    :data:`MAX_DISCONNECT_REASON` characters and no control character (it goes into a close
    frame and a log line). Raises :class:`BadRequest`.
    """
    if not body.strip():
        return ""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("$: body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest(f"$: expected an object, got {_describe(data)}")
    for key in sorted(data):
        if key != "reason":
            raise BadRequest(f"$.{key}: unknown key (allowed: reason)")
    reason = data.get("reason", "")
    if not isinstance(reason, str):
        raise BadRequest(f"$.reason: expected a string, got {_describe(reason)}")
    if len(reason) > MAX_DISCONNECT_REASON or _CONTROL_CHAR.search(reason):
        raise BadRequest(f"$.reason: at most {MAX_DISCONNECT_REASON} characters, no control ones")
    return reason


def _subscriber_query(request: Request, limit: int) -> tuple[SubscriberQuery, dict[str, str]]:
    """The filters and order of ``GET /v1/subscribers``, and the query parameters a next
    page's link repeats."""
    params = request.query_params
    kept: dict[str, str] = {}

    def text(name: str) -> str | None:
        values = params.getlist(name)
        if not values:
            return None
        kept[name] = values[-1]
        return values[-1]

    after_value: float | None = None
    value_text = params.getlist("after_value")
    if value_text:
        try:
            after_value = float(value_text[-1])
        except ValueError:
            raise BadRequest("query.after_value: must be a number") from None
    slow_text = text("slow")
    if slow_text not in (None, "true", "false"):
        raise BadRequest("query.slow: must be true or false")
    sort = text("sort") or "id"
    query = SubscriberQuery(
        feed=text("feed"),
        fixture=text("fixture"),
        endpoint=text("endpoint"),
        slow=None if slow_text is None else slow_text == "true",
        sort=sort.removeprefix("-"),
        descending=sort.startswith("-"),
        after=_query_after(request),
        after_value=after_value,
        limit=limit,
    )
    try:
        query.check()
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    return query, kept


def recording_json(view: RecordingView) -> dict[str, Any]:
    return {
        "feed": view.feed,
        "fixture": view.fixture,
        "state": view.state,
        "reason": view.reason,
        "epoch": view.epoch,
        "first_seq": view.first_seq,
        "last_seq": view.last_seq,
        "durable_seq": view.durable_seq,
        "first_time": view.first_time,
        "last_time": view.last_time,
        "bytes": view.bytes,
        "frames_dropped": view.frames_dropped,
    }


def _query_int(request: Request, name: str, minimum: int, maximum: int | None = None) -> int | None:
    """An optional integer query parameter (digits only), at least *minimum* (and at most
    *maximum*)."""
    values = request.query_params.getlist(name)
    if not values:
        return None
    text = values[-1]
    try:
        value = int(text) if text.isascii() and text.isdigit() else -1
    except ValueError:  # more digits than int() takes
        value = -1
    if maximum is not None and not minimum <= value <= maximum:
        raise BadRequest(f"query.{name}: must be an integer from {minimum} to {maximum}")
    if value < minimum:
        raise BadRequest(f"query.{name}: must be an integer >= {minimum}")
    return value


def _page_limit(request: Request) -> int:
    """``?limit=`` of a list route: 1 to :data:`MAX_PAGE_LIMIT`, default
    :data:`DEFAULT_PAGE_LIMIT`."""
    limit = _query_int(request, "limit", 1, MAX_PAGE_LIMIT)
    return DEFAULT_PAGE_LIMIT if limit is None else limit


def _query_after(request: Request) -> str | None:
    values = request.query_params.getlist("after")
    return values[-1] if values else None


def _fixture_cursor(request: Request) -> tuple[str, str] | None:
    """``?after=FEED/FIXTURE`` of ``/v1/fixtures`` and ``/v1/recordings``."""
    after = _query_after(request)
    if after is None:
        return None
    feed, sep, fixture = after.partition("/")
    if not sep:
        raise BadRequest("query.after: must be FEED/FIXTURE (the last item of the previous page)")
    return feed, fixture


async def render_list(items: Sequence[_T], render: Callable[[_T], dict[str, Any]]) -> bytes:
    """The JSON array of *items* rendered by *render*, :data:`RENDER_STEP` items at a time
    with a checkpoint between steps."""
    parts: list[bytes] = []
    for start in range(0, len(items), RENDER_STEP):
        if start:
            await trio.lowlevel.checkpoint()
        step = orjson.dumps([render(item) for item in items[start : start + RENDER_STEP]])
        parts.append(step[1:-1])
    return b"[" + b",".join(parts) + b"]"


def page_response(
    body: bytes,
    total: int,
    next_after: str | None,
    route: str,
    limit: int,
    *,
    keep: Mapping[str, str] | None = None,
) -> Response:
    """A page of a list route: the JSON array, ``X-Total-Count`` (every item, all pages) and,
    when there are more, a ``Link`` with ``rel="next"`` relative to the route (so it also
    resolves behind a proxy that serves the API under a sub-path), repeating the query
    parameters in *keep* (filters, order)."""
    headers = {"x-total-count": str(total)}
    if next_after is not None:
        query = "".join(f"{k}={quote(v, safe='')}&" for k, v in (keep or {}).items())
        query += f"after={quote(next_after, safe='')}&limit={limit}"
        headers["link"] = f'<{route}?{query}>; rel="next"'
    return Response(body, media_type="application/json", headers=headers)


def fixture_json(view: FixtureView, kind: str) -> dict[str, Any]:
    """Exactly the documented keys, whatever else the facade's view carries. *kind*: the
    feed's kind (``tracking`` or ``fastpath``)."""
    recording = view.recording
    return {
        "feed": view.feed,
        "kind": kind,
        "fixture": view.fixture,
        "state": FixtureState(view.state).value,
        "state_since": view.state_since,
        "detail": view.detail,
        "seq": view.seq,
        "epoch": view.epoch,
        "subscribers": view.subscribers,
        "frames_per_second": view.frames_per_second,
        "drops": view.drops,
        "slow_disconnects": view.slow_disconnects,
        "upstream": {key: view.upstream.get(key) for key in UPSTREAM_KEYS},
        "recording": None if recording is None else recording_json(recording),
        "owner": view.owner,
        "role": view.role,
        "standby": view.standby,
    }


def _info_value(value: object, kind: type) -> object:
    """*value* if it is JSON of type *kind* (a float may be an int; a bool is no number;
    a number must be finite), else None."""
    if isinstance(value, bool) != (kind is bool):
        return None
    if kind is float:
        if not isinstance(value, int | float):
            return None
        try:
            number = float(value)
        except OverflowError:
            return None
        return number if math.isfinite(number) else None
    return value if isinstance(value, kind) else None


def _cluster_summary(view: ClusterView | None) -> dict[str, Any] | None:
    """``/v1/status``'s ``cluster``: this instance's name and state, null on a single node."""
    return None if view is None else {"instance": view.instance, "state": view.state}


def cluster_json(view: ClusterView) -> dict[str, Any]:
    """Exactly the documented keys: every counter of :data:`CLUSTER_COUNTERS` and, of each
    instance's heartbeat info (written by any instance, read from Redis), the keys of
    :data:`CLUSTER_INFO_KEYS` only."""
    return {
        "instance": view.instance,
        "state": view.state,
        "reason": view.reason,
        "lease_ttl": view.lease_ttl,
        "instances": [
            {
                "name": instance.name,
                "info": {
                    key: _info_value(instance.info.get(key), kind)
                    for key, kind in CLUSTER_INFO_KEYS.items()
                },
                "leases": instance.leases,
                "silent": None if instance.silent is None else round(instance.silent, 1),
                "standbys": instance.standbys,
            }
            for instance in view.instances
        ],
        "owned": view.owned,
        "relayed": view.relayed,
        "counters": {name: view.counters.get(name, 0) for name in CLUSTER_COUNTERS},
        "relay_lag_max": view.relay_lag_max,
        "append_queued_bytes": view.append_queued_bytes,
        "view_at": view.view_at,
        "unreachable_since": view.unreachable_since,
        "standby": view.standby,
        "standing_by": view.standing_by,
    }


def stream_json(endpoint: StreamEndpoint | None) -> dict[str, Any] | None:
    if endpoint is None:
        return None
    return {
        "scheme": "wss" if endpoint.tls else "ws",
        "host": endpoint.host,
        "port": endpoint.port,
        "path": endpoint.path,
    }


def subscriber_json(view: SubscriberView) -> dict[str, Any]:
    return {
        "id": view.id,
        "peer": view.peer,
        "endpoint": view.endpoint,
        "subscriptions": list(view.subscriptions),
        "queued_bytes": view.queued_bytes,
        "frames_sent": view.frames_sent,
        "frames_dropped": view.frames_dropped,
        "connected_at": view.connected_at,
        "conflated": view.conflated,
        "write_delay_ms": view.write_delay_ms,
        "batched": view.batched,
        "slow": view.slow,
    }


async def _read_body(request: Request, seconds: float) -> bytes:
    """The request body, refusing (413) more than :data:`MAX_BODY_BYTES` without reading it all,
    and (408) a body that takes longer than *seconds* to arrive: a client trickling its body
    must not hold a request open for ever."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise HTTPException(413, f"body larger than {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    with trio.move_on_after(seconds):
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise HTTPException(413, f"body larger than {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    raise HTTPException(408, f"request body not received within {seconds:g} s")


class _Handlers:
    def __init__(
        self,
        target: ControlTarget,
        sampler: RateSampler,
        body_timeout: float,
        downloads: DownloadSlots,
    ) -> None:
        self.body_timeout = body_timeout
        self.target = target
        self.sampler = sampler
        self.downloads = downloads
        self.process = ProcessMetrics()
        self.registry = make_registry(target, downloads, self.process)
        self.assets = load_assets()
        self.asset_headers = asset_headers()

    def _kind(self, feed: str) -> str:
        config = self.target.feeds().get(feed)
        # A fixture outlives no feed (feeds change only with a restart); "tracking" is moot.
        return config.kind if config is not None else "tracking"

    def _fixture_json(self, view: FixtureView) -> dict[str, Any]:
        return fixture_json(view, self._kind(view.feed))

    async def index(self, request: Request) -> Response:
        return self._asset(INDEX)

    async def asset(self, request: Request) -> Response:
        name: str = request.path_params["name"]
        if name not in self.assets:
            raise HTTPException(404, "no such dashboard file")
        return self._asset(name)

    def _asset(self, name: str) -> Response:
        asset = self.assets[name]
        # media_type is set in the headers (with its charset): Starlette would add another.
        headers = {**self.asset_headers, "content-type": asset.media_type}
        return Response(asset.body, headers=headers)

    async def healthz(self, request: Request) -> Response:
        # Answering at all proves the event loop is turning; nothing else is checked on purpose
        # (a liveness probe that fails on upstream trouble would restart a healthy process).
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        if self.target.is_ready():
            # Degraded still serves (e.g. the cluster's Redis is unreachable): 200, with why.
            reason = self.target.degraded_reason()
            if reason is not None:
                return JSONResponse({"status": "degraded", "reason": reason})
            return JSONResponse({"status": "ready"})
        status = "draining" if self.target.is_draining() else "starting"
        return JSONResponse({"status": status}, status_code=503)

    async def status(self, request: Request) -> Response:
        t = self.target
        totals = t.totals()
        rates = self.sampler.rates(trio.current_time(), totals)
        by_state = {state.value: 0 for state in FixtureState}
        views = t.fixture_views()
        for view in views:
            by_state[FixtureState(view.state).value] += 1
        return JSONResponse(
            {
                "version": t.version,
                "started_at": t.started_at,
                "uptime_s": max(0.0, time.time() - t.started_at),
                "ready": t.is_ready(),
                "draining": t.is_draining(),
                "feeds": sorted(t.feeds()),
                "fixtures": by_state,
                "fixtures_total": len(views),
                "subscribers": totals.subscribers,
                "frames_in_per_second": rates.frames_in_per_second,
                "frames_out_per_second": rates.frames_out_per_second,
                "frames_in": totals.frames_in,
                "frames_out": totals.frames_out,
                "drops": totals.drops,
                "slow_disconnects": totals.slow_disconnects,
                "stream": stream_json(t.stream_endpoint()),
                "degraded": t.degraded_reason(),
                "cluster": _cluster_summary(t.cluster_view()),
            }
        )

    async def cluster(self, request: Request) -> Response:
        view = self.target.cluster_view()
        if view is None:
            raise HTTPException(404, NOT_A_CLUSTER)
        return JSONResponse(cluster_json(view))

    async def fixtures(self, request: Request) -> Response:
        return await self._fixture_page(
            request, "fixtures", self.target.fixture_views(), self._fixture_json
        )

    async def _fixture_page(
        self,
        request: Request,
        route: str,
        views: Sequence[_F],
        render: Callable[[_F], dict[str, Any]],
    ) -> Response:
        """A page of fixtures or recordings, in (feed, fixture) order."""
        limit = _page_limit(request)
        cursor = _fixture_cursor(request)
        ordered = sorted(views, key=lambda v: (v.feed, v.fixture))
        if cursor is not None:
            ordered = [v for v in ordered if (v.feed, v.fixture) > cursor]
        page = ordered[:limit]
        more = len(ordered) > limit
        next_after = f"{page[-1].feed}/{page[-1].fixture}" if more else None
        body = await render_list(page, render)
        return page_response(body, len(views), next_after, route, limit)

    def _feed_or_404(self, request: Request) -> tuple[str, str]:
        feed: str = request.path_params["feed"]
        fixture: str = request.path_params["fixture"]
        if feed not in self.target.feeds():
            raise HTTPException(404, f"unknown feed {feed!r}")
        return feed, fixture

    async def fixture(self, request: Request) -> Response:
        feed, fixture = self._feed_or_404(request)
        if request.method == "PUT":
            return await self._follow(request, feed, fixture)
        if request.method == "DELETE":
            # In a cluster another instance's API may have added it moments ago: learn the
            # cluster's set first, and write the deletion before answering.
            synced = await self.target.sync_fixtures()
            if not self.target.unfollow(feed, fixture):
                if not synced:
                    raise HTTPException(
                        503,
                        f"fixture {fixture!r} of feed {feed!r} is not followed here and the "
                        "cluster's fixtures cannot be read (redis unreachable): try again",
                    )
                raise HTTPException(404, f"fixture {fixture!r} of feed {feed!r} is not followed")
            await self.target.sync_fixtures()
            return Response(status_code=204)
        view = self.target.fixture_view(feed, fixture)
        if view is None:
            raise HTTPException(404, f"fixture {fixture!r} of feed {feed!r} is not followed")
        return JSONResponse(self._fixture_json(view))

    async def _follow(self, request: Request, feed: str, fixture: str) -> Response:
        # The data plane's on-demand subscriptions apply the same rule (one definition).
        if not valid_fixture_id(fixture):
            raise BadRequest(f"path.fixture: must match {FIXTURE_ID_PATTERN}")
        backfill = parse_follow_body(await _read_body(request, self.body_timeout))
        try:
            created = self.target.follow(feed, fixture, backfill)
        except UnknownFeedError:
            # The feed vanished between the check and the call (a config reload).
            raise HTTPException(404, f"unknown feed {feed!r}") from None
        except FollowLimitError as exc:
            raise HTTPException(429, str(exc)) from None
        # In a cluster: in Redis before the answer, so a DELETE sent to any instance finds it.
        await self.target.sync_fixtures()
        view = self.target.fixture_view(feed, fixture)
        if view is None:
            raise RuntimeError(f"facade followed {feed}/{fixture} but has no view of it")
        return JSONResponse(self._fixture_json(view), status_code=201 if created else 200)

    async def latest(self, request: Request) -> Response:
        feed, fixture = self._feed_or_404(request)
        raw = self.target.latest(feed, fixture)
        if raw is None:
            raise HTTPException(404, f"no frame yet for fixture {fixture!r} of feed {feed!r}")
        # Verbatim: the upstream text is the product; re-serialising could change numbers.
        return Response(raw.encode(), media_type="application/json")

    async def recordings(self, request: Request) -> Response:
        return await self._fixture_page(
            request, "recordings", self.target.recordings(), recording_json
        )

    async def recording(self, request: Request) -> Response:
        feed, fixture = self._feed_or_404(request)
        after = _query_int(request, "after", 0) or 0
        limit = _query_int(request, "limit", 1)
        # Nothing is read before the first chunk is asked for: a refused download costs nothing.
        chunks = self.target.recording_download(feed, fixture, after, limit)
        if chunks is None:
            raise HTTPException(404, f"no recording of fixture {fixture!r} of feed {feed!r}")
        client = request.client.host if request.client else "?"
        self.downloads.acquire(client)
        # Streamed as read (a chunk at a time, off the event loop): never the whole file. The
        # response gives the slot back when it ends, however it ends.
        return DownloadResponse(chunks, self.downloads, client)

    async def subscribers(self, request: Request) -> Response:
        limit = _page_limit(request)
        query, keep = _subscriber_query(request, limit)
        # The facade yields to the event loop while it filters every subscriber.
        try:
            page = await self.target.subscriber_query(query)
        except CursorGone as exc:
            raise HTTPException(404, str(exc)) from None
        body = await render_list(page.items, subscriber_json)
        next_after = None
        if page.next_page is not None:
            next_after = page.next_page["after"]
            keep |= {k: v for k, v in page.next_page.items() if k != "after"}
        return page_response(body, page.total, next_after, "subscribers", limit, keep=keep)

    async def subscriber(self, request: Request) -> Response:
        """``DELETE /v1/subscribers/{id}``: disconnect one (admin token), with a reason."""
        ident = request.path_params["id"]
        reason = parse_disconnect_body(await _read_body(request, self.body_timeout))
        if not self.target.disconnect_subscriber(ident, reason):
            raise HTTPException(404, f"no subscriber {ident[:40]!r}")
        return Response(status_code=204)

    async def metrics(self, request: Request) -> Response:
        # prometheus_client's own negotiation: OpenMetrics when the scraper asks for it,
        # else the classic text format.
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        await self.process.read()  # /proc, in a worker thread: then encoded without awaiting
        return Response(encoder(self.registry), headers={"content-type": content_type})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error(exc.status_code, exc.detail, exc.headers)


async def _bad_request(request: Request, exc: Exception) -> Response:
    return error(400, str(exc))


async def _client_gone(request: Request, exc: Exception) -> Response:
    # The client closed its connection mid-request: nobody to answer, nothing went wrong here.
    logger.debug("client %s went away during %s %s", _peer(request), request.method, _path(request))
    return Response(status_code=400)


def _peer(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "?"


def _path(request: Request) -> str:
    return request.url.path[:100]


async def _server_error(request: Request, exc: Exception) -> Response:
    # Starlette re-raises after this response; hypercorn logs it with the traceback.
    return error(500, "internal error")


def build_app(
    target: ControlTarget,
    *,
    tokens: ApiTokens | None = None,
    sampler: RateSampler | None = None,
    body_timeout: float = BODY_TIMEOUT,
    downloads: DownloadSlots | None = None,
) -> Starlette:
    """The control-plane ASGI app over *target*. Holds no resources and starts no tasks.

    *tokens* default to none (everything open). *sampler* feeds the rates of ``/v1/status``;
    without one (or without its task running) the rates read 0.0. A request body must arrive
    within *body_timeout* seconds (else 408). *downloads* bounds the recording downloads at once
    (default: ``[api]``'s default limits).
    """
    if downloads is None:
        downloads = DownloadSlots.for_config(ApiSection())
    h = _Handlers(target, sampler or RateSampler(), body_timeout, downloads)
    routes = [
        Route("/", h.index, methods=["GET"]),
        Route("/dashboard/{name}", h.asset, methods=["GET"]),
        Route("/healthz", h.healthz, methods=["GET"]),
        Route("/readyz", h.readyz, methods=["GET"]),
        Route("/metrics", h.metrics, methods=["GET"]),
        Route("/v1/status", h.status, methods=["GET"]),
        Route("/v1/cluster", h.cluster, methods=["GET"]),
        Route("/v1/fixtures", h.fixtures, methods=["GET"]),
        Route("/v1/fixtures/{feed}/{fixture}", h.fixture, methods=["GET", "PUT", "DELETE"]),
        Route("/v1/fixtures/{feed}/{fixture}/latest", h.latest, methods=["GET"]),
        Route("/v1/fixtures/{feed}/{fixture}/recording", h.recording, methods=["GET"]),
        Route("/v1/recordings", h.recordings, methods=["GET"]),
        Route("/v1/subscribers", h.subscribers, methods=["GET"]),
        Route("/v1/subscribers/{id}", h.subscriber, methods=["DELETE"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(BearerAuthMiddleware, tokens=tokens or ApiTokens())],
        exception_handlers={
            HTTPException: _http_error,
            BadRequest: _bad_request,
            ClientDisconnect: _client_gone,
            Exception: _server_error,
        },
    )
    # No redirect from "/v1/fixtures/" to "/v1/fixtures": Starlette builds its Location from the
    # client's Host header, which lets anyone make the API point elsewhere. Such paths are 404.
    app.router.redirect_slashes = False
    return app
