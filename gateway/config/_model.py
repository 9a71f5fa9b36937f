"""The configuration model: frozen attrs classes, one per TOML table.

Defaults are named ``Final`` constants so code, docs and tests quote the same numbers. Range
checks live in attrs validators; the converter (:mod:`gateway.config._convert`) adds strict
typing and unknown-key rejection, and turns every failure into a message with its field path.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, Literal

import attrs
from attrs import validators as v

from gateway.config._secret import (
    Secret,
    read_token_env,
    read_token_file,
    read_token_list,
)
from gateway.config._tokens import SubscriberTokens, read_subscriber_tokens

DEFAULT_STREAM_LISTEN: Final = "127.0.0.1:8765"
DEFAULT_HTTP_LISTEN: Final = "127.0.0.1:8780"
DEFAULT_DRAIN_TIMEOUT: Final = 10.0
#: Seconds a drain spreads its subscriber closes over (lame duck), within drain_timeout.
DEFAULT_LAME_DUCK_PERIOD: Final = 3.0
#: ``SO_REUSEPORT`` on both listeners: several gateway processes on one host share the
#: addresses and the kernel spreads new connections over them (docs/operations.md).
DEFAULT_REUSE_PORT: Final = False

DEFAULT_CONNECT_RATE: Final = 5.0
DEFAULT_BACKOFF_INITIAL: Final = 0.5
DEFAULT_BACKOFF_MAX: Final = 30.0
DEFAULT_BACKOFF_RESET_AFTER: Final = 60.0
DEFAULT_STALL_TIMEOUT: Final = 25.0
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
DEFAULT_UNAUTHORIZED_RETRY: Final = 60.0
DEFAULT_UNAUTHORIZED_PROBE_INTERVAL: Final = 1.0
DEFAULT_NOT_FOUND_RETRY: Final = 30.0

DEFAULT_HISTORY: Final = 1500  # 60 s at 25 Hz
#: Bytes of frame text one topic's history may hold (4 MB for 1,500 tracking frames of 3 KB).
DEFAULT_HISTORY_BYTES: Final = 16 * 1024 * 1024
DEFAULT_LINGER: Final = 60.0
#: Fixtures one feed may follow on demand at once (lingering ones included).
DEFAULT_MAX_ON_DEMAND: Final = 50

#: Fixtures the HTTP API may add on top of the config file's (re-adds of followed ones are free).
DEFAULT_API_MAX_FIXTURES: Final = 200
#: Recording downloads streamed at once, overall and per client address (``[api]``).
DEFAULT_API_MAX_DOWNLOADS: Final = 16
DEFAULT_API_MAX_DOWNLOADS_PER_CLIENT: Final = 4

DEFAULT_QUEUE_BYTES: Final = 4 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS: Final = 10_000
DEFAULT_MAX_SUBSCRIPTIONS: Final = 1000
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024
DEFAULT_SUBSCRIBER_HANDSHAKE_TIMEOUT: Final = 10.0
DEFAULT_PING_INTERVAL: Final = 20.0
DEFAULT_PING_TIMEOUT: Final = 20.0
DEFAULT_HEARTBEAT_INTERVAL: Final = 10.0
#: Client frames (messages, fragments, pings, pongs) one subscriber may send per second on
#: average, and how many it may send at once (a burst of subscribes, a browser's pongs).
DEFAULT_MAX_CLIENT_FRAMES_PER_SECOND: Final = 100.0
DEFAULT_CLIENT_FRAME_BURST: Final = 1000
#: Longest ``write_delay`` (ms) a config or a subscriber may ask for.
MAX_WRITE_DELAY_MS: Final = 1000

#: The recorder's defaults (``[recorder]``, docs/recorder.md).
DEFAULT_RECORDER_FSYNC_INTERVAL: Final = 1.0
#: A segment is closed (and compressed) once it holds this many bytes.
DEFAULT_RECORDER_SEGMENT_BYTES: Final = 16 * 1024 * 1024
#: Bytes of frames waiting for the writer thread, all fixtures together: past it, the fixture
#: whose frame does not fit stops recording (the disk is slower than the feeds).
DEFAULT_RECORDER_QUEUE_BYTES: Final = 64 * 1024 * 1024

#: The cluster's defaults (``[cluster]``, docs/cluster.md).
#: [replay]: vendor pass-through replay connections open at once (the whole gateway).
DEFAULT_MAX_REPLAYS: Final = 10
#: [replay]: replays served from what the gateway holds, at once: the whole gateway, one connection.
DEFAULT_MAX_LOCAL_REPLAYS: Final = 200
DEFAULT_MAX_REPLAYS_PER_CONNECTION: Final = 4
#: [replay]: bytes of one replay's frames its client may leave unread before the replay waits.
DEFAULT_REPLAY_QUEUE_BYTES: Final = 1024 * 1024
#: [replay]: seconds a replay waits on a client that reads nothing before it is ended.
DEFAULT_REPLAY_STALL_TIMEOUT: Final = 30.0
DEFAULT_LEASE_TTL: Final = 10.0
#: Frames kept per fixture in its Redis stream (about 13 minutes at 25 Hz).
DEFAULT_STREAM_MAXLEN: Final = 20_000
#: Seconds a fixture's stream and meta stay in Redis once no instance owns it any more.
DEFAULT_STREAM_RETENTION: Final = 600.0
#: stream_retention must be at least this many lease_ttl (a takeover needs the stream).
MIN_RETENTION_TTLS: Final = 3
DEFAULT_KEY_PREFIX: Final = "dde"
#: Bytes of frames waiting to be appended to Redis, all fixtures together: past it the oldest
#: waiting frames are dropped (counted); the local fan-out never waits for Redis.
DEFAULT_APPEND_QUEUE_BYTES: Final = 64 * 1024 * 1024
#: Seconds a Redis connect or command may take before it counts as failed.
DEFAULT_REDIS_TIMEOUT: Final = 2.0
#: Least seconds between two append requests, and between two relay reads, of an instance: the
#: frames of that time share one request (CPU for latency: docs/performance.md, "Cluster").
DEFAULT_BATCH_INTERVAL: Final = 0.005
#: Longest pause between two lease rounds of a cluster instance.
MAX_ROUND_INTERVAL: Final = 1.0


class ConfigProblems(ValueError):
    """Several cross-field problems of one table at once (each a message for one line)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def lease_round_interval(ttl: float) -> float:
    """Seconds between a cluster instance's lease rounds: a quarter of the lease's *ttl*, at
    most :data:`MAX_ROUND_INTERVAL`."""
    return min(MAX_ROUND_INTERVAL, ttl / 4)


def lease_expiry(ttl: float) -> float:
    """How long Redis keeps a lease after each renewal: *ttl* past the next scheduled renewal
    (a round later), so a pause of the owner shorter than *ttl*, whenever it starts, never
    lets the lease run out in Redis (the renew margin)."""
    return ttl + lease_round_interval(ttl)


def lease_validity(ttl: float) -> float:
    """How long after sending a successful renewal a lease counts as held locally: *ttl* minus
    a margin of a fifth of it (at least half a second)."""
    return ttl - max(0.5, ttl / 5)


FeedKind = Literal["tracking", "fastpath"]
SlowPolicy = Literal["disconnect", "drop-oldest"]
Compression = Literal["off", "deflate"]
UpstreamClient = Literal["lean", "trio-websocket"]
LogLevel = Literal["debug", "info", "warning", "error"]

_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]\s]+)):(?P<port>\d{1,5})$")
_URL = re.compile(r"^wss?://[^/\s]+(?P<path>/\S*)?$")


@attrs.frozen
class ListenAddress:
    """``host:port`` (``[v6]:port`` for IPv6). Port 0 asks the OS for a free port."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        m = _HOST_PORT.match(text)
        if m is None:
            raise ValueError(f"expected HOST:PORT (or [IPv6]:PORT), got {text!r}")
        port = int(m["port"])
        if port > 65535:
            raise ValueError(f"port {port} is out of range 0..65535")
        host = m["v6"] or m["host"]
        if m["v6"]:
            ipaddress.IPv6Address(host)
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _positive(inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _positive_finite(inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    _positive(inst, attribute, value)
    if value == float("inf"):
        raise ValueError(f"{attribute.name} must be finite, got {value!r}")


def _write_delay(inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= MAX_WRITE_DELAY_MS:
        raise ValueError(f"{attribute.name} must be 0-{MAX_WRITE_DELAY_MS} ms, got {value!r}")


def _non_negative(inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


_REDIS_URL = re.compile(r"^(?:rediss?://[^/\s?#]+(?:/\d+)?|unix:///\S+)$")
_KEY_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


_STREAM_LISTEN: Final = ListenAddress.parse(DEFAULT_STREAM_LISTEN)
_HTTP_LISTEN: Final = ListenAddress.parse(DEFAULT_HTTP_LISTEN)


@attrs.frozen
class GatewaySection:
    stream_listen: ListenAddress = _STREAM_LISTEN
    http_listen: ListenAddress = _HTTP_LISTEN
    drain_timeout: float = attrs.field(default=DEFAULT_DRAIN_TIMEOUT, validator=_positive)
    #: A drain closes its subscribers spread evenly over this many seconds (0: all at once),
    #: so they do not all reconnect elsewhere in the same instant. Under drain_timeout.
    lame_duck_period: float = attrs.field(default=DEFAULT_LAME_DUCK_PERIOD, validator=_non_negative)
    log_level: LogLevel = "info"
    #: PEM certificate (chain) and key: both set = wss:// on stream_listen, https:// on
    #: http_listen. Read at start (see gateway.config.load_server_tls).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: SO_REUSEPORT on the stream and HTTP listeners (gateway.listen): other processes that
    #: set it too (as the same user) may bind the same addresses. Read at start.
    reuse_port: bool = DEFAULT_REUSE_PORT

    def __attrs_post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both tls_cert_file and tls_key_file, or neither")
        if self.reuse_port:
            if not hasattr(socket, "SO_REUSEPORT"):
                raise ValueError(
                    "reuse_port = true needs SO_REUSEPORT, which this platform does not have"
                )
            port = self.stream_listen.port
            if port != 0 and port == self.http_listen.port:
                # Both sockets would bind and the kernel would hand HTTP requests to the
                # WebSocket listener and the other way round.
                raise ValueError(
                    f"with reuse_port = true, stream_listen and http_listen must not share a "
                    f"port (both use {port})"
                )

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


@attrs.frozen
class UpstreamSection:
    token_file: Path | None = None
    token_env: str | None = None
    connect_rate: float = attrs.field(default=DEFAULT_CONNECT_RATE, validator=_positive)
    backoff_initial: float = attrs.field(default=DEFAULT_BACKOFF_INITIAL, validator=_positive)
    backoff_max: float = attrs.field(default=DEFAULT_BACKOFF_MAX, validator=_positive)
    backoff_reset_after: float = attrs.field(
        default=DEFAULT_BACKOFF_RESET_AFTER, validator=_positive
    )
    stall_timeout: float = attrs.field(default=DEFAULT_STALL_TIMEOUT, validator=_positive)
    handshake_timeout: float = attrs.field(default=DEFAULT_HANDSHAKE_TIMEOUT, validator=_positive)
    unauthorized_retry: float = attrs.field(default=DEFAULT_UNAUTHORIZED_RETRY, validator=_positive)
    unauthorized_probe_interval: float = attrs.field(
        default=DEFAULT_UNAUTHORIZED_PROBE_INTERVAL, validator=_positive_finite
    )
    not_found_retry: float = attrs.field(default=DEFAULT_NOT_FOUND_RETRY, validator=_positive)
    client: UpstreamClient = "lean"

    def __attrs_post_init__(self) -> None:
        if (self.token_file is None) == (self.token_env is None):
            raise ValueError("set exactly one of token_file and token_env")
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max must be >= backoff_initial")

    def read_token(self) -> Secret:
        """Read the upstream token now (called on every connect attempt: tokens rotate).

        Raises :class:`~gateway.config.SecretError` naming the source, never the value.
        """
        if self.token_file is not None:
            return read_token_file(self.token_file)
        assert self.token_env is not None
        return read_token_env(self.token_env)


@attrs.frozen
class FeedConfig:
    """One upstream feed. ``name`` is the key of its ``[feeds.NAME]`` table."""

    kind: FeedKind
    url: str = attrs.field()
    path: str | None = None
    history: int = attrs.field(default=DEFAULT_HISTORY, validator=v.ge(0))
    history_bytes: int = attrs.field(default=DEFAULT_HISTORY_BYTES, validator=v.ge(0))
    on_demand: bool = False
    linger: float = attrs.field(default=DEFAULT_LINGER, validator=_non_negative)
    max_on_demand: int = attrs.field(default=DEFAULT_MAX_ON_DEMAND, validator=v.ge(1))
    # Not read from TOML (the table key is the name); Config fills it in.
    name: str = ""

    @url.validator
    def _check_url(self, attribute: attrs.Attribute[str], value: str) -> None:
        if _URL.match(value) is None:
            raise ValueError(f"url must be ws://HOST/PATH or wss://HOST/PATH, got {value!r}")
        if self.kind == "fastpath" and "{fixture}" not in value:
            raise ValueError("a fastpath feed url must contain {fixture}")
        if self.kind == "tracking" and "{fixture}" in value:
            raise ValueError("a tracking feed url must not contain {fixture}")

    def __attrs_post_init__(self) -> None:
        if self.path is not None and not self.path.startswith("/"):
            raise ValueError("path must start with '/'")

    @property
    def dropin_path(self) -> str:
        """The path of the vendor drop-in endpoint: ``path`` or the upstream URL's path."""
        if self.path is not None:
            return self.path
        m = _URL.match(self.url)
        assert m is not None
        return m["path"] or "/"

    def fixture_url(self, fixture: str) -> str:
        return self.url.replace("{fixture}", fixture)


@attrs.frozen
class FixtureConfig:
    feed: str
    id: str = attrs.field(validator=v.min_len(1))
    backfill: int = attrs.field(default=0, validator=v.ge(-1))

    @property
    def key(self) -> tuple[str, str]:
        return (self.feed, self.id)


@attrs.frozen
class SubscribersSection:
    queue_bytes: int = attrs.field(default=DEFAULT_QUEUE_BYTES, validator=v.ge(1024))
    slow_policy: SlowPolicy = "disconnect"
    max_connections: int = attrs.field(default=DEFAULT_MAX_CONNECTIONS, validator=v.ge(1))
    max_subscriptions: int = attrs.field(default=DEFAULT_MAX_SUBSCRIPTIONS, validator=v.ge(1))
    max_message_bytes: int = attrs.field(default=DEFAULT_MAX_MESSAGE_BYTES, validator=v.ge(256))
    handshake_timeout: float = attrs.field(
        default=DEFAULT_SUBSCRIBER_HANDSHAKE_TIMEOUT, validator=_positive
    )
    ping_interval: float = attrs.field(default=DEFAULT_PING_INTERVAL, validator=_positive)
    ping_timeout: float = attrs.field(default=DEFAULT_PING_TIMEOUT, validator=_positive)
    heartbeat_interval: float = attrs.field(default=DEFAULT_HEARTBEAT_INTERVAL, validator=_positive)
    max_client_frames_per_second: float = attrs.field(
        default=DEFAULT_MAX_CLIENT_FRAMES_PER_SECOND, validator=_positive_finite
    )
    client_frame_burst: int = attrs.field(default=DEFAULT_CLIENT_FRAME_BURST, validator=v.ge(1))
    #: Milliseconds a subscriber's frames may be held to be written together (one system call
    #: per batch instead of one per frame); 0 = every frame written at once (docs/dataplane.md).
    write_delay: int = attrs.field(default=0, validator=_write_delay)
    #: ``deflate``: permessage-deflate (no context takeover) for subscribers that offer it,
    #: each frame compressed once per topic and shared; ``off``: never negotiated.
    compression: Compression = "off"
    #: Subscriber tokens for both endpoints (format: gateway.config._tokens); None = open.
    tokens_file: Path | None = None

    def read_tokens(self, feeds: Iterable[str] | None = None) -> SubscriberTokens | None:
        """Read the subscriber tokens now, or None when access is open (no ``tokens_file``).

        Raises :class:`~gateway.config.SecretError` naming the file and line, never a token.
        """
        if self.tokens_file is None:
            return None
        return read_subscriber_tokens(self.tokens_file, feeds=feeds)


@attrs.frozen
class ApiSection:
    admin_tokens_file: Path | None = None
    read_tokens_file: Path | None = None
    max_fixtures: int = attrs.field(default=DEFAULT_API_MAX_FIXTURES, validator=v.ge(0))
    max_downloads: int = attrs.field(default=DEFAULT_API_MAX_DOWNLOADS, validator=v.ge(1))
    max_downloads_per_client: int = attrs.field(
        default=DEFAULT_API_MAX_DOWNLOADS_PER_CLIENT, validator=v.ge(1)
    )

    def read_admin_tokens(self) -> tuple[Secret, ...] | None:
        return None if self.admin_tokens_file is None else read_token_list(self.admin_tokens_file)

    def read_read_tokens(self) -> tuple[Secret, ...] | None:
        return None if self.read_tokens_file is None else read_token_list(self.read_tokens_file)


@attrs.frozen
class RecorderSection:
    """``[recorder]``: the append-only log of every followed fixture (enabled when ``dir`` is
    set). ``retention_days`` and ``max_bytes`` are both optional: the oldest fixtures' files go
    first (docs/recorder.md)."""

    dir: Path | None = None
    fsync_interval: float = attrs.field(
        default=DEFAULT_RECORDER_FSYNC_INTERVAL, validator=_positive_finite
    )
    retention_days: float | None = attrs.field(default=None, validator=v.optional(_positive_finite))
    max_bytes: int | None = attrs.field(default=None, validator=v.optional(v.ge(1024 * 1024)))
    segment_bytes: int = attrs.field(
        default=DEFAULT_RECORDER_SEGMENT_BYTES, validator=[v.ge(64 * 1024), v.le(1 << 30)]
    )
    queue_bytes: int = attrs.field(
        default=DEFAULT_RECORDER_QUEUE_BYTES, validator=v.ge(1024 * 1024)
    )

    @property
    def enabled(self) -> bool:
        return self.dir is not None


@attrs.frozen
class ReplaySection:
    """``[replay]``: the vendor's Replay Fixture Request and the ``/v1/stream`` replay op
    (docs/protocol.md). ``max_replays`` caps the dedicated vendor connections of drop-in
    replays the gateway cannot serve itself (0: never pass one through); ``max_local`` and
    ``max_per_connection`` cap the replays served from the recording or the memory history;
    ``queue_bytes`` is one replay's own byte budget and ``stall_timeout`` how long it waits on
    a client that reads nothing before it is ended (slow consumer)."""

    max_replays: int = attrs.field(default=DEFAULT_MAX_REPLAYS, validator=v.ge(0))
    max_local: int = attrs.field(default=DEFAULT_MAX_LOCAL_REPLAYS, validator=v.ge(0))
    max_per_connection: int = attrs.field(
        default=DEFAULT_MAX_REPLAYS_PER_CONNECTION, validator=v.ge(1)
    )
    queue_bytes: int = attrs.field(
        default=DEFAULT_REPLAY_QUEUE_BYTES, validator=[v.ge(64 * 1024), v.le(1 << 30)]
    )
    stall_timeout: float = attrs.field(
        default=DEFAULT_REPLAY_STALL_TIMEOUT, validator=_positive_finite
    )


@attrs.frozen
class ClusterSection:
    """``[cluster]``: several gateways as one, on Redis (docs/cluster.md). Absent: one node.

    Redis is ``redis_url``, or the primary that ``sentinels`` name for ``sentinel_master``
    (exactly one of the two). The password is never part of ``redis_url``: it comes from
    ``password_file`` or ``password_env`` and is read when connecting (a :class:`Secret`:
    never shown).
    ``instance`` names this process in the cluster; unset, the ``DDE_GATEWAY_INSTANCE``
    environment variable (the systemd template unit sets it), else ``hostname-pid``.
    """

    redis_url: str | None = attrs.field(default=None)
    sentinels: tuple[ListenAddress, ...] = attrs.field(default=())
    sentinel_master: str | None = attrs.field(default=None)
    instance: str | None = attrs.field(default=None)
    lease_ttl: float = attrs.field(default=DEFAULT_LEASE_TTL, validator=[v.ge(1.0), v.le(300.0)])
    stream_maxlen: int = attrs.field(default=DEFAULT_STREAM_MAXLEN, validator=v.ge(100))
    #: Default: DEFAULT_STREAM_RETENTION, or 3 x lease_ttl where that is longer.
    stream_retention: float = attrs.field(
        default=attrs.Factory(
            lambda self: max(DEFAULT_STREAM_RETENTION, MIN_RETENTION_TTLS * self.lease_ttl),
            takes_self=True,
        ),
        validator=[_positive_finite, v.le(30 * 86400.0)],
    )
    key_prefix: str = DEFAULT_KEY_PREFIX
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    append_queue_bytes: int = attrs.field(
        default=DEFAULT_APPEND_QUEUE_BYTES, validator=v.ge(1024 * 1024)
    )
    redis_timeout: float = attrs.field(
        default=DEFAULT_REDIS_TIMEOUT, validator=[_positive_finite, v.le(60.0)]
    )
    batch_interval: float = attrs.field(
        default=DEFAULT_BATCH_INTERVAL, validator=[_non_negative, v.le(0.1)]
    )
    #: Hot standby: a second instance per fixture keeps a warm vendor connection and takes
    #: over without a reconnect when the owner dies (two vendor connections per fixture).
    standby: bool = False

    @redis_url.validator
    def _check_url(self, attribute: attrs.Attribute[str | None], value: str | None) -> None:
        if value is None:
            return
        if _REDIS_URL.match(value) is None:
            raise ValueError(
                "redis_url must be redis://HOST:PORT[/DB], rediss://HOST:PORT[/DB] or "
                "unix:///PATH, without user or password (use password_file or password_env)"
            )
        if "@" in value.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("redis_url must not contain a user or password: use password_file")

    @sentinels.validator
    def _check_sentinels(
        self, attribute: attrs.Attribute[Any], value: tuple[ListenAddress, ...]
    ) -> None:
        for address in value:
            if address.port == 0:
                raise ValueError(f"sentinels: {address} has no port (0): give the sentinel's port")
        if len(set(value)) != len(value):
            raise ValueError("sentinels: an address is listed twice")

    @sentinel_master.validator
    def _check_master(self, attribute: attrs.Attribute[str | None], value: str | None) -> None:
        if value is not None and _KEY_PREFIX.match(value) is None:
            raise ValueError(
                "sentinel_master must be 1-64 of A-Z a-z 0-9 . _ : - (the name the sentinels "
                "monitor)"
            )

    @instance.validator
    def _check_instance(self, attribute: attrs.Attribute[str | None], value: str | None) -> None:
        if value is not None and _KEY_PREFIX.match(value) is None:
            raise ValueError(
                "instance must be 1-64 of A-Z a-z 0-9 . _ : - (starting with a letter or digit)"
            )

    def __attrs_post_init__(self) -> None:
        if _KEY_PREFIX.match(self.key_prefix) is None:
            raise ValueError("key_prefix must be 1-64 of A-Z a-z 0-9 . _ : -")
        if (self.redis_url is None) == (not self.sentinels):
            raise ValueError("set exactly one of redis_url and sentinels")
        if self.sentinels and self.sentinel_master is None:
            raise ValueError("sentinel_master is required with sentinels")
        if self.sentinel_master is not None and not self.sentinels:
            raise ValueError("sentinel_master is only used with sentinels")
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("set at most one of password_file and password_env")
        # A round that waits redis_timeout for a silent Redis must end (the instance turns
        # degraded and keeps its upstreams) before its leases run out locally (it would stop
        # them all): docs/cluster.md.
        if self.stream_retention < MIN_RETENTION_TTLS * self.lease_ttl:
            raise ValueError(
                f"stream_retention ({self.stream_retention:g} s) must be at least "
                f"{MIN_RETENTION_TTLS} x lease_ttl ({MIN_RETENTION_TTLS * self.lease_ttl:g} s): "
                "a takeover resumes from the stream"
            )
        budget = lease_validity(self.lease_ttl) - lease_round_interval(self.lease_ttl)
        if self.redis_timeout >= budget:
            raise ValueError(
                f"redis_timeout ({self.redis_timeout:g} s) must be below {budget:g} s for a "
                f"lease_ttl of {self.lease_ttl:g} s: raise lease_ttl or lower redis_timeout"
            )

    @property
    def redis_where(self) -> str:
        """Where Redis is, for people (no password is ever part of it)."""
        if self.redis_url is not None:
            return self.redis_url
        names = ",".join(str(a) for a in self.sentinels)
        return f"sentinel master {self.sentinel_master} via {names}"

    def read_password(self) -> Secret | None:
        """The Redis password now, or None (no password configured). Raises
        :class:`~gateway.config.SecretError` naming the source, never the value."""
        if self.password_file is not None:
            return read_token_file(self.password_file)
        if self.password_env is not None:
            return read_token_env(self.password_env)
        return None


def _named_feeds(feeds: dict[str, FeedConfig]) -> dict[str, FeedConfig]:
    return {name: attrs.evolve(feed, name=name) for name, feed in feeds.items()}


@attrs.frozen
class Config:
    upstream: UpstreamSection
    gateway: GatewaySection = GatewaySection()
    feeds: dict[str, FeedConfig] = attrs.field(factory=dict, converter=_named_feeds)
    fixtures: tuple[FixtureConfig, ...] = ()
    subscribers: SubscribersSection = SubscribersSection()
    api: ApiSection = ApiSection()
    recorder: RecorderSection = RecorderSection()
    replay: ReplaySection = ReplaySection()
    #: None: a single node (no Redis).
    cluster: ClusterSection | None = None

    def __attrs_post_init__(self) -> None:
        problems: list[str] = []
        seen: set[tuple[str, str]] = set()
        for i, fx in enumerate(self.fixtures):
            if fx.feed not in self.feeds:
                known = ", ".join(sorted(self.feeds)) or "none"
                problems.append(
                    f"fixtures[{i}].feed: unknown feed {fx.feed!r} (configured feeds: {known})"
                )
            if fx.key in seen:
                problems.append(
                    f"fixtures[{i}]: fixture {fx.id!r} of feed {fx.feed!r} is listed twice"
                )
            seen.add(fx.key)
        paths: dict[str, str] = {}
        for name, feed in self.feeds.items():
            p = feed.dropin_path
            if p == "/v1/stream":
                problems.append(f"feeds.{name}: drop-in path /v1/stream is reserved; set path")
                continue
            # fastpath paths carry {fixture}; compare the template text.
            if p in paths:
                problems.append(
                    f"feeds.{name}: drop-in path {p!r} collides with feed {paths[p]!r}; "
                    "set path on one of them"
                )
            paths[p] = name
        if problems:
            raise ConfigProblems(problems)
