"""Configuration loading and `dde-gateway check-config`: strict types, unknown keys, field paths,
secrets that never leak.

Rules: pure functions and files in tmp_path only; every error asserted by its field path.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.config import (
    DEFAULT_REUSE_PORT,
    ConfigError,
    ListenAddress,
    Secret,
    SecretError,
    load_config,
    structure_config,
)
from tests.conftest import TEST_TOKEN

REPO = Path(__file__).resolve().parent.parent


def minimal(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "upstream": {"token_env": "DDE_TOKEN"},
        "feeds": {
            "tracking": {
                "kind": "tracking",
                "url": "ws://127.0.0.1:1/ws/soccer/tracking/low_latency",
            }
        },
        "fixtures": [{"feed": "tracking", "id": "f1"}],
    }
    data.update(over)
    return data


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        structure_config(data)
    return info.value.errors


def test_minimal_config_gets_defaults() -> None:
    cfg = structure_config(minimal())
    assert cfg.gateway.stream_listen == ListenAddress("127.0.0.1", 8765)
    assert cfg.gateway.http_listen == ListenAddress("127.0.0.1", 8780)
    assert cfg.upstream.connect_rate == 5.0
    assert cfg.upstream.unauthorized_probe_interval == 1.0
    assert cfg.upstream.unauthorized_retry == 60.0
    assert cfg.feeds["tracking"].name == "tracking"
    assert cfg.feeds["tracking"].history == 1500
    assert cfg.fixtures[0].backfill == 0
    assert cfg.subscribers.slow_policy == "disconnect"
    assert cfg.subscribers.queue_bytes == 4 * 1024 * 1024
    assert cfg.subscribers.max_client_frames_per_second == 100.0
    assert cfg.subscribers.client_frame_burst == 1000
    assert (cfg.api.max_downloads, cfg.api.max_downloads_per_client) == (16, 4)


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"upstream": {"token_env": "X", "connect_rate": "5"}}, "$.upstream.connect_rate"),
        ({"upstream": {"token_env": "X", "connect_rate": True}}, "$.upstream.connect_rate"),
        ({"upstream": {"token_env": "X", "bogus": 1}}, "unknown key(s): bogus @ $.upstream"),
        (
            {"upstream": {"token_env": "X", "unauthorized_probe_interval": 0}},
            "unauthorized_probe_interval must be > 0",
        ),
        (
            {"upstream": {"token_env": "X", "unauthorized_probe_interval": float("inf")}},
            "unauthorized_probe_interval must be finite",
        ),
        (
            {"upstream": {"token_env": "X", "unauthorized_probe_interval": "2"}},
            "$.upstream.unauthorized_probe_interval",
        ),
        ({"gateway": {"stream_listen": 8765}}, "$.gateway.stream_listen"),
        ({"gateway": {"stream_listen": "localhost"}}, "$.gateway.stream_listen"),
        ({"gateway": {"http_listen": "127.0.0.1:99999"}}, "$.gateway.http_listen"),
        ({"subscribers": {"queue_bytes": 4.5}}, "$.subscribers.queue_bytes"),
        ({"subscribers": {"slow_policy": "ignore"}}, "$.subscribers.slow_policy"),
        (
            {"subscribers": {"max_client_frames_per_second": 0}},
            "max_client_frames_per_second must be > 0",
        ),
        (
            {"subscribers": {"max_client_frames_per_second": float("inf")}},
            "max_client_frames_per_second must be finite",
        ),
        (
            {"subscribers": {"max_client_frames_per_second": "100"}},
            "$.subscribers.max_client_frames_per_second",
        ),
        ({"subscribers": {"client_frame_burst": 0}}, "'client_frame_burst' must be >= 1"),
        ({"subscribers": {"client_frame_burst": 10.5}}, "$.subscribers.client_frame_burst"),
        ({"subscribers": {"client_frame_burst": True}}, "$.subscribers.client_frame_burst"),
        (
            {"fixtures": [{"feed": "tracking", "id": "x", "backfill": "10"}]},
            "$.fixtures[0].backfill",
        ),
        ({"fixtures": [{"feed": "tracking", "id": "x", "backfill": -2}]}, "$.fixtures[0]"),
        ({"fixtures": [{"feed": "tracking"}]}, "required field missing @ $.fixtures[0].id"),
        ({"nonsense": {}}, "unknown key(s): nonsense @ $"),
        (
            {"feeds": {"t": {"kind": "tracking", "url": "ws://h/t", "max_on_demand": 0}}},
            "must be >= 1: 0 @ $.feeds['t']",
        ),
        (
            {"feeds": {"t": {"kind": "tracking", "url": "ws://h/t", "max_on_demand": "5"}}},
            "$.feeds['t'].max_on_demand",
        ),
        ({"api": {"max_downloads": 0}}, "'max_downloads' must be >= 1: 0 @ $.api"),
        ({"api": {"max_downloads_per_client": "4"}}, "$.api.max_downloads_per_client"),
    ],
)
def test_type_and_key_errors_name_their_path(patch: dict[str, Any], expected: str) -> None:
    errors = errors_of(minimal(**patch))
    assert any(expected in e for e in errors), errors


def test_every_error_is_reported_at_once() -> None:
    errors = errors_of(
        minimal(
            upstream={"token_env": "X", "connect_rate": "fast"},
            gateway={"drain_timeout": "soon"},
            subscribers={"max_connections": 1.0},
        )
    )
    assert len(errors) == 3, errors


def test_feed_rules() -> None:
    bad_kind = {"t": {"kind": "trackin", "url": "ws://h/p"}}
    assert any("$.feeds['t'].kind" in e for e in errors_of(minimal(feeds=bad_kind, fixtures=[])))
    no_placeholder = {"a": {"kind": "fastpath", "url": "ws://h/soccer/fixtures/x/actions"}}
    errs = errors_of(minimal(feeds=no_placeholder, fixtures=[]))
    assert any("{fixture}" in e and "$.feeds['a']" in e for e in errs), errs
    http = {"t": {"kind": "tracking", "url": "http://h/p"}}
    assert any("ws://" in e for e in errors_of(minimal(feeds=http, fixtures=[])))
    named = {"t": {"kind": "tracking", "url": "ws://h/p", "name": "x"}}
    assert any("unknown key(s): name" in e for e in errors_of(minimal(feeds=named, fixtures=[])))


def test_cross_field_rules() -> None:
    assert any("exactly one of" in e for e in errors_of(minimal(upstream={})))
    both = {"token_env": "A", "token_file": "/x"}
    assert any("exactly one of" in e for e in errors_of(minimal(upstream=both)))
    unknown_feed = [{"feed": "nope", "id": "x"}]
    assert any("unknown feed 'nope'" in e for e in errors_of(minimal(fixtures=unknown_feed)))
    twice = [{"feed": "tracking", "id": "x"}, {"feed": "tracking", "id": "x"}]
    assert any("listed twice" in e for e in errors_of(minimal(fixtures=twice)))
    same_path = {
        "a": {"kind": "tracking", "url": "ws://h1/ws/x"},
        "b": {"kind": "tracking", "url": "ws://h2/ws/x"},
    }
    assert any("collides" in e for e in errors_of(minimal(feeds=same_path, fixtures=[])))
    same_path["b"]["path"] = "/ws/b"
    assert structure_config(minimal(feeds=same_path, fixtures=[])).feeds["b"].dropin_path == "/ws/b"


def test_reuse_port_key() -> None:
    assert structure_config(minimal()).gateway.reuse_port is DEFAULT_REUSE_PORT is False
    on = structure_config(minimal(gateway={"reuse_port": True})).gateway
    assert on.reuse_port is True
    assert (on.stream_listen.port, on.http_listen.port) == (8765, 8780)
    # Port 0 on both listeners is fine: each process gets free ports of its own.
    both_zero = {"reuse_port": True, "stream_listen": "127.0.0.1:0", "http_listen": "[::1]:0"}
    assert structure_config(minimal(gateway=both_zero)).gateway.reuse_port is True
    for wrong in (1, "true", "yes"):
        errors = errors_of(minimal(gateway={"reuse_port": wrong}))
        assert any("expected true or false" in e and "$.gateway.reuse_port" in e for e in errors)


def test_reuse_port_with_one_port_for_both_listeners_is_an_error() -> None:
    # Both sockets would bind, and the kernel would mix WebSocket and HTTP connections.
    same = {"reuse_port": True, "stream_listen": "127.0.0.1:9000", "http_listen": "0.0.0.0:9000"}
    errors = errors_of(minimal(gateway=same))
    assert any("must not share a port (both use 9000) @ $.gateway" in e for e in errors), errors


def test_reuse_port_on_a_platform_without_so_reuseport_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(socket, "SO_REUSEPORT", raising=False)
    errors = errors_of(minimal(gateway={"reuse_port": True}))
    assert any("needs SO_REUSEPORT" in e and "@ $.gateway" in e for e in errors), errors
    assert structure_config(minimal()).gateway.reuse_port is False  # off: no need for it


def test_listen_address_forms() -> None:
    assert ListenAddress.parse("[::1]:0") == ListenAddress("::1", 0)
    assert str(ListenAddress("::1", 80)) == "[::1]:80"
    assert str(ListenAddress.parse("0.0.0.0:8765")) == "0.0.0.0:8765"
    with pytest.raises(ValueError):
        ListenAddress.parse("[::zz]:80")


def test_shipped_configs_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    for path in sorted((REPO / "config").glob("*.toml")):
        cfg = load_config(path)
        assert cfg.feeds, path


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[upstream\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_token_is_read_fresh_and_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TEST_TOKEN + "\n")
    monkeypatch.setenv("TOKDIR", str(tmp_path))
    cfg = structure_config(minimal(upstream={"token_file": "${TOKDIR}/token"}))
    secret = cfg.upstream.read_token()
    assert secret.reveal() == TEST_TOKEN
    for text in (repr(secret), str(secret), f"{secret}", repr(cfg), str(cfg)):
        assert TEST_TOKEN not in text
    token_file.write_text("rotated")
    assert cfg.upstream.read_token().reveal() == "rotated"
    token_file.write_text("  \n")
    with pytest.raises(SecretError, match="empty"):
        cfg.upstream.read_token()
    token_file.unlink()
    with pytest.raises(SecretError, match="cannot read token file") as info:
        cfg.upstream.read_token()
    assert TEST_TOKEN not in str(info.value)


def test_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = structure_config(minimal())
    monkeypatch.delenv("DDE_TOKEN", raising=False)
    with pytest.raises(SecretError, match="DDE_TOKEN"):
        cfg.upstream.read_token()
    monkeypatch.setenv("DDE_TOKEN", TEST_TOKEN)
    assert cfg.upstream.read_token().matches(TEST_TOKEN)
    assert not Secret("a").matches("b")
    assert os.environ["DDE_TOKEN"] == TEST_TOKEN


def test_check_config_command_prints_every_error_with_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``dde-gateway check-config``: every error with its field path on stderr, exit 2; a good
    file is one line on stdout, exit 0."""
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[upstream]\ntoken_env = "DDE_TOKEN"\nconnect_rate = "5"\nbogus = 1\n'
        '[feeds.t]\nkind = "tracking"\nurl = "ws://h/p"\n'
        '[[fixtures]]\nfeed = "t"\nid = "x"\nbackfill = 1.5\n'
    )
    assert main(["check-config", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"{bad}: error: ") for line in lines), err
    for path in ("$.upstream.connect_rate", "unknown key(s): bogus @ $.upstream"):
        assert path in err, err
    assert "$.fixtures[0].backfill" in err, err
    assert main(["check-config", str(REPO / "config" / "demo.toml")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{REPO / 'config' / 'demo.toml'}: ok") and err == ""
    assert main(["check-config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ("[upstream]\ntoken_env = 'T'\nx = " + "[" * 400 + "]" * 400 + "\n", "unknown key"),
        ("\xff\xfe", "not valid TOML"),
    ],
)
def test_hostile_files_are_config_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    """Any file, however built, is a ConfigError with a message: never a crash, never a traceback.

    The first one made tomllib raise RecursionError, which escaped load_config: on SIGHUP the
    service died without closing its subscribers, and check-config printed a traceback.
    """
    bad = tmp_path / "bad.toml"
    bad.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert any(expected in e for e in info.value.errors), info.value.errors
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_cluster_section_defaults_and_rules() -> None:
    """``[cluster]``: absent = a single node; present, its defaults; a password is never part of
    the URL; the recorder goes with it (each instance records what it serves)."""
    assert structure_config(minimal()).cluster is None
    cfg = structure_config(minimal(cluster={"redis_url": "redis://127.0.0.1:6379/0"}))
    assert cfg.cluster is not None
    assert (cfg.cluster.lease_ttl, cfg.cluster.stream_maxlen) == (10.0, 20_000)
    assert (cfg.cluster.key_prefix, cfg.cluster.instance) == ("dde", None)
    assert cfg.cluster.stream_retention == 600.0
    # A long lease: the default retention outlives three of them (no error for a default).
    long = structure_config(
        minimal(cluster={"redis_url": "redis://127.0.0.1:6379/0", "lease_ttl": 300.0})
    )
    assert long.cluster is not None and long.cluster.stream_retention == 900.0
    for url in ("rediss://redis.internal:6380/2", "unix:///run/redis/redis.sock"):
        assert structure_config(minimal(cluster={"redis_url": url})).cluster is not None
    for url, word in (
        ("redis://:secret@127.0.0.1:6379/0", "password"),
        ("redis://user:pw@127.0.0.1:6379", "password"),
        ("http://127.0.0.1:6379", "redis://"),
        ("redis://127.0.0.1:6379/0?password=x", "redis://"),
    ):
        (error,) = errors_of(minimal(cluster={"redis_url": url}))
        assert word in error and "$.cluster" in error, error
        assert "secret" not in error and "pw@" not in error
    for over, word in (
        ({"lease_ttl": 0.5}, "lease_ttl"),
        ({"stream_maxlen": 10}, "stream_maxlen"),
        ({"stream_retention": 0}, "stream_retention"),
        # A takeover resumes from the stream: it must outlive a few leases.
        ({"lease_ttl": 10.0, "stream_retention": 20.0}, "at least 3 x lease_ttl (30 s)"),
        ({"instance": "a b"}, "instance"),
        ({"key_prefix": ""}, "key_prefix"),
        ({"password_file": "/x", "password_env": "X"}, "at most one"),
    ):
        errors = errors_of(minimal(cluster={"redis_url": "redis://h:1", **over}))
        assert any(word in e for e in errors), errors
    both = structure_config(
        minimal(cluster={"redis_url": "redis://h:1"}, recorder={"dir": "/tmp/recordings"})
    )
    assert both.cluster is not None and both.recorder.enabled


def test_cluster_through_sentinels() -> None:
    """``sentinels`` (a list of HOST:PORT) and ``sentinel_master`` instead of ``redis_url``:
    exactly one of the two ways, the master's name with the sentinels, each address checked
    with its index in the path."""
    ok = {"sentinels": ["10.0.0.1:26379", "[::1]:26380", "s3:26381"], "sentinel_master": "m-1"}
    cfg = structure_config(minimal(cluster=ok))
    assert cfg.cluster is not None and cfg.cluster.redis_url is None
    assert cfg.cluster.sentinels == (
        ListenAddress("10.0.0.1", 26379),
        ListenAddress("::1", 26380),
        ListenAddress("s3", 26381),
    )
    assert cfg.cluster.redis_where == (
        "sentinel master m-1 via 10.0.0.1:26379,[::1]:26380,s3:26381"
    )
    for cluster, expected in (
        ({**ok, "sentinels": ["h:1", "nohost"]}, "got 'nohost' @ $.cluster.sentinels[1]"),
        ({**ok, "sentinels": ["h:70000"]}, "out of range 0..65535 @ $.cluster.sentinels[0]"),
        ({**ok, "sentinels": "h:1"}, "expected a list of HOST:PORT strings, got str"),
        ({**ok, "sentinels": ["h:0"]}, "sentinels: h:0 has no port (0)"),
        ({**ok, "sentinels": ["h:1", "h:1"]}, "an address is listed twice @ $.cluster"),
        ({**ok, "sentinels": []}, "set exactly one of redis_url and sentinels @ $.cluster"),
        ({**ok, "redis_url": "redis://h:1"}, "set exactly one of redis_url and sentinels"),
        ({"sentinel_master": "m"}, "set exactly one of redis_url and sentinels"),
        ({"sentinels": ["h:1"]}, "sentinel_master is required with sentinels @ $.cluster"),
        ({"redis_url": "redis://h:1", "sentinel_master": "m"}, "only used with sentinels"),
        ({**ok, "sentinel_master": "a b"}, "sentinel_master must be 1-64 of"),
    ):
        errors = errors_of(minimal(cluster=cluster))
        assert any(expected in e for e in errors), (cluster, errors)


def test_cluster_password_file_is_checked_and_never_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config reads the Redis password file (exit 2 naming the field when it cannot);
    the password itself appears nowhere."""
    config = tmp_path / "gw.toml"
    base = (
        '[upstream]\ntoken_env = "DDE_TOKEN"\n'
        '[feeds.t]\nkind = "tracking"\nurl = "ws://h/p"\n'
        '[cluster]\nredis_url = "redis://127.0.0.1:6379/0"\n'
    )
    config.write_text(base + f'password_file = "{tmp_path / "missing"}"\n')
    assert main(["check-config", str(config)]) == 2
    assert "$.cluster.password_file" in capsys.readouterr().err
    secret = tmp_path / "redis-password"
    secret.write_text("hunter2-redis\n")
    config.write_text(base + f'password_file = "{secret}"\n')
    assert main(["check-config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert "cluster via redis://127.0.0.1:6379/0" in out
    assert "hunter2" not in out + err
    cfg = structure_config(
        minimal(cluster={"redis_url": "redis://h:1", "password_file": str(secret)})
    )
    assert cfg.cluster is not None
    password = cfg.cluster.read_password()
    assert password is not None and password.reveal() == "hunter2-redis"
    assert "hunter2" not in repr(cfg) + repr(password) + str(password)


def test_cluster_redis_timeout_must_fit_in_the_lease() -> None:
    """A round waiting ``redis_timeout`` for a silent Redis must end before the leases run out
    locally (docs/cluster.md): a lease_ttl of 3 s leaves 1.65 s."""
    errors = errors_of(minimal(cluster={"redis_url": "redis://h:1", "lease_ttl": 3.0}))
    assert any("redis_timeout (2 s) must be below 1.65 s" in e for e in errors), errors
    ok = minimal(cluster={"redis_url": "redis://h:1", "lease_ttl": 3.0, "redis_timeout": 1.5})
    assert structure_config(ok).cluster is not None
