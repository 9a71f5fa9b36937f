"""Prometheus metrics, collected from the facade at scrape time.

A custom collector reads :class:`~gateway.controlplane.ControlTarget` when Prometheus scrapes,
so the data path keeps plain integer counters and pays nothing for metrics. Each app gets its
own :class:`~prometheus_client.CollectorRegistry` (never the process-global one), so several apps
can live in one process, as they do in the tests.

The ``dde_cluster_*`` families appear only in a cluster (``cluster_view()`` not None).

Labels are ``feed``, ``state`` and ``endpoint`` (the two subscriber endpoint kinds), and the
fixed sets of the replays' ``source`` and ``reason`` (``gateway.replay``): subscribers, peers
and tokens are unbounded sets and would make the series count grow without limit (and a token
must never be anywhere near a metric). The one exception is ``fixture`` on
``dde_fixture_frame_age_seconds``: one series per *followed* fixture (bounded by the configured
fixtures and ``max_on_demand``), gone when it is no longer followed, so that an alert can name
the fixture that went quiet.

Every counter is named with its ``_total`` here, as it is exposed (``CounterMetricFamily``
takes the name with or without it), and every quantity with a unit carries it (``_seconds``,
``_bytes``). prometheus_client's own process and platform collectors (``process_*``, read off
the loop by :mod:`gateway.controlplane._process`; ``python_info``) sit on the same registry,
next to ``dde_build_info``.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Iterable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, PlatformCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from gateway import __version__
from gateway.controlplane._downloads import DOWNLOAD_LIMITS, DownloadSlots
from gateway.controlplane._process import ProcessMetrics
from gateway.controlplane._target import (
    CLUSTER_COUNTERS,
    ClusterView,
    ControlTarget,
    FixtureView,
    LatencyHistogram,
    RecorderTotals,
)
from gateway.dataplane import AUTH_ENDPOINTS
from gateway.model import FixtureState, counter_specs
from gateway.replay import REFUSAL_REASONS, REPLAY_METRICS, REPLAY_SOURCES, ReplayCounters

#: The states of a recording, as ``RecordingView.state`` says them.
RECORDING_STATES: Final = ("recording", "stopped", "idle")


def _histogram_buckets(hist: LatencyHistogram) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs ending with ``+Inf`` = ``hist.count``."""
    out: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip(hist.buckets, hist.counts, strict=False):
        if math.isinf(bound):
            break
        running += n
        # Prometheus' own float spelling (prometheus_client leaves this helper unannotated).
        le: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
        out.append((le, float(running)))
    # Never let +Inf be below a finite bucket, even if the facade's numbers raced.
    out.append(("+Inf", float(max(hist.count, running))))
    return out


class GatewayCollector:
    """Yields the ``dde_*`` metric families from a :class:`ControlTarget`."""

    def __init__(self, target: ControlTarget, downloads: DownloadSlots | None = None) -> None:
        self._target = target
        self._downloads = downloads

    def collect(self) -> Iterator[Metric]:
        target = self._target
        yield _build_info()
        feeds = sorted(target.feeds())
        per_feed = target.feed_totals()
        totals = target.totals()

        # One family per upstream counter, named where the counter is defined.
        for spec in counter_specs():
            family = CounterMetricFamily(spec.metric, spec.help, labels=["feed"])
            for feed in feeds:
                counts = per_feed.get(feed)
                value = getattr(counts.upstream, spec.name) if counts else 0
                family.add_metric([feed], float(value))
            yield family
        refused = CounterMetricFamily(
            "dde_on_demand_refused_total",
            "Subscriptions refused: the feed already follows max_on_demand fixtures on demand.",
            labels=["feed"],
        )
        for feed in feeds:
            counts = per_feed.get(feed)
            refused.add_metric([feed], float(counts.on_demand_refused) if counts else 0.0)
        yield refused

        yield CounterMetricFamily(
            "dde_frames_sent_total", "Frames delivered to subscribers.", value=totals.frames_out
        )
        yield CounterMetricFamily(
            "dde_subscriber_sent_bytes_total",
            "Bytes written to subscriber sockets: frames, replies, close frames (WebSocket "
            "framing included, before TLS).",
            value=totals.bytes_out,
        )
        yield CounterMetricFamily(
            "dde_subscriber_drops_total",
            "Frames dropped for slow subscribers (drop-oldest policy).",
            value=totals.drops,
        )
        yield CounterMetricFamily(
            "dde_slow_disconnects_total",
            "Subscribers disconnected for being too slow.",
            value=totals.slow_disconnects,
        )
        yield CounterMetricFamily(
            "dde_subscriber_rate_limited_total",
            "Subscribers closed (1008) for sending frames faster than allowed.",
            value=totals.rate_limited,
        )
        yield CounterMetricFamily(
            "dde_subscribers_disconnected_total",
            "Subscribers an operator disconnected (DELETE /v1/subscribers/{id}, close 4009).",
            value=totals.disconnected,
        )
        yield CounterMetricFamily(
            "dde_subscriber_ping_timeouts_total",
            "Subscribers closed (1011) for not answering a ping within ping_timeout.",
            value=totals.ping_timeouts,
        )
        yield GaugeMetricFamily(
            "dde_subscribers", "Connected subscribers.", value=totals.subscribers
        )
        yield GaugeMetricFamily(
            "dde_subscribers_batched",
            "Subscribers written as part of a batch group now (write_delay, shared buffers).",
            value=totals.batched,
        )
        yield GaugeMetricFamily(
            "dde_batch_groups", "Batch groups with members now.", value=totals.batch_groups
        )
        auth = CounterMetricFamily(
            "dde_subscriber_auth_failures_total",
            "Failed subscriber authentications (missing, unknown or not allowed tokens; "
            "drop-in: also bad or missing authentication messages).",
            labels=["endpoint"],
        )
        for endpoint in AUTH_ENDPOINTS:
            auth.add_metric([endpoint], float(totals.auth_failures.get(endpoint, 0)))
        yield auth

        by_feed_state = {(feed, state): 0 for feed in feeds for state in FixtureState}
        views = target.fixture_views()
        for view in views:
            key = (view.feed, FixtureState(view.state))
            by_feed_state[key] = by_feed_state.get(key, 0) + 1
        fixtures = GaugeMetricFamily(
            "dde_fixtures", "Followed fixtures by upstream state.", labels=["feed", "state"]
        )
        for (feed, state), n in sorted(by_feed_state.items()):
            fixtures.add_metric([feed, state.value], n)
        yield fixtures
        yield _frame_ages(views)

        recorder = target.recorder_totals()
        if recorder is not None:
            yield from _recorder_families(feeds, recorder)

        yield from _replay_families(target.replay_counters())

        cluster = target.cluster_view()
        if cluster is not None:
            yield from _cluster_families(cluster)

        if self._downloads is not None:
            yield from _download_families(self._downloads)

        data_age = HistogramMetricFamily(
            "dde_upstream_data_age_seconds",
            "Receipt time here minus the vendor's time on the frame (tracking ut, fastpath "
            "timestamp): how stale the vendor's data is when it arrives, per data frame.",
            labels=["feed"],
        )
        ages = target.data_age()
        for feed in feeds:
            age = ages.get(feed)
            if age is not None:
                data_age.add_metric([feed], _histogram_buckets(age), float(age.sum))
        yield data_age

        hist = target.fanout_latency
        yield HistogramMetricFamily(
            "dde_fanout_latency_seconds",
            "Time from an upstream frame's publish to its bytes handed to the kernel, "
            "per delivery.",
            buckets=_histogram_buckets(hist),
            sum_value=float(hist.sum),
        )


def _frame_ages(views: Iterable[FixtureView]) -> Metric:
    ages = GaugeMetricFamily(
        "dde_fixture_frame_age_seconds",
        "Seconds since the fixture's last frame reached its subscribers (a followed fixture "
        "with at least one frame; one series per followed fixture).",
        labels=["feed", "fixture"],
    )
    for view in sorted(views, key=lambda v: (v.feed, v.fixture)):
        if view.frame_age is not None:
            ages.add_metric([view.feed, view.fixture], view.frame_age)
    return ages


def _build_info() -> Metric:
    info = GaugeMetricFamily(
        "dde_build_info",
        "Always 1: the gateway's version and the Python it runs on, as labels.",
        labels=["version", "python", "implementation"],
    )
    info.add_metric([__version__, platform.python_version(), platform.python_implementation()], 1.0)
    return info


def _download_families(slots: DownloadSlots) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "dde_api_downloads", "Recording downloads being streamed now.", value=slots.total
    )
    refused = CounterMetricFamily(
        "dde_api_downloads_refused_total",
        "Recording downloads refused: the client's (429) or the overall (503) limit reached.",
        labels=["limit"],
    )
    for limit in DOWNLOAD_LIMITS:
        refused.add_metric([limit], float(slots.refused[limit]))
    yield refused


def _replay_families(counters: ReplayCounters) -> Iterator[Metric]:
    name, _, text = REPLAY_METRICS["active"]
    active = GaugeMetricFamily(name, text, labels=["source"])
    name, _, text = REPLAY_METRICS["total"]
    total = CounterMetricFamily(name, text, labels=["source"])
    for source in REPLAY_SOURCES:
        active.add_metric([source], float(counters.active[source]))
        total.add_metric([source], float(counters.total[source]))
    yield active
    yield total
    name, _, text = REPLAY_METRICS["refused"]
    refused = CounterMetricFamily(name, text, labels=["reason"])
    for reason in REFUSAL_REASONS:
        refused.add_metric([reason], float(counters.refused[reason]))
    yield refused
    name, _, text = REPLAY_METRICS["frames"]
    yield CounterMetricFamily(name, text, value=float(counters.frames))
    name, _, text = REPLAY_METRICS["slow"]
    yield CounterMetricFamily(name, text, value=float(counters.slow_consumers))


def _recorder_families(feeds: list[str], totals: RecorderTotals) -> Iterator[Metric]:
    written = CounterMetricFamily(
        "dde_recorder_frames_written_total", "Frames written to recordings.", labels=["feed"]
    )
    dropped = CounterMetricFamily(
        "dde_recorder_frames_dropped_total",
        "Published frames not recorded (recorder queue full, write errors, recording stopped).",
        labels=["feed"],
    )
    for feed in feeds:
        written.add_metric([feed], float(totals.frames_written.get(feed, 0)))
        dropped.add_metric([feed], float(totals.frames_dropped.get(feed, 0)))
    yield written
    yield dropped
    fixtures = GaugeMetricFamily(
        "dde_recorder_fixtures",
        "Recorded fixtures by recording state (stopped: followed but not recorded, or refused).",
        labels=["state"],
    )
    for state in RECORDING_STATES:
        fixtures.add_metric([state], float(totals.fixtures.get(state, 0)))
    yield fixtures
    yield GaugeMetricFamily(
        "dde_recorder_queue_bytes",
        "Frame bytes waiting for the recorder's writer thread.",
        value=totals.queued_bytes,
    )
    yield GaugeMetricFamily(
        "dde_recorder_stored_bytes", "Bytes of recording files on disk.", value=totals.stored_bytes
    )


def _cluster_families(view: ClusterView) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "dde_cluster_instances",
        "Live instances of the cluster (heartbeats in Redis), this one included.",
        value=len(view.instances),
    )
    yield GaugeMetricFamily(
        "dde_cluster_instances_silent",
        "Live instances not heard from for several rounds (killed without a goodbye, or hung): "
        "their fixtures are shown as being taken over.",
        value=sum(1 for i in view.instances if i.silent is not None),
    )
    yield GaugeMetricFamily(
        "dde_cluster_leases_owned",
        "Followed fixtures whose lease this instance holds (it follows them upstream).",
        value=view.owned,
    )
    yield GaugeMetricFamily(
        "dde_cluster_fixtures_relayed",
        "Followed fixtures another instance owns, relayed here from their Redis streams.",
        value=view.relayed,
    )
    yield GaugeMetricFamily(
        "dde_cluster_standby_connections",
        "Standby vendor connections here in step with their streams ([cluster] standby): "
        "warm connections for fixtures another instance owns, ready to take over without a "
        "reconnect.",
        value=view.standing_by,
    )
    # One family per cluster counter, named and described where the counters are defined.
    for name, help_text in CLUSTER_COUNTERS.items():
        yield CounterMetricFamily(
            f"dde_cluster_{name}_total", help_text, value=view.counters.get(name, 0)
        )
    yield GaugeMetricFamily(
        "dde_cluster_relay_lag_seconds",
        "Largest lag over the relayed fixtures: this host's clock at relay minus the owner's "
        "receive time of the last relayed frame (includes the hosts' clock difference).",
        value=view.relay_lag_max,
    )
    yield GaugeMetricFamily(
        "dde_cluster_view_age_seconds",
        "Seconds since this instance's last round reached Redis: how old the cluster view it "
        "shows is (grows while Redis is unreachable from it).",
        value=_view_age(view.view_at, view.unreachable_since),
    )
    yield GaugeMetricFamily(
        "dde_cluster_append_queued_bytes",
        "Frame bytes waiting to be appended to Redis.",
        value=view.append_queued_bytes,
    )
    yield GaugeMetricFamily(
        "dde_cluster_degraded",
        "1 while this instance's cluster is degraded (Redis unreachable), else 0.",
        value=1 if view.state == "degraded" else 0,
    )


def make_registry(
    target: ControlTarget,
    downloads: DownloadSlots | None = None,
    process: ProcessMetrics | None = None,
) -> CollectorRegistry:
    """A fresh registry holding the gateway collector for *target* (and the recording
    downloads' *downloads*), prometheus_client's platform collector (``python_info``) and, when
    given, *process* (``process_*``: memory, CPU, open fds, start time; read off the loop)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(target, downloads))
    if process is not None:
        registry.register(process)
    PlatformCollector(registry=registry)
    return registry


def _view_age(view_at: float | None, unreachable_since: float | None) -> float:
    """Seconds the cluster view is old: since the last round that reached Redis, or, when none
    has yet, since Redis first failed to answer (0 before the first round)."""
    since = view_at if view_at is not None else unreachable_since
    return 0.0 if since is None else max(0.0, time.time() - since)
