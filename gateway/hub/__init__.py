"""The hub: one topic per followed (feed, fixture) with seq, epoch, history and fan-out.

The upstream supervisor publishes into a :class:`Topic` (its ``FrameSink``); the data plane
attaches :class:`TopicSubscriber` objects to topics; the control plane reads topics' counters
and the hub's ``fanout_latency`` histogram. Nothing here does I/O or awaits.
"""

from gateway.hub._frame import Frame, deflate_message, envelope_prefix
from gateway.hub._hub import (
    FIXTURE_ID_PATTERN,
    FixtureDirectory,
    Hub,
    HubError,
    OnDemandLimitError,
    UnknownFeedError,
    UnknownFixtureError,
    valid_fixture_id,
)
from gateway.hub._latency import LATENCY_BUCKETS, SAMPLE_EVERY, LatencyHistogram
from gateway.hub._topic import (
    RATE_WINDOW,
    RESUME_AHEAD_MAX,
    ArchiveCursor,
    Topic,
    TopicArchive,
    TopicSubscriber,
    TopicTap,
)

__all__ = [
    "FIXTURE_ID_PATTERN",
    "LATENCY_BUCKETS",
    "RATE_WINDOW",
    "RESUME_AHEAD_MAX",
    "SAMPLE_EVERY",
    "ArchiveCursor",
    "FixtureDirectory",
    "Frame",
    "Hub",
    "HubError",
    "LatencyHistogram",
    "OnDemandLimitError",
    "Topic",
    "TopicArchive",
    "TopicSubscriber",
    "TopicTap",
    "UnknownFeedError",
    "UnknownFixtureError",
    "deflate_message",
    "envelope_prefix",
    "valid_fixture_id",
]
