"""The HTTP control plane: health, readiness, status, fixtures, subscribers, metrics, dashboard.

A Starlette app served by hypercorn's trio worker over the :class:`ControlTarget` facade; it
knows nothing else of the gateway. See docs/api.md and docs/openapi.yaml.
"""

from gateway.controlplane._app import (
    DEFAULT_FOLLOW_BACKFILL,
    DEFAULT_PAGE_LIMIT,
    MAX_BODY_BYTES,
    MAX_PAGE_LIMIT,
    NOT_A_CLUSTER,
    RENDER_STEP,
    build_app,
    parse_follow_body,
    render_list,
)
from gateway.controlplane._auth import ApiTokens, BearerAuthMiddleware
from gateway.controlplane._dashboard import (
    CONTENT_SECURITY_POLICY,
    DASHBOARD_FOLDER,
    DASHBOARD_PACKAGE,
    DASHBOARD_PREFIX,
    Asset,
    load_assets,
)
from gateway.controlplane._downloads import (
    DOWNLOAD_LIMITS,
    DOWNLOAD_RETRY_AFTER,
    DownloadResponse,
    DownloadSlots,
)
from gateway.controlplane._metrics import GatewayCollector, make_registry
from gateway.controlplane._rates import (
    DEFAULT_RATE_WINDOW,
    DEFAULT_SAMPLE_INTERVAL,
    Rates,
    RateSampler,
)
from gateway.controlplane._server import GRACEFUL_TIMEOUT, hypercorn_config, run
from gateway.controlplane._target import (
    CLUSTER_COUNTERS,
    CLUSTER_INFO_KEYS,
    ClusterInstanceView,
    ClusterView,
    ControlTarget,
    FeedTotals,
    FixtureView,
    FollowLimitError,
    LatencyHistogram,
    RecorderTotals,
    RecordingView,
    StreamEndpoint,
    Totals,
)
from gateway.dataplane import SubscriberView
from gateway.hub import FIXTURE_ID_PATTERN

__all__ = [
    "CLUSTER_COUNTERS",
    "CLUSTER_INFO_KEYS",
    "CONTENT_SECURITY_POLICY",
    "DASHBOARD_FOLDER",
    "DASHBOARD_PACKAGE",
    "DASHBOARD_PREFIX",
    "DEFAULT_FOLLOW_BACKFILL",
    "DEFAULT_PAGE_LIMIT",
    "DEFAULT_RATE_WINDOW",
    "DEFAULT_SAMPLE_INTERVAL",
    "DOWNLOAD_LIMITS",
    "DOWNLOAD_RETRY_AFTER",
    "FIXTURE_ID_PATTERN",
    "GRACEFUL_TIMEOUT",
    "MAX_BODY_BYTES",
    "MAX_PAGE_LIMIT",
    "NOT_A_CLUSTER",
    "RENDER_STEP",
    "ApiTokens",
    "Asset",
    "BearerAuthMiddleware",
    "ClusterInstanceView",
    "ClusterView",
    "ControlTarget",
    "DownloadResponse",
    "DownloadSlots",
    "FeedTotals",
    "FixtureView",
    "FollowLimitError",
    "GatewayCollector",
    "LatencyHistogram",
    "RateSampler",
    "Rates",
    "RecorderTotals",
    "RecordingView",
    "StreamEndpoint",
    "SubscriberView",
    "Totals",
    "build_app",
    "hypercorn_config",
    "load_assets",
    "make_registry",
    "parse_follow_body",
    "render_list",
    "run",
]
