"""Secrets that cannot leak by accident.

A :class:`Secret` keeps its value out of ``repr``, ``str``, f-strings, logs and tracebacks: the
value comes out only through :meth:`Secret.reveal`, which is called at exactly the places that send
it (the upstream auth message) or compare it (subscriber and API tokens).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import attrs

REDACTED: Final = "<redacted>"


class SecretError(Exception):
    """A secret could not be read. The message names where from, never the value."""


@attrs.frozen(repr=False, eq=False)
class Secret:
    _value: str

    def reveal(self) -> str:
        return self._value

    def matches(self, candidate: str) -> bool:
        """Constant-time comparison, so a timing probe learns nothing."""
        return hmac.compare_digest(self._value.encode(), candidate.encode())

    def scrub(self, text: str) -> str:
        """*text* with every occurrence of the value replaced by ``<redacted>``.

        For text that came from outside (an upstream's error message may echo the token it
        refused) before it is kept or shown anywhere. Values shorter than 4 characters are not
        scrubbed: no real token is that short, and replacing them would shred the text.
        """
        value = self._value
        if len(value) < 4 or value not in text:
            return text
        return text.replace(value, REDACTED)

    def __repr__(self) -> str:
        return f"Secret({REDACTED})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")


def expand_path(path: Path) -> Path:
    """Expand ``$VAR``/``${VAR}`` in a configured path, e.g. systemd's ``$CREDENTIALS_DIRECTORY``.

    An unset variable is left as written, so the error names the path the operator configured.
    """
    return Path(os.path.expandvars(str(path)))


def read_token_file(path: Path) -> Secret:
    """Read a one-token file (surrounding whitespace stripped; ``$VARS`` in the path expanded).

    Raises :class:`SecretError` naming the file when it is missing, unreadable or empty.
    """
    path = expand_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SecretError(f"cannot read token file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SecretError(f"token file {str(path)!r} is not UTF-8 text") from None
    token = text.strip()
    if not token:
        raise SecretError(f"token file {str(path)!r} is empty")
    return Secret(token)


def read_token_env(name: str) -> Secret:
    """Read a token from the environment variable *name*."""
    token = os.environ.get(name, "").strip()
    if not token:
        raise SecretError(f"environment variable {name} is not set or empty")
    return Secret(token)


def read_token_list(path: Path) -> tuple[Secret, ...]:
    """Read a file of tokens, one per line; blank lines and ``#`` comments are skipped."""
    path = expand_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SecretError(f"cannot read token file {str(path)!r}: {exc.strerror}") from None
    tokens = tuple(
        Secret(line.strip())
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    if not tokens:
        raise SecretError(f"token file {str(path)!r} holds no token")
    return tokens


def any_matches(secrets: Iterable[Secret], candidate: str) -> bool:
    """True when *candidate* equals one of *secrets*; every one is compared (constant time)."""
    found = False
    for secret in secrets:
        found |= secret.matches(candidate)
    return found
