"""``check-config`` is ``run``'s start-up path (gateway.service.preflight): every way ``run``
refuses a config, ``check-config`` names - with the same line, exit 2, never a traceback - and
every problem of a file comes out in one run.

Rules: real files in tmp_path (token files, certificates from ``trustme``, symlinks); ``run``
in-process for the table (it returns before binding anything), as a subprocess for two cases.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import trio
import trustme

from gateway import service
from gateway.cli import main
from gateway.config import ConfigError
from tests.conftest import TEST_TOKEN

#: A case: its setup (given tmp_path, the config's data and monkeypatch; changes them, makes
#: files) and what the one error line says: a text in it and its place.
Setup = Callable[[Path, dict[str, Any], pytest.MonkeyPatch], None]


def _secret(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def _base(tmp: Path) -> dict[str, Any]:
    return {
        "upstream": {"token_file": _secret(tmp / "token", TEST_TOKEN)},
        "feeds": {"tracking": {"kind": "tracking", "url": "ws://127.0.0.1:1/ws/tracking"}},
        "fixtures": [{"feed": "tracking", "id": "f1"}],
    }


def _fixture(fixture_id: str) -> Setup:
    def setup(tmp: Path, data: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
        data["fixtures"].append({"feed": "tracking", "id": fixture_id})

    return setup


def _set(section: str, **values: Any) -> Setup:
    def setup(tmp: Path, data: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
        data.setdefault(section, {}).update(values)

    return setup


def _cluster(**values: Any) -> Setup:
    return _set("cluster", redis_url="redis://127.0.0.1:1", **values)


def _pair(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    issued = trustme.CA().issue_cert("127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return cert, key


def _tls_mismatch(tmp: Path, data: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    cert, key = _pair(tmp)
    trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(str(key))
    data["gateway"] = {"tls_cert_file": str(cert), "tls_key_file": str(key)}


def _tls_key_loose(tmp: Path, data: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    cert, key = _pair(tmp)
    key.chmod(0o660)
    data["gateway"] = {"tls_cert_file": str(cert), "tls_key_file": str(key)}


def _recorder_link(tmp: Path, data: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    (tmp / "real").mkdir()
    (tmp / "link").symlink_to(tmp / "real")
    data["recorder"] = {"dir": str(tmp / "link")}


def _recorder_file(tmp: Path, data: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    (tmp / "plain").write_text("x")
    data["recorder"] = {"dir": str(tmp / "plain")}


def _recorder_under_file(tmp: Path, data: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    (tmp / "plain").write_text("x")
    data["recorder"] = {"dir": str(tmp / "plain" / "rec")}


def _file(name: str, text: str, mode: int = 0o600, **where: str) -> Setup:
    """A secret file *name* in tmp_path, named by ``where`` (section=key)."""

    def setup(tmp: Path, data: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
        path = _secret(tmp / name, text, mode)
        for section, key in where.items():
            data.setdefault(section, {})[key] = path

    return setup


def _missing(section: str, key: str) -> Setup:
    return _set(section, **{key: "/nonexistent/dde-gateway-test/file"})


def _dangling(tmp: Path, data: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    (tmp / "admin").symlink_to(tmp / "gone")
    data["api"] = {"admin_tokens_file": str(tmp / "admin")}


def _env(**variables: str) -> Setup:
    def setup(tmp: Path, data: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
        for name, value in variables.items():
            mp.setenv(name, value)

    return setup


def _unset(variable: str, section: str, key: str, template: str) -> Setup:
    def setup(tmp: Path, data: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
        mp.delenv(variable, raising=False)
        data.setdefault(section, {})[key] = template

    return setup


def _delete(section: str) -> Setup:
    def setup(tmp: Path, data: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
        del data[section]

    return setup


def _feed_path(path: str) -> Setup:
    return _set("feeds", actions={"kind": "tracking", "url": f"ws://127.0.0.1:1{path}"})


LONG_ID = "x" * 300
#: Every way run refuses a config: (id, setup, text in the line, the line's place).
CASES: list[tuple[str, Setup, str, str]] = [
    ("type", _set("upstream", connect_rate="5"), "expected a number", "$.upstream.connect_rate"),
    ("unknown key", _set("subscribers", bogus=1), "unknown key(s): bogus", "$.subscribers"),
    ("range", _set("subscribers", queue_bytes=1), ">= 1024", "$.subscribers.queue_bytes"),
    ("required", _delete("upstream"), "required field missing", "$.upstream"),
    ("choice", _set("upstream", client="curl"), "expected one of", "$.upstream.client"),
    ("table rule", _set("gateway", tls_cert_file="c"), "set both tls_cert_file", "$.gateway"),
    (
        "same port",
        _set("gateway", reuse_port=True, stream_listen="127.0.0.1:9", http_listen="127.0.0.1:9"),
        "must not share a port",
        "$.gateway",
    ),
    ("reserved path", _feed_path("/v1/stream"), "/v1/stream is reserved", "$"),
    ("fixture id space", _fixture("a b"), "invalid fixture id 'a b'", "$.fixtures[1].id"),
    ("fixture id path", _fixture("../admin?x=1"), "invalid fixture id", "$.fixtures[1].id"),
    ("fixture id long", _fixture(LONG_ID), "invalid fixture id 'xxx", "$.fixtures[1].id"),
    (
        "unset recorder var",
        _unset("STATE_DIRECTORY", "recorder", "dir", "${STATE_DIRECTORY}/rec"),
        "unset environment variable(s) STATE_DIRECTORY",
        "$.recorder.dir",
    ),
    (
        "unset token var",
        _unset("DDE_TEST_CREDS", "subscribers", "tokens_file", "$DDE_TEST_CREDS/t"),
        "DDE_TEST_CREDS",
        "$.subscribers.tokens_file",
    ),
    (
        "vendor token loose",
        _file("vt", "t" * 32, 0o660, upstream="token_file"),
        "writable by its group",
        "$.upstream.token_file",
    ),
    (
        "subscriber tokens missing",
        _missing("subscribers", "tokens_file"),
        "No such file",
        "$.subscribers.tokens_file",
    ),
    (
        "subscriber tokens bad",
        _file("st", "a" * 32 + " trackng\n", subscribers="tokens_file"),
        "unknown feed 'trackng'",
        "$.subscribers.tokens_file",
    ),
    (
        "admin tokens missing",
        _missing("api", "admin_tokens_file"),
        "No such file",
        "$.api.admin_tokens_file",
    ),
    ("admin tokens dangling link", _dangling, "No such file", "$.api.admin_tokens_file"),
    (
        "admin tokens loose",
        _file("at", "a" * 32, 0o620, api="admin_tokens_file"),
        "writable by its group",
        "$.api.admin_tokens_file",
    ),
    (
        "read tokens empty",
        _file("rt", "# none yet\n", api="read_tokens_file"),
        "holds no token",
        "$.api.read_tokens_file",
    ),
    (
        "tls cert missing",
        _set("gateway", tls_cert_file="/nonexistent/c.pem", tls_key_file="/nonexistent/k.pem"),
        "cannot read",
        "$.gateway.tls_cert_file",
    ),
    ("tls pair mismatch", _tls_mismatch, "cannot load the certificate", "$.gateway.tls_cert_file"),
    ("tls key loose", _tls_key_loose, "writable by its group", "$.gateway.tls_key_file"),
    (
        "redis password missing",
        _cluster(password_file="/nonexistent/pw"),
        "No such file",
        "$.cluster.password_file",
    ),
    (
        "redis password env unset",
        _cluster(password_env="DDE_TEST_UNSET_PW"),
        "DDE_TEST_UNSET_PW is not set",
        "$.cluster.password_env",
    ),
    ("recorder dir link", _recorder_link, "is a symlink", "$.recorder.dir"),
    ("recorder dir file", _recorder_file, "is not a directory", "$.recorder.dir"),
    ("recorder dir under a file", _recorder_under_file, "is not a directory", "$.recorder.dir"),
    (
        "env unknown key",
        _env(DDE_GATEWAY_SUBSCRIBERS_QUEUEBYTES="1"),
        "DDE_GATEWAY_SUBSCRIBERS_QUEUEBYTES: [subscribers] has no key",
        "",
    ),
    (
        "env not toml",
        _env(DDE_GATEWAY_SUBSCRIBERS_QUEUE_BYTES="4MB"),
        "DDE_GATEWAY_SUBSCRIBERS_QUEUE_BYTES: not a TOML value",
        "",
    ),
    (
        "env range",
        _env(DDE_GATEWAY_SUBSCRIBERS_QUEUE_BYTES="1"),
        "(from DDE_GATEWAY_SUBSCRIBERS_QUEUE_BYTES)",
        "$.subscribers.queue_bytes",
    ),
]
CASES.append(
    (
        "fixture of an unknown feed",
        lambda tmp, data, mp: data["fixtures"].append({"feed": "nope", "id": "f2"}),
        "unknown feed 'nope'",
        "$",
    )
)


def _write(tmp: Path, data: dict[str, Any]) -> Path:
    path = tmp / "gateway.toml"
    path.write_text(tomli_w.dumps(data))
    return path


@contextmanager
def _gateway_log() -> Iterator[list[str]]:
    """The messages of the ``gateway`` logger meanwhile (whatever handlers it has)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("gateway")
    handler = Collect(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def _run_in_process(path: Path) -> tuple[int, list[str]]:
    with _gateway_log() as messages:
        status = trio.run(service.run_from_config_path, path, "text", None)
    return status, messages


def test_the_base_config_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, _base(tmp_path))
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"{path}: ok")


@pytest.mark.parametrize(
    ("setup", "text", "place"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_check_config_names_every_way_run_refuses(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    setup: Setup,
    text: str,
    place: str,
) -> None:
    """One case at a time: check-config exits 2 with a line naming the problem and its place;
    run refuses the same config (exit 2) with the same lines, before it binds anything."""
    data = _base(tmp_path)
    setup(tmp_path, data, monkeypatch)
    path = _write(tmp_path, data)
    assert main(["check-config", str(path)]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and "Traceback" not in err
    assert all(line.startswith(f"{path}: error: ") for line in lines), err
    matching = [
        line for line in lines if text in line and (not place or line.endswith(f"@ {place}"))
    ]
    assert matching, err
    status, messages = _run_in_process(path)
    assert status == 2
    assert messages == lines


def test_every_problem_in_one_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config with a problem in each table and file - a typo, out-of-range values, bad
    fixture ids, an unset variable, a missing and a loose token file, a missing certificate -
    gets every one reported by one check-config run (they used to come one per run), the
    files of a table with a bad value too."""
    data = _base(tmp_path)
    chosen = [
        "type",
        "range",
        "fixture id space",
        "unset recorder var",
        "subscriber tokens missing",
        "admin tokens loose",
        "read tokens empty",
        "tls cert missing",
        "redis password missing",
        "env unknown key",
    ]
    by_id = {c[0]: c for c in CASES}
    for name in chosen:
        by_id[name][1](tmp_path, data, monkeypatch)
    # Two bad values in one table: both reported.
    data["replay"] = {"max_per_connection": 0, "queue_bytes": 1}
    path = _write(tmp_path, data)
    assert main(["check-config", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    for name in chosen:
        _, _, text, place = by_id[name]
        assert any(text in line and line.endswith(place) for line in lines), (name, lines)
    for key in ("max_per_connection", "queue_bytes"):
        assert any(line.endswith(f"@ $.replay.{key}") for line in lines), lines
    assert len(lines) == len(chosen) + 2, lines
    result = service.preflight(path)
    assert [f"{path}: error: {e}" for e in result.errors] == lines


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ) if env is None else env,
        check=False,
    )


def test_run_and_check_config_agree_as_processes(tmp_path: Path) -> None:
    """The issue's three: an API token file that is missing (run printed an 80-line traceback),
    ``${STATE_DIRECTORY}`` unset (run made a folder literally named so) and fixture ids the API
    refuses. Both commands exit 2 with the same lines, no traceback, nothing created."""
    data = _base(tmp_path)
    data["api"] = {"admin_tokens_file": str(tmp_path / "admin-tokens")}
    data["recorder"] = {"dir": "${STATE_DIRECTORY}/recordings"}
    data["fixtures"] += [{"feed": "tracking", "id": i} for i in ("a b", "../admin?x=1", LONG_ID)]
    path = _write(tmp_path, data)
    env = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}
    check = _cli("check-config", str(path), env=env)
    run = _cli("run", "--config", str(path), "--log-format", "text", env=env)
    assert check.returncode == 2 and run.returncode == 2, (check.stderr, run.stderr)
    lines = check.stderr.splitlines()
    assert len(lines) == 5, check.stderr
    for line in lines:
        assert line in run.stderr
    assert "Traceback" not in run.stderr + check.stderr
    assert not list(Path.cwd().glob("$*")), "run made a folder named after the variable"
    missing = _cli("run", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "cannot read" in missing.stderr


def test_a_reload_is_refused_by_the_same_checks(tmp_path: Path) -> None:
    """SIGHUP's loader (``load_checked``) is the same preflight: a config that gained a fixture
    id the API refuses and an API token file that is not there is refused with both lines."""
    data = _base(tmp_path)
    path = _write(tmp_path, data)
    assert service.load_checked(path).fixtures[0].id == "f1"
    data["fixtures"].append({"feed": "tracking", "id": "a b"})
    data["api"] = {"admin_tokens_file": str(tmp_path / "admin-tokens")}
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        service.load_checked(path)
    assert [e.rpartition(" @ ")[2] for e in info.value.errors] == [
        "$.fixtures[1].id",
        "$.api.admin_tokens_file",
    ]
