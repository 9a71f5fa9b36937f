"""Configuration: a strict TOML file turned into frozen attrs objects.

Everything public is re-exported here; the implementation lives in private one-concept modules.
"""

from gateway.config._convert import (
    ConfigError,
    config_to_dict,
    load_config,
    make_converter,
    structure_config,
)
from gateway.config._files import load_server_tls, load_subscriber_tokens
from gateway.config._model import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HTTP_LISTEN,
    DEFAULT_RECORDER_FSYNC_INTERVAL,
    DEFAULT_RECORDER_QUEUE_BYTES,
    DEFAULT_RECORDER_SEGMENT_BYTES,
    DEFAULT_REUSE_PORT,
    DEFAULT_STREAM_LISTEN,
    MAX_WRITE_DELAY_MS,
    ApiSection,
    Compression,
    Config,
    FeedConfig,
    FeedKind,
    FixtureConfig,
    GatewaySection,
    ListenAddress,
    RecorderSection,
    SlowPolicy,
    SubscribersSection,
    UpstreamSection,
)
from gateway.config._secret import (
    REDACTED,
    Secret,
    SecretError,
    any_matches,
    expand_path,
    read_token_file,
)
from gateway.config._tokens import (
    SubscriberTokens,
    TokenGrant,
    parse_subscriber_tokens,
    read_subscriber_tokens,
)

__all__ = [
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_HTTP_LISTEN",
    "DEFAULT_RECORDER_FSYNC_INTERVAL",
    "DEFAULT_RECORDER_QUEUE_BYTES",
    "DEFAULT_RECORDER_SEGMENT_BYTES",
    "DEFAULT_REUSE_PORT",
    "DEFAULT_STREAM_LISTEN",
    "MAX_WRITE_DELAY_MS",
    "REDACTED",
    "ApiSection",
    "Compression",
    "Config",
    "ConfigError",
    "FeedConfig",
    "FeedKind",
    "FixtureConfig",
    "GatewaySection",
    "ListenAddress",
    "RecorderSection",
    "Secret",
    "SecretError",
    "SlowPolicy",
    "SubscriberTokens",
    "SubscribersSection",
    "TokenGrant",
    "UpstreamSection",
    "any_matches",
    "config_to_dict",
    "expand_path",
    "load_config",
    "load_server_tls",
    "load_subscriber_tokens",
    "make_converter",
    "parse_subscriber_tokens",
    "read_subscriber_tokens",
    "read_token_file",
    "structure_config",
]
