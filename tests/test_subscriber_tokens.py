"""Subscriber token files, the TLS config keys and the failure counting, without sockets.

Covers: the file format (every token, feed lists, comments), strict errors naming the file and
line but never the token, feed names checked against the config, the size cap; the loaders used
at start and on reload raising ConfigError with the field path; ``check-config`` reading both;
``tls_cert_file``/``tls_key_file`` both-or-neither; :class:`SubscriberAuth` counting every
failure while logging a few lines (peer and count, never the token) under a fake clock; the
credentials an upgrade request carries.

Rules: pure functions and files in tmp_path only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trustme

from gateway.cli import main
from gateway.config import (
    ConfigError,
    SecretError,
    load_server_tls,
    load_subscriber_tokens,
    parse_subscriber_tokens,
    read_subscriber_tokens,
    structure_config,
)
from gateway.dataplane import BEARER_PROTOCOL_PREFIX, SubscriberAuth, offered_tokens
from tests.test_config import minimal

SECRET_A = "sub-A-7c1f9e2b3d4a5f60"
SECRET_B = "sub-B-0e9d8c7b6a5f4e3d"


def test_format_every_feed_or_a_list() -> None:
    text = f"# consumers\n\n  {SECRET_A}  \n{SECRET_B} tracking,actions\n   # indented comment\n"
    tokens = parse_subscriber_tokens(text, feeds={"tracking", "actions", "other"})
    assert len(tokens) == 2
    a = tokens.match(SECRET_A)
    b = tokens.match(SECRET_B)
    assert a is not None and a.feeds is None and a.line == 3
    assert a.allows("anything")
    assert b is not None and b.feeds == frozenset({"tracking", "actions"}) and b.line == 4
    assert b.allows("tracking") and not b.allows("other")
    assert tokens.match("nope") is None
    assert tokens.match(SECRET_A[:-1]) is None
    assert tokens.match(SECRET_A + "x") is None
    assert tokens.match("") is None
    # The old drop-in format (one token per line) is the same format.
    assert len(parse_subscriber_tokens("# subscribers\nsub-token-1\nsub-token-2\n")) == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"{SECRET_A} tracking, actions\n", "line 1: expected TOKEN or TOKEN FEED[,FEED...]"),
        (f"# c\n{SECRET_A} tracking,,actions\n", "line 2: empty feed name"),
        (f"{SECRET_A} tracking,\n", "line 1: empty feed name"),
        (f"{SECRET_A} trackin\n", "line 1: unknown feed 'trackin' (configured feeds: actions"),
        (f"{SECRET_A}\n\n{SECRET_A} tracking\n", "line 3: the same token as line 1"),
        (f"caf\u00e9-{SECRET_A}\n", "line 1: a token may only hold printable ASCII"),
        ("# only comments\n\n", "holds no token"),
        ("", "holds no token"),
    ],
)
def test_strict_errors_name_the_line_never_the_token(text: str, expected: str) -> None:
    with pytest.raises(SecretError) as info:
        parse_subscriber_tokens(text, source="F", feeds={"tracking", "actions"})
    message = str(info.value)
    assert expected in message, message
    assert message.startswith("F")
    assert SECRET_A not in message and "sub-A" not in message


def test_nothing_shows_a_token() -> None:
    tokens = parse_subscriber_tokens(f"{SECRET_A}\n{SECRET_B} tracking\n", source="F")
    grant = tokens.match(SECRET_B)
    auth = SubscriberAuth(tokens)
    for text in (repr(tokens), str(tokens), repr(grant), f"{grant}", repr(auth), str(auth)):
        assert SECRET_A not in text and SECRET_B not in text, text
    assert repr(grant) == "<TokenGrant line 2 feeds tracking>"


def test_read_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    with pytest.raises(SecretError, match="cannot read token file"):
        read_subscriber_tokens(path)
    path.write_bytes(f"{SECRET_A}\n".encode() + b"\xff\xfe\n")
    with pytest.raises(SecretError, match="line 2: not UTF-8") as info:
        read_subscriber_tokens(path)
    assert SECRET_A not in str(info.value)
    path.write_bytes(b"#" * (1024 * 1024 + 1))
    with pytest.raises(SecretError, match="larger than"):
        read_subscriber_tokens(path)


def _config(tmp_path: Path, **over: Any) -> Any:
    data = minimal(**over)
    return structure_config(data)


def test_loader_raises_config_errors_with_the_field_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_subscriber_tokens(_config(tmp_path)) is None
    path = tmp_path / "tokens"
    path.write_text(f"{SECRET_A} tracking\n{SECRET_B} nosuchfeed\n")
    monkeypatch.setenv("TOKDIR", str(tmp_path))
    cfg = _config(tmp_path, subscribers={"tokens_file": "${TOKDIR}/tokens"})
    with pytest.raises(ConfigError) as info:
        load_subscriber_tokens(cfg)
    (error,) = info.value.errors
    assert "line 2: unknown feed 'nosuchfeed'" in error
    assert error.endswith("@ $.subscribers.tokens_file")
    assert SECRET_B not in error
    path.write_text(f"{SECRET_A} tracking\n")
    tokens = load_subscriber_tokens(cfg)
    assert tokens is not None and len(tokens) == 1


def test_tls_keys_both_or_neither() -> None:
    for gateway in ({"tls_cert_file": "/c.pem"}, {"tls_key_file": "/k.pem"}):
        with pytest.raises(ConfigError) as info:
            structure_config(minimal(gateway=gateway))
        assert any(
            "set both tls_cert_file and tls_key_file, or neither" in e and "$.gateway" in e
            for e in info.value.errors
        ), info.value.errors
    with pytest.raises(ConfigError) as info:
        structure_config(minimal(gateway={"tls_cert_file": 5, "tls_key_file": "/k"}))
    assert any("$.gateway.tls_cert_file" in e for e in info.value.errors)
    cfg = structure_config(minimal(gateway={"tls_cert_file": "/c", "tls_key_file": "/k"}))
    assert cfg.gateway.tls


def test_tls_files_are_checked_at_load(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))

    def load(c: Path, k: Path) -> Any:
        return load_server_tls(
            structure_config(minimal(gateway={"tls_cert_file": str(c), "tls_key_file": str(k)}))
        )

    assert load(cert_file, key_file) is not None
    assert load_server_tls(structure_config(minimal())) is None
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "missing.pem", key_file)
    assert info.value.errors[0].endswith("@ $.gateway.tls_cert_file")
    with pytest.raises(ConfigError) as info:
        load(cert_file, tmp_path / "missing.pem")
    assert info.value.errors[0].endswith("@ $.gateway.tls_key_file")
    other_key = tmp_path / "other-key.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other_key))
    with pytest.raises(ConfigError) as info:
        load(cert_file, other_key)  # a key that does not belong to the certificate
    assert "cannot load the certificate" in info.value.errors[0]
    key_text = key_file.read_text()
    assert key_text.splitlines()[1] not in info.value.errors[0]
    with pytest.raises(ConfigError) as info:
        load(key_file, key_file)  # a key where the certificate belongs
    assert "$.gateway.tls_cert_file" in info.value.errors[0]


def test_check_config_reads_the_token_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = tmp_path / "tokens"
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[upstream]\ntoken_env = "DDE_TOKEN"\n'
        '[feeds.t]\nkind = "tracking"\nurl = "ws://h/p"\n'
        f'[subscribers]\ntokens_file = "{tokens}"\n'
    )
    tokens.write_text(f"{SECRET_A} t\n{SECRET_B} t x\n")
    assert main(["check-config", str(config)]) == 2
    out, err = capsys.readouterr()
    assert "line 2: expected TOKEN or TOKEN FEED" in err and "$.subscribers.tokens_file" in err
    assert SECRET_A not in out + err and SECRET_B not in out + err
    tokens.write_text(f"{SECRET_A} t\n")
    assert main(["check-config", str(config)]) == 0
    out, _ = capsys.readouterr()
    assert "subscriber access 1 token(s), TLS off" in out


def test_auth_counts_every_failure_and_logs_a_few_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.dataplane")
    now = [0.0]
    tokens = parse_subscriber_tokens(f"{SECRET_A}\n{SECRET_B} tracking\n")
    auth = SubscriberAuth(tokens, log_interval=10.0, clock=lambda: now[0])
    for i in range(3000):
        now[0] = i * 0.01  # 3,000 wrong tokens in 30 s
        assert auth.check_dropin(SECRET_A + "-wrong", "tracking", f"10.0.0.{i % 7}:4000") is False
    assert auth.failures == {"stream": 0, "dropin": 3000}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines  # one per 10 s: at 0, 10 and 20 s
    assert all("from 10.0.0." in line and "a drop-in endpoint" in line for line in lines)
    assert "(2001 failures there since start)" in lines[-1]
    # The suppressed repeats are counted in a field of the next line let through.
    assert [vars(r).get("fields", {}).get("suppressed") for r in caplog.records] == [
        None,
        999,
        999,
    ]
    # A token of other feeds, and the stream's checks.
    assert auth.check_dropin(SECRET_B, "actions", "p") is False
    assert auth.check_dropin(SECRET_B, "tracking", "p") is True
    assert auth.check_stream([], "p") == (False, None)
    assert auth.check_stream([SECRET_A, SECRET_B], "p") == (False, None)
    assert auth.check_stream(["wrong"], "p") == (False, None)
    ok, grant = auth.check_stream([SECRET_B], "p")
    assert ok and grant is not None and grant.feeds == frozenset({"tracking"})
    assert auth.failures == {"stream": 3, "dropin": 3001}
    assert SECRET_A not in caplog.text and SECRET_B not in caplog.text
    # Open access: everything passes, nothing is counted.
    auth.replace(None)
    assert auth.check_stream([], "p") == (True, None)
    assert auth.check_dropin("anything", "x", "p") is True
    assert auth.failures == {"stream": 3, "dropin": 3001}


def test_offered_tokens() -> None:
    headers = [(b"Authorization", b"Bearer  abc "), (b"host", b"x"), (b"authorization", b"Basic z")]
    assert offered_tokens(headers, ["dde.v1", BEARER_PROTOCOL_PREFIX + "def"]) == ["abc", "def"]
    assert offered_tokens([(b"authorization", b"bearer")], [BEARER_PROTOCOL_PREFIX]) == []


def test_the_documented_example_file_parses() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    section = doc.split("### Subscriber token file", 1)[1]
    example = section.split("```\n", 2)[1]
    tokens = parse_subscriber_tokens(example, feeds={"tracking", "actions"})
    assert [g.feeds for g in tokens.grants] == [
        frozenset({"tracking"}),
        None,
        frozenset({"tracking", "actions"}),
    ]
