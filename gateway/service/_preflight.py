"""Everything ``run`` checks before it binds a socket or starts a task, in one function.

``dde-gateway run``, ``dde-gateway check-config`` and every reload (SIGHUP) call
:func:`preflight`: what one refuses, the others refuse, with the same lines. It collects every
problem (never stopping at the first) and reads every file the config names the way the
service will: the subscriber and API token files, the TLS certificate and key (loaded as a
pair), the Redis password, the permissions of every secret file, the recorder's directory
(writable, not a symlink; made when missing, like the recorder does), ``$VARS`` in paths
that are not set, and the ids of ``[[fixtures]]`` by the rule the API and the subscribers
follow (:data:`~gateway.hub.FIXTURE_ID_PATTERN`). The vendor's token is not read (only its
file's permissions are checked): it is read on each connect attempt and may come later.

Each problem is one line, ``message @ $.field.path`` (the file or variable is in the message),
never a token, password or key.
"""

from __future__ import annotations

import os
import re
import ssl
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from gateway.config import (
    Config,
    ConfigError,
    SecretError,
    SubscriberTokens,
    check_secret_files,
    expand_path,
    load_cluster_password,
    load_config,
    load_partial,
    load_server_tls,
    load_subscriber_tokens,
)
from gateway.hub import FIXTURE_ID_PATTERN, valid_fixture_id

#: A ``$NAME`` or ``${NAME}`` left in a path after expansion: the variable is not set.
_UNSET: Final = re.compile(r"\$(?:\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")
#: Characters of a bad fixture id quoted in its error.
_SHOWN: Final = 64


@attrs.frozen
class Preflight:
    """What :func:`preflight` found: the config (None when the file itself is broken), every
    error and warning (one line each), and what a start would use."""

    config: Config | None
    errors: list[str]
    warnings: list[str]
    tokens: SubscriberTokens | None = None
    tls: ssl.SSLContext | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


def preflight(path: Path | None, *, environ: Mapping[str, str] | None = None) -> Preflight:
    """Load the config at *path* (the ``DDE_GATEWAY_*`` variables over it) and check everything
    a start needs (blocking: call it in a worker thread from trio)."""
    try:
        config = load_config(path, environ=environ)
    except ConfigError as exc:
        errors = list(exc.errors)
        partial = load_partial(path, environ=environ)
        if partial is None:  # the file itself cannot be read or parsed
            return Preflight(None, errors, [])
        # Every problem in one run: the files of the tables that are valid are checked too.
        valid, fixtures = partial
        more = check_config(valid)
        more.errors.extend(_fixture_id_problems(enumerate(fixtures)))
        errors += [e for e in more.errors if e not in errors]
        return Preflight(None, errors, more.warnings)
    return check_config(config)


def load_checked(path: Path | None) -> Config:
    """:func:`preflight`, raising :class:`ConfigError` with every error: the reload's loader."""
    result = preflight(path)
    if result.config is None or result.errors:
        raise ConfigError(result.errors)
    return result.config


def check_config(config: Config) -> Preflight:
    """Every start-up check of an already structured *config* (see the module docstring)."""
    errors: list[str] = []
    warnings: list[str] = []
    failed: set[str] = set()

    def fail(message: str, field: str) -> None:
        errors.append(f"{message} @ {field}")
        failed.add(field)

    for field, value in _paths(config):
        unset = _unset_variables(value)
        if unset:
            fail(
                f"{str(value)!r} names the unset environment variable(s) {', '.join(unset)}: "
                "set them, or write the path out",
                field,
            )
    for i, fixture in enumerate(config.fixtures):
        if not valid_fixture_id(fixture.id):
            shown = repr(fixture.id[:_SHOWN]) + ("..." if len(fixture.id) > _SHOWN else "")
            fail(
                f"invalid fixture id {shown}: must match {FIXTURE_ID_PATTERN}",
                f"$.fixtures[{i}].id",
            )
    try:
        warnings.extend(check_secret_files(config))
    except ConfigError as exc:
        for error in exc.errors:
            message, _, field = error.rpartition(" @ ")
            fail(message, field)

    def attempt(field: str, read: Callable[[], Any]) -> Any:
        if field in failed:
            return None
        try:
            return read()
        except ConfigError as exc:
            for error in exc.errors:
                message, _, at = error.rpartition(" @ ")
                fail(message, at or field)
        except SecretError as exc:
            fail(str(exc), field)
        return None

    tokens = attempt("$.subscribers.tokens_file", lambda: load_subscriber_tokens(config))
    attempt("$.api.admin_tokens_file", config.api.read_admin_tokens)
    attempt("$.api.read_tokens_file", config.api.read_read_tokens)
    tls = None
    if "$.gateway.tls_key_file" not in failed:
        tls = attempt("$.gateway.tls_cert_file", lambda: load_server_tls(config))
    cluster = config.cluster
    if cluster is not None:
        field = "password_file" if cluster.password_file is not None else "password_env"
        attempt(f"$.cluster.{field}", lambda: load_cluster_password(config))
    if config.recorder.dir is not None and "$.recorder.dir" not in failed:
        problem = recorder_dir_problem(expand_path(config.recorder.dir))
        if problem is not None:
            fail(problem, "$.recorder.dir")
    return Preflight(config, errors, warnings, tokens=tokens, tls=tls)


def _fixture_id_problems(fixtures: Iterable[tuple[int, Any]]) -> list[str]:
    """The ids of ``[[fixtures]]`` (index, the fixture's table or id) that the API and the
    subscribers would refuse (:data:`~gateway.hub.FIXTURE_ID_PATTERN`): ids end up in
    upstream URLs, file names and log lines."""
    problems = []
    for i, item in fixtures:
        fixture_id = item.get("id") if isinstance(item, dict) else item
        if isinstance(fixture_id, str) and not valid_fixture_id(fixture_id):
            shown = repr(fixture_id[:_SHOWN]) + ("..." if len(fixture_id) > _SHOWN else "")
            problems.append(
                f"invalid fixture id {shown}: must match {FIXTURE_ID_PATTERN} @ $.fixtures[{i}].id"
            )
    return problems


def problem_line(path: Path | None, kind: str, problem: str) -> str:
    """One line of ``check-config`` and of ``run``'s refusal: ``PATH: error: message @ $.f``."""
    return f"{'(environment)' if path is None else path}: {kind}: {problem}"


def _paths(config: Config) -> list[tuple[str, Path]]:
    """Every path *config* names, with its field path."""
    named: list[tuple[str, Path | None]] = [
        ("$.upstream.token_file", config.upstream.token_file),
        ("$.subscribers.tokens_file", config.subscribers.tokens_file),
        ("$.api.admin_tokens_file", config.api.admin_tokens_file),
        ("$.api.read_tokens_file", config.api.read_tokens_file),
        ("$.gateway.tls_cert_file", config.gateway.tls_cert_file),
        ("$.gateway.tls_key_file", config.gateway.tls_key_file),
        ("$.recorder.dir", config.recorder.dir),
        (
            "$.cluster.password_file",
            None if config.cluster is None else config.cluster.password_file,
        ),
    ]
    return [(field, path) for field, path in named if path is not None]


def _unset_variables(path: Path) -> list[str]:
    """The variables *path* names that are not set (``expand_path`` leaves them as written)."""
    found = _UNSET.finditer(str(expand_path(path)))
    return sorted({m["braced"] if m["braced"] is not None else m["plain"] for m in found})


def recorder_dir_problem(path: Path) -> str | None:
    """Why the recorder could not use *path* as its directory, or None.

    It must be a directory this user may write, not a symlink; a missing one is made at start
    (parents too), so its nearest existing ancestor must be a directory this user may write.
    """
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        ancestor = path.parent
        while True:
            try:
                st = os.stat(ancestor)
                break
            except (FileNotFoundError, NotADirectoryError):
                if ancestor == ancestor.parent:
                    return f"cannot make {str(path)!r}: no part of it exists"
                ancestor = ancestor.parent
            except OSError as exc:
                return f"cannot make {str(path)!r}: {str(ancestor)!r}: {exc.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"cannot make {str(path)!r}: {str(ancestor)!r} is not a directory"
        if not os.access(ancestor, os.W_OK | os.X_OK):
            return f"cannot make {str(path)!r}: {str(ancestor)!r} is not writable by this user"
        return None
    except OSError as exc:
        return f"cannot examine {str(path)!r}: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return (
            f"{str(path)!r} is a symlink: name the directory itself (nothing under it is "
            "reached through a link)"
        )
    if not stat.S_ISDIR(st.st_mode):
        return f"{str(path)!r} is not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{str(path)!r} is not writable by this user"
    return None
