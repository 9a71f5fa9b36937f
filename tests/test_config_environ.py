"""Config keys from the environment (``DDE_GATEWAY_<SECTION>_<KEY>``) and ``dde-gateway config``
(the effective configuration; ``--defaults``: every key with its default and meaning).

Rules: files in tmp_path; the environment given explicitly (``environ=``) or by monkeypatch;
one subprocess, for the real environment of a real process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest
import tomli_w

from gateway.cli import main
from gateway.config import (
    HELP,
    ApiSection,
    ClusterSection,
    Config,
    ConfigError,
    FeedConfig,
    FixtureConfig,
    GatewaySection,
    ListenAddress,
    RecorderSection,
    ReplaySection,
    SubscribersSection,
    UpstreamSection,
    config_keys,
    env_name,
    load_config,
    structure_config,
)
from tests.conftest import TEST_TOKEN

FILE: dict[str, Any] = {
    "upstream": {"token_env": "DDE_TOKEN"},
    "subscribers": {"queue_bytes": 2 * 1024 * 1024, "max_connections": 7},
    "feeds": {
        "live-tracking": {"kind": "tracking", "url": "ws://127.0.0.1:1/ws/tracking"},
    },
    "fixtures": [{"feed": "live-tracking", "id": "f1"}],
}


def _file(tmp_path: Path, data: dict[str, Any] = FILE) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def _errors(path: Path | None, environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ)
    return info.value.errors


def test_the_environment_wins_over_the_file(tmp_path: Path) -> None:
    """Each kind of key: a number (TOML), text as written (an address), a list, a feed's key
    by its upper-cased name, a new feed, the fixtures list, a table the file does not have."""
    environ = {
        "DDE_GATEWAY_SUBSCRIBERS_QUEUE_BYTES": "4194304",
        "DDE_GATEWAY_GATEWAY_STREAM_LISTEN": "0.0.0.0:9000",
        "DDE_GATEWAY_GATEWAY_REUSE_PORT": "true",
        "DDE_GATEWAY_FEEDS_LIVE_TRACKING_MAX_ON_DEMAND": "3",
        "DDE_GATEWAY_FEEDS_ACTIONS_KIND": "fastpath",
        "DDE_GATEWAY_FEEDS_ACTIONS_URL": "ws://127.0.0.1:1/ws/{fixture}/actions",
        "DDE_GATEWAY_FIXTURES": '[{feed = "actions", id = "f2", backfill = -1}]',
        "DDE_GATEWAY_CLUSTER_SENTINELS": '["127.0.0.1:26379", "127.0.0.2:26379"]',
        "DDE_GATEWAY_CLUSTER_SENTINEL_MASTER": "dde",
        "DDE_GATEWAY_CLUSTER_PASSWORD_ENV": "REDIS_PW",
        # Not config keys (read by their own code): left alone.
        "DDE_GATEWAY_INSTANCE": "a",
        "DDE_GATEWAY_SLOW_STEPS": "1",
        "OTHER": "x",
    }
    config = load_config(_file(tmp_path), environ=environ)
    assert config.subscribers.queue_bytes == 4 * 1024 * 1024
    assert config.subscribers.max_connections == 7  # the file's, not overridden
    assert config.gateway.stream_listen == ListenAddress("0.0.0.0", 9000)
    assert config.gateway.reuse_port is True
    assert config.feeds["live-tracking"].max_on_demand == 3
    assert config.feeds["actions"].kind == "fastpath"
    assert [(f.feed, f.id, f.backfill) for f in config.fixtures] == [("actions", "f2", -1)]
    assert config.cluster is not None
    assert config.cluster.sentinels == (
        ListenAddress("127.0.0.1", 26379),
        ListenAddress("127.0.0.2", 26379),
    )
    assert config.cluster.password_env == "REDIS_PW"
    assert (
        env_name("feeds", "live-tracking", "history") == "DDE_GATEWAY_FEEDS_LIVE_TRACKING_HISTORY"
    )
    # Without a file: the environment over defaults.
    only = load_config(None, environ={"DDE_GATEWAY_UPSTREAM_TOKEN_ENV": "T"})
    assert only == Config(upstream=UpstreamSection(token_env="T"))


def test_a_bad_variable_is_an_error_naming_it_never_its_value(tmp_path: Path) -> None:
    """Every bad variable in one error list, each named; a value is never quoted back (one
    could be a token put where it does not belong)."""
    environ = {
        "DDE_GATEWAY_UPSTREAM_TOKEN": TEST_TOKEN,  # no such key: tokens never come inline
        "DDE_GATEWAY_SUBSCRIBERS_QUEUE_BYTES": "4MB",  # not a TOML value
        "DDE_GATEWAY_SUBSCRIBERS_MAX_CONNECTIONS": "1\nmax_subscriptions = 2",  # smuggled key
        "DDE_GATEWAY_FEEDS_LIVE_TRACKING": "1",  # no key
        "DDE_GATEWAY_REPLAY_MAX_LOCAL": "-1",  # out of range
        "DDE_GATEWAY_API_MAX_FIXTURES": '"many"',  # wrong type
    }
    errors = _errors(_file(tmp_path), environ)
    assert len(errors) == len(environ), errors
    for name in environ:
        assert any(name in e for e in errors), (name, errors)
    assert any(
        e.startswith("DDE_GATEWAY_UPSTREAM_TOKEN: [upstream] has no key 'token'") for e in errors
    )
    assert any(
        e.endswith("(from DDE_GATEWAY_REPLAY_MAX_LOCAL) @ $.replay.max_local") for e in errors
    )
    assert any("(from DDE_GATEWAY_API_MAX_FIXTURES) @ $.api.max_fixtures" in e for e in errors)
    assert TEST_TOKEN not in "\n".join(errors)


def test_config_prints_the_effective_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``dde-gateway config PATH``: every key with its value, defaults included, the environment
    applied; parsing the output gives the same config. No secret's value, only its source."""
    token = tmp_path / "subscriber-tokens"
    token.write_text(TEST_TOKEN + "\n")
    token.chmod(0o600)
    data = {**FILE, "subscribers": {**FILE["subscribers"], "tokens_file": str(token)}}
    path = _file(tmp_path, data)
    monkeypatch.setenv("DDE_TOKEN", TEST_TOKEN)
    monkeypatch.setenv("DDE_GATEWAY_CLUSTER_REDIS_URL", "redis://127.0.0.1:6379")
    monkeypatch.setenv("DDE_GATEWAY_CLUSTER_PASSWORD_ENV", "DDE_TOKEN")
    assert main(["config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "connect_rate = 5.0" in out and 'redis_url = "redis://127.0.0.1:6379"' in out
    assert "# tls_cert_file: unset" in out
    assert structure_config(tomllib.loads(out)) == load_config(path)
    assert TEST_TOKEN not in out
    monkeypatch.setenv("DDE_GATEWAY_SUBSCRIBERS_QUEUE_BYTES", "1")
    assert main(["config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{path}: error: ") and "DDE_GATEWAY_SUBSCRIBERS_QUEUE_BYTES" in err


def _uncomment(block: str) -> str:
    """A commented-out table of the defaults file, as it reads with one ``#`` taken off."""
    return "\n".join(line.removeprefix("#") for line in block.splitlines())


def test_config_defaults_is_every_key_and_round_trips(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``dde-gateway config --defaults``: every key of the model with its meaning and default;
    it parses, and (with the one choice it leaves open, the token's source) gives the default
    config back; so do its commented-out tables once uncommented and their required keys set."""
    assert main(["config", "--defaults"]) == 0
    text = capsys.readouterr().out
    tables: dict[str, type] = {
        "gateway": GatewaySection,
        "upstream": UpstreamSection,
        "feeds": FeedConfig,
        "fixtures": FixtureConfig,
        "subscribers": SubscribersSection,
        "api": ApiSection,
        "recorder": RecorderSection,
        "replay": ReplaySection,
        "cluster": ClusterSection,
    }
    model = {f"{section}.{f.name}" for section, table in tables.items() for f in config_keys(table)}
    assert set(HELP) == model
    for key, meaning in HELP.items():
        assert f"# {meaning}\n" in text, key
    parsed = tomllib.loads(text)
    assert set(parsed) == {"gateway", "upstream", "subscribers", "api", "recorder", "replay"}
    parsed["upstream"]["token_env"] = "DDE_TOKEN"
    assert structure_config(parsed) == Config(upstream=UpstreamSection(token_env="DDE_TOKEN"))
    cluster_block = text[text.index("#[cluster]") :]
    cluster = tomllib.loads(_uncomment(cluster_block))["cluster"]
    cluster["redis_url"] = "redis://127.0.0.1:6379"
    rebuilt = structure_config({**parsed, "cluster": cluster}).cluster
    assert rebuilt == ClusterSection(redis_url="redis://127.0.0.1:6379")
    feed_block = text[text.index("#[feeds.NAME]") : text.index("#[[fixtures]]")]
    feed = tomllib.loads(_uncomment(feed_block))["feeds"]["NAME"]
    feed.update(kind="tracking", url="ws://127.0.0.1:1/t")
    built = structure_config({**parsed, "feeds": {"NAME": feed}}).feeds["NAME"]
    assert built == attrs.evolve(FeedConfig(kind="tracking", url="ws://127.0.0.1:1/t"), name="NAME")
    assert main(["config", "--defaults", "x.toml"]) == 2


def test_check_config_sees_the_processs_environment(tmp_path: Path) -> None:
    """A real process: the variable of its environment is applied (and named when wrong)."""
    path = _file(tmp_path)
    env = {**os.environ, "DDE_GATEWAY_SUBSCRIBERS_QUEUE_BYTES": "100"}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 2, done
    assert done.stderr == (
        f"{path}: error: 'queue_bytes' must be >= 1024: 100 "
        "(from DDE_GATEWAY_SUBSCRIBERS_QUEUE_BYTES) @ $.subscribers.queue_bytes\n"
    )
