"""Files the config names that are read when the gateway starts and on every reload.

Subscriber tokens (``[subscribers] tokens_file``), the TLS certificate and key (``[gateway]
tls_cert_file`` / ``tls_key_file``) and the cluster's Redis password (``[cluster]``, read at
start only). Each raises :class:`ConfigError` with the field path, so a broken file stops a
start (exit 2) or refuses a reload exactly like a broken config file; the messages name files
and lines, never a token, password or key material. (The upstream token is different: it is
read on every connect attempt, see :meth:`UpstreamSection.read_token`.)

Secret files (every one :func:`secret_files` lists) whose group or every user may write them
are refused wherever they are read (:func:`~gateway.config._secret.check_secret_mode`);
:func:`check_secret_files` checks them all at start and by ``check-config``, and returns a
warning for each one every user may read.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import NoReturn

from gateway.config._convert import ConfigError
from gateway.config._model import Config
from gateway.config._secret import (
    Secret,
    SecretError,
    check_secret_mode,
    expand_path,
    secret_file_warning,
)
from gateway.config._tokens import SubscriberTokens


def secret_files(config: Config) -> list[tuple[str, Path]]:
    """The secret files *config* names, each with its field path (``$.upstream.token_file``),
    ``$VARS`` expanded: the vendor token, the subscriber tokens, the API admin and read tokens,
    the Redis password and the TLS key (the certificate is public)."""
    named: list[tuple[str, Path | None]] = [
        ("$.upstream.token_file", config.upstream.token_file),
        ("$.subscribers.tokens_file", config.subscribers.tokens_file),
        ("$.api.admin_tokens_file", config.api.admin_tokens_file),
        ("$.api.read_tokens_file", config.api.read_tokens_file),
        (
            "$.cluster.password_file",
            None if config.cluster is None else config.cluster.password_file,
        ),
        ("$.gateway.tls_key_file", config.gateway.tls_key_file),
    ]
    return [(field, expand_path(path)) for field, path in named if path is not None]


def check_secret_files(config: Config) -> list[str]:
    """Check the permissions of every secret file *config* names, without reading them.

    Raises :class:`ConfigError` listing each one its group or every user may write (with its
    field path); returns a warning (with its field path) for each one every user may read. A
    file that does not exist is left to its reader (the vendor token may come later).
    """
    errors: list[str] = []
    warnings: list[str] = []
    for field, path in secret_files(config):
        try:
            warning = secret_file_warning(path, f"{str(path)!r}")
        except SecretError as exc:
            errors.append(f"{exc} @ {field}")
            continue
        if warning is not None:
            warnings.append(f"{warning} @ {field}")
    if errors:
        raise ConfigError(errors)
    return warnings


def load_subscriber_tokens(config: Config) -> SubscriberTokens | None:
    """The subscriber tokens of *config*, or None when ``tokens_file`` is unset (open access).

    Feed names in the file are checked against ``config.feeds``.
    """
    try:
        return config.subscribers.read_tokens(feeds=config.feeds)
    except SecretError as exc:
        raise ConfigError([f"{exc} @ $.subscribers.tokens_file"]) from None


def load_cluster_password(config: Config) -> Secret | None:
    """The Redis password of ``[cluster]`` (``password_file`` / ``password_env``), or None
    (no cluster, or no password). Read once at start; the message names the source only."""
    cluster = config.cluster
    if cluster is None:
        return None
    try:
        return cluster.read_password()
    except SecretError as exc:
        field = "password_file" if cluster.password_file is not None else "password_env"
        raise ConfigError([f"{exc} @ $.cluster.{field}"]) from None


class _EncryptedKey(Exception):
    pass


def _no_passphrase() -> NoReturn:
    # Without this callback OpenSSL would prompt on the terminal for an encrypted key's
    # passphrase, and block the start.
    raise _EncryptedKey


def load_server_tls(config: Config) -> ssl.SSLContext | None:
    """A server TLS context from ``[gateway] tls_cert_file`` / ``tls_key_file``, or None.

    TLS 1.2 or later; ALPN ``http/1.1`` (WebSocket upgrades are HTTP/1.1). An encrypted key is
    refused: nobody could type its passphrase for a service.
    """
    section = config.gateway
    if section.tls_cert_file is None or section.tls_key_file is None:
        return None
    cert = expand_path(section.tls_cert_file)
    key = expand_path(section.tls_key_file)

    def fail(what: str, field: str) -> NoReturn:
        raise ConfigError([f"{what} @ $.gateway.{field}"]) from None

    for path, field in ((cert, "tls_cert_file"), (key, "tls_key_file")):
        try:
            with path.open("rb") as f:
                if path is key:  # the key is a secret; the certificate is public
                    check_secret_mode(f"{str(path)!r}", os.fstat(f.fileno()).st_mode)
        except OSError as exc:
            fail(f"cannot read {str(path)!r}: {exc.strerror}", field)
        except SecretError as exc:
            fail(str(exc), field)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(str(cert), str(key), password=_no_passphrase)
    except _EncryptedKey:
        fail(f"{str(key)!r} is encrypted; a passphrase is not supported", "tls_key_file")
    except ssl.SSLError as exc:
        fail(
            f"cannot load the certificate {str(cert)!r} with the key {str(key)!r}: "
            f"{exc.reason or exc.strerror or 'invalid'}",
            "tls_cert_file",
        )
    except OSError as exc:
        fail(f"cannot load the certificate or key: {exc.strerror}", "tls_cert_file")
    return ctx
