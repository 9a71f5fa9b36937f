"""The configuration as TOML: the effective one (``dde-gateway config``) and a commented file of
every key with its default (``dde-gateway config --defaults``), both generated from the model.

Values are written by ``tomli_w`` (quoting, escapes, floats); the comments around them here.
No key of the model holds a secret's value - only the file or the variable that holds it - so
nothing read from a secret ever reaches this output.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Final

import attrs
import tomli_w

from gateway.config._convert import make_converter
from gateway.config._model import (
    ApiSection,
    ClusterSection,
    Config,
    FeedConfig,
    FixtureConfig,
    GatewaySection,
    RecorderSection,
    ReplaySection,
    SubscribersSection,
    UpstreamSection,
)

#: One line of meaning per key (docs/configuration.md has the long form). A test checks that
#: every key of the model has one and no other is here.
HELP: Final[Mapping[str, str]] = {
    "gateway.stream_listen": "subscribers' WebSocket listener, HOST:PORT or [V6]:PORT",
    "gateway.http_listen": "the HTTP control plane's listener",
    "gateway.drain_timeout": "seconds a SIGTERM drain may take before everything is cut",
    "gateway.lame_duck_period": "seconds a drain spreads its subscriber closes over (0: at once)",
    "gateway.log_level": "debug, info, warning or error (--log-level overrides)",
    "gateway.tls_cert_file": "PEM certificate chain: with tls_key_file, both listeners use TLS",
    "gateway.tls_key_file": "PEM key of the certificate (not encrypted); set both or neither",
    "gateway.reuse_port": "SO_REUSEPORT on both listeners: several gateways on one host share them",
    "upstream.token_file": "file holding the vendor token, read on every connect attempt",
    "upstream.token_env": "or: the environment variable holding it (exactly one of the two)",
    "upstream.connect_rate": "upstream connection attempts per second, all fixtures together",
    "upstream.backoff_initial": "first reconnect delay bound, seconds (doubles per failure)",
    "upstream.backoff_max": "cap of the reconnect delay bound, seconds",
    "upstream.backoff_reset_after": "seconds live after which a connection resets the backoff",
    "upstream.stall_timeout": "seconds without anything received before a reconnect",
    "upstream.handshake_timeout": "seconds for TCP + TLS + WebSocket handshake",
    "upstream.unauthorized_retry": "longest wait, seconds, of a refused fixture before it retries",
    "upstream.unauthorized_probe_interval": "seconds between probes of a refused token",
    "upstream.not_found_retry": "seconds before retrying a fixture the vendor does not know",
    "upstream.client": "upstream WebSocket client: lean or trio-websocket",
    "feeds.kind": "tracking (fixture requested after auth) or fastpath ({fixture} in the url)",
    "feeds.url": "the vendor's ws:// or wss:// URL",
    "feeds.path": "path of the drop-in endpoint on stream_listen (default: the url's path)",
    "feeds.history": "frames kept per fixture for backfill and resume",
    "feeds.history_bytes": "bytes of frame text one fixture's history may hold",
    "feeds.on_demand": "a subscription to a fixture not followed starts following it",
    "feeds.linger": "seconds an on-demand fixture stays after its last subscriber left",
    "feeds.max_on_demand": "fixtures of the feed followed on demand at once",
    "fixtures.feed": "a NAME of [feeds]",
    "fixtures.id": "the vendor's fixture id (A-Z a-z 0-9 . _ : -, up to 128)",
    "fixtures.backfill": "on the first connect: -1 all, 0 live only, n the last n frames",
    "subscribers.queue_bytes": "per-subscriber outgoing queue budget, bytes",
    "subscribers.slow_policy": "full queue: disconnect (close 4008) or drop-oldest",
    "subscribers.max_connections": "subscriber connections at once; more get HTTP 503",
    "subscribers.max_subscriptions": "subscriptions per connection",
    "subscribers.max_message_bytes": "largest client message, bytes (larger: close 1009)",
    "subscribers.handshake_timeout": "seconds for a subscriber's WebSocket handshake",
    "subscribers.ping_interval": "seconds between WebSocket pings",
    "subscribers.ping_timeout": "seconds without a pong before the subscriber is closed",
    "subscribers.heartbeat_interval": "seconds between gateway heartbeat messages",
    "subscribers.max_client_frames_per_second": "average frames per second a subscriber may send",
    "subscribers.client_frame_burst": "frames a subscriber may send at once above that rate",
    "subscribers.write_delay": "milliseconds (0-1000) frames may be held to be written together",
    "subscribers.compression": "off or deflate (permessage-deflate, shared per topic)",
    "subscribers.tokens_file": "subscriber tokens for both endpoints (unset: open access)",
    "api.admin_tokens_file": "tokens for PUT and DELETE (unset: open)",
    "api.read_tokens_file": "tokens for GET routes but /healthz and /readyz (unset: open)",
    "api.max_fixtures": "fixtures the API may follow on top of the config file's",
    "api.max_downloads": "recording downloads streaming at once",
    "api.max_downloads_per_client": "recording downloads at once from one client address",
    "recorder.dir": "directory of the recordings (set: every followed fixture is recorded)",
    "recorder.fsync_interval": "seconds between fsyncs of the files being written",
    "recorder.retention_days": "closed segments older than this many days are removed",
    "recorder.max_bytes": "bytes of recordings at most (>= 1 MiB); the oldest go first",
    "recorder.segment_bytes": "bytes after which a segment is closed and compressed",
    "recorder.queue_bytes": "bytes of frames waiting for the writer, all fixtures",
    "replay.max_replays": "drop-in replays passed through to the vendor at once",
    "replay.max_local": "replays served from the gateway's own data at once",
    "replay.max_per_connection": "replays one /v1/stream connection may run at once",
    "replay.queue_bytes": "one replay's byte budget of frames its client has not taken",
    "replay.stall_timeout": "seconds a replay waits on a client that takes nothing",
    "cluster.redis_url": "redis://HOST:PORT[/DB], rediss://... or unix:///PATH (or sentinels)",
    "cluster.sentinels": "Redis through Sentinel: the sentinels' HOST:PORT list",
    "cluster.sentinel_master": "the name the sentinels monitor the primary under",
    "cluster.instance": "this instance's name (unset: $DDE_GATEWAY_INSTANCE, else hostname-pid)",
    "cluster.lease_ttl": "seconds (1-300) a fixture's lease lives without renewal",
    "cluster.stream_maxlen": "frames kept per fixture in Redis",
    "cluster.stream_retention": "seconds a stream stays in Redis once no instance follows it",
    "cluster.standby": "hot standby: a second instance keeps a warm vendor connection per fixture",
    "cluster.key_prefix": "prefix of every Redis key",
    "cluster.username": "Redis ACL user",
    "cluster.password_file": "file holding the Redis password",
    "cluster.password_env": "or: the environment variable holding it",
    "cluster.append_queue_bytes": "bytes of frames waiting to be appended to Redis",
    "cluster.redis_timeout": "seconds a Redis connect or reply may take",
    "cluster.batch_interval": "least seconds between two append requests (0-0.1)",
}

#: The tables in file order: (TOML name, class, an instance holding every default).
_SECTIONS: Final[tuple[tuple[str, type, Any], ...]] = (
    ("gateway", GatewaySection, GatewaySection()),
    ("upstream", UpstreamSection, UpstreamSection(token_env="DDE_TOKEN")),
    ("subscribers", SubscribersSection, SubscribersSection()),
    ("api", ApiSection, ApiSection()),
    ("recorder", RecorderSection, RecorderSection()),
    ("replay", ReplaySection, ReplaySection()),
)
_OPTIONAL_TABLES: Final = (
    ("feeds", FeedConfig, FeedConfig(kind="tracking", url="ws://vendor.example/tracking")),
    ("cluster", ClusterSection, ClusterSection(redis_url="redis://127.0.0.1:6379")),
)


def config_keys(table: type) -> list[attrs.Attribute[Any]]:
    """The keys of a table as the file spells them (a feed's ``name`` is its table's key)."""
    return [
        f for f in attrs.fields(table) if f.init and not (table is FeedConfig and f.name == "name")
    ]


def _value(value: Any) -> str:
    """*value* as TOML (the right-hand side of ``key = ``), on one line."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}, multiline_strings=False).removeprefix("v = ").rstrip("\n")


def _table_lines(section: str, data: Mapping[str, Any], table: type) -> Iterator[str]:
    for field in config_keys(table):
        value = data.get(field.name)
        if value is None:
            yield f"# {field.name}: unset"
        else:
            yield f"{field.name} = {_value(value)}"


def effective_toml(config: Config, source: str) -> str:
    """*config* as a TOML file, every key with its value (defaults filled in); keys left unset
    are comments. Parsing it gives *config* back."""
    data = make_converter().unstructure(config)
    out = [
        f"# dde-gateway: the effective configuration ({source}, DDE_GATEWAY_* variables over it,",
        "# defaults filled in). Secrets are not part of it: only the files and variables that",
        "# hold them.",
    ]
    for name, table, _ in _SECTIONS:
        out += ["", f"[{name}]", *_table_lines(name, data[name], table)]
    for feed, values in data["feeds"].items():
        out += ["", f"[feeds.{_key(feed)}]", *_table_lines("feeds", values, FeedConfig)]
    for fixture in data["fixtures"]:
        out += ["", "[[fixtures]]", *_table_lines("fixtures", fixture, FixtureConfig)]
    if data.get("cluster") is None:
        out += ["", "# [cluster]: unset (a single node)"]
    else:
        out += ["", "[cluster]", *_table_lines("cluster", data["cluster"], ClusterSection)]
    return "\n".join(out) + "\n"


def _key(name: str) -> str:
    """A feed name as a TOML key (quoted unless bare)."""
    bare = name and all(c.isascii() and (c.isalnum() or c in "-_") for c in name)
    return name if bare else _value(name)


def _documented(section: str, table: type, example: Any, prefix: str = "") -> Iterator[str]:
    data = make_converter().unstructure(example)
    for field in config_keys(table):
        yield f"{prefix}# {HELP[f'{section}.{field.name}']}"
        if field.default is attrs.NOTHING:
            yield f"{prefix}# {field.name}: required"
        elif field.default is None:
            yield f"{prefix}# {field.name}: unset by default"
        else:
            yield f"{prefix}{field.name} = {_value(data[field.name])}"


def defaults_toml() -> str:
    """A commented config of every key: its meaning, then ``key = default``. The tables that
    may be absent (``[feeds.NAME]``, ``[[fixtures]]``, ``[cluster]``) are commented out with
    one more ``#`` per line; ``[upstream]`` needs ``token_file`` or ``token_env`` set."""
    out = [
        "# dde-gateway: every configuration key with its default (dde-gateway config --defaults).",
        "# Any key may also come from the environment as DDE_GATEWAY_<SECTION>_<KEY>",
        "# (docs/configuration.md).",
    ]
    for name, table, example in _SECTIONS:
        out += ["", f"[{name}]", *_documented(name, table, example)]
    feed = _OPTIONAL_TABLES[0]
    out += ["", "#[feeds.NAME]", *_documented("feeds", feed[1], feed[2], "#")]
    fixture = FixtureConfig(feed="NAME", id="1")
    out += ["", "#[[fixtures]]", *_documented("fixtures", FixtureConfig, fixture, "#")]
    cluster = _OPTIONAL_TABLES[1]
    out += ["", "#[cluster]", *_documented("cluster", cluster[1], cluster[2], "#")]
    return "\n".join(out) + "\n"
