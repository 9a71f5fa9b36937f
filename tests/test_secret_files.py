"""Permissions of the secret files the config names: refused when others may change them.

Every secret file - the vendor token, subscriber tokens, API admin and read tokens, the Redis
password, the TLS key - that its group or every user may write is refused by ``check-config``
and by ``run`` (exit 2, the field path and the file named, never the content), and wherever it
is read again while running (the vendor token on each connect attempt, subscriber tokens on
SIGHUP). One every user may read is a warning. Real files in tmp_path, chmod'ed; the running
cases against the simulator (in process, or ``python -m gateway run`` for the signal path).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import pytest
import trio
import trustme

from gateway.cli import main
from gateway.model import FixtureState
from gateway.service import run_from_config_path
from tests.conftest import TEST_TOKEN
from tests.kit import simulator_and_gateway, wait_until
from tests.test_service_process import A, gateway_process, simulator, write_config

#: Written into each secret file: it must never appear in any output.
CONTENT = "secret-content-8d1f-never-show-me"
KINDS = ("upstream", "subscribers", "api-admin", "api-read", "cluster", "tls-key")
FIELDS = {
    "upstream": "$.upstream.token_file",
    "subscribers": "$.subscribers.tokens_file",
    "api-admin": "$.api.admin_tokens_file",
    "api-read": "$.api.read_tokens_file",
    "cluster": "$.cluster.password_file",
    "tls-key": "$.gateway.tls_key_file",
}
REFUSED = {0o666: "every user", 0o620: "its group"}
WARNED = (0o604, 0o644)


def config_with_secret(tmp_path: Path, kind: str, mode: int) -> tuple[Path, Path]:
    """A config file naming one secret file of *kind*, chmod'ed to *mode*: (config, secret)."""
    secret = tmp_path / f"{kind}.secret"
    upstream = '[upstream]\ntoken_env = "DDE_TOKEN"\n'
    extra = ""
    if kind == "upstream":
        upstream = f'[upstream]\ntoken_file = "{secret}"\n'
        secret.write_text(CONTENT)
    elif kind == "subscribers":
        extra = f'[subscribers]\ntokens_file = "{secret}"\n'
        secret.write_text(CONTENT + "\n")
    elif kind in ("api-admin", "api-read"):
        key = "admin_tokens_file" if kind == "api-admin" else "read_tokens_file"
        extra = f'[api]\n{key} = "{secret}"\n'
        secret.write_text(CONTENT + "\n")
    elif kind == "cluster":
        extra = f'[cluster]\nredis_url = "redis://127.0.0.1:6379/0"\npassword_file = "{secret}"\n'
        secret.write_text(CONTENT)
    else:
        cert = trustme.CA().issue_cert("127.0.0.1")
        cert_file = tmp_path / "cert.pem"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(secret))
        extra = f'[gateway]\ntls_cert_file = "{cert_file}"\ntls_key_file = "{secret}"\n'
    secret.chmod(mode)
    config = tmp_path / "gateway.toml"
    feeds = '[feeds.t]\nkind = "tracking"\nurl = "ws://127.0.0.1:1/ws"\n'
    config.write_text(upstream + feeds + extra)
    return config, secret


def content_of(secret: Path) -> list[str]:
    """The lines of *secret* that must not be shown (for a PEM key: the base64 ones)."""
    return [line for line in secret.read_text().splitlines() if line and "-----" not in line]


@pytest.mark.parametrize("mode", [*REFUSED, *WARNED, 0o600], ids=lambda m: f"{m:04o}")
@pytest.mark.parametrize("kind", KINDS)
def test_check_config_judges_each_secret_files_permissions(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    mode: int,
) -> None:
    """A 0666 token file was accepted without a word (exit 0)."""
    monkeypatch.setenv("DDE_TOKEN", TEST_TOKEN)
    config, secret = config_with_secret(tmp_path, kind, mode)
    code = main(["check-config", str(config)])
    out, err = capsys.readouterr()
    for line in content_of(secret):
        assert line not in out + err
    if mode in REFUSED:
        assert code == 2, out + err
        assert f"{str(secret)!r} is writable by {REFUSED[mode]} (mode {mode:04o})" in err
        assert f"@ {FIELDS[kind]}" in err
        return
    assert code == 0, out + err
    assert f"{config}: ok" in out
    if mode in WARNED:
        assert f"{str(secret)!r} is readable by every user (mode {mode:04o})" in err
        assert f"@ {FIELDS[kind]}" in err
    else:
        assert "warning" not in err


@pytest.mark.parametrize("kind", KINDS)
async def test_run_refuses_a_secret_file_others_may_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """``dde-gateway run``: exit 2 before anything starts, the field and the file named."""
    monkeypatch.setenv("DDE_TOKEN", TEST_TOKEN)
    config, secret = config_with_secret(tmp_path, kind, 0o620)
    caplog.set_level(logging.INFO)
    with trio.fail_after(30):
        assert await run_from_config_path(config, "json", "info") == 2
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"{str(secret)!r} is writable by its group (mode 0620)" in error
    assert f"@ {FIELDS[kind]}" in error
    for line in content_of(secret):
        assert line not in caplog.text


async def test_the_vendor_token_file_is_judged_on_every_connect_attempt(tmp_path: Path) -> None:
    """Re-read on each attempt: made writable by every user while running, the next attempt is
    refused like an unreadable file (the status says why); put right, the fixture goes live."""
    with trio.fail_after(60):
        async with simulator_and_gateway(tmp_path, [("tracking", "F")]) as (sim, gw):
            handle = gw.supervisor.get("tracking", "F")
            assert handle is not None
            await wait_until(lambda: handle.status.state is FixtureState.LIVE)
            token = tmp_path / "token"
            token.chmod(0o666)
            sim.faults("F").drop_after_frames = 1  # the next attempt re-reads the file
            await wait_until(lambda: "token unavailable" in handle.status.detail)
            assert f"{str(token)!r} is writable by every user (mode 0666)" in (handle.status.detail)
            assert TEST_TOKEN not in handle.status.detail
            sim.faults("F").drop_after_frames = None
            token.chmod(0o600)
            await wait_until(lambda: handle.status.state is FixtureState.LIVE)


async def test_run_warns_of_a_world_readable_token_and_refuses_a_writable_one_on_reload(
    tmp_path: Path,
) -> None:
    """The process: a 0644 vendor token is a warning in the log (the gateway runs); subscriber
    tokens made group-writable are refused on SIGHUP, the running ones kept."""
    with trio.fail_after(90):
        async with simulator(tmp_path, A) as (_, port):
            (tmp_path / "token").chmod(0o644)
            tokens = tmp_path / "subscriber-tokens"
            tokens.write_text(CONTENT + "\n")
            tokens.chmod(0o600)
            config = tmp_path / "gateway.toml"
            write_config(config, port, [A])
            with config.open("a") as f:
                f.write(f'[subscribers]\ntokens_file = "{tokens}"\n')
            async with gateway_process(tmp_path, config) as proc:
                await proc.wait_for(lambda: "READY=1" in proc.notes)
                (warning,) = [
                    r["msg"]
                    for r in proc.logs
                    if r["level"] == "WARNING" and "every user" in r["msg"]
                ]
                token = tmp_path / "token"
                assert warning == (
                    f"{str(token)!r} is readable by every user (mode 0644): chmod o-r "
                    "@ $.upstream.token_file"
                )
                tokens.chmod(0o620)
                proc.process.send_signal(signal.SIGHUP)
                await proc.wait_for(lambda: any("reload refused" in r["msg"] for r in proc.logs))
                refused = next(r["msg"] for r in proc.logs if "reload refused" in r["msg"])
                assert f"{str(tokens)!r} is writable by its group (mode 0620)" in refused
                assert "@ $.subscribers.tokens_file" in refused
                proc.process.send_signal(signal.SIGTERM)
                assert await proc.process.wait() == 0
            everything = "\n".join(proc.raw)
            assert TEST_TOKEN not in everything and CONTENT not in everything
