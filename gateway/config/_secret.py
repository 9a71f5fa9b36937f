"""Secrets that cannot leak by accident.

A :class:`Secret` keeps its value out of ``repr``, ``str``, f-strings, logs and tracebacks: the
value comes out only through :meth:`Secret.reveal`, which is called at exactly the places that send
it (the upstream auth message) or compare it (subscriber and API tokens).

Text that came from outside (a vendor's error message, a rendered log line) is searched for
secrets by :class:`SecretMatcher`, which compares *normalised* text: case folded, Unicode format
characters (category ``Cf``: zero-width space, word joiner, soft hyphen, BOM, ...) dropped and
compatibility forms unified (NFKC, e.g. full-width letters), so a token quoted upper-cased or
split by invisible characters is found too. A match is mapped back to the original text, so the
redaction covers exactly the characters that spelled the token.
"""

from __future__ import annotations

import functools
import hmac
import os
import re
import stat
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import attrs

REDACTED: Final = "<redacted>"
#: Shorter values are not searched for: replacing a 1-3 character string would shred every
#: text, and no real token is that short.
MIN_SECRET_LENGTH: Final = 4
_NON_ASCII: Final = re.compile(r"[^\x00-\x7f]+")


@functools.lru_cache(maxsize=4096)
def _fold_char(ch: str) -> str:
    """One non-ASCII character as the matcher sees it: nothing for a format character (Cf),
    else its NFKC form case folded (full-width A -> "a", sharp s -> "ss")."""
    if unicodedata.category(ch) == "Cf":
        return ""
    return unicodedata.normalize("NFKC", ch).casefold()


def fold(text: str) -> tuple[str, list[int] | None]:
    """*text* normalised for matching, and for each of its characters the index in *text* of
    the character it came from (None: ASCII text, where the indexes are the same).

    ASCII text (every log line but a few) costs one ``str.lower``; otherwise ASCII runs are
    lowered whole and only the other characters are folded one by one.
    """
    if text.isascii():
        return text.lower(), None
    parts: list[str] = []
    origin: list[int] = []
    pos = 0
    for run in _NON_ASCII.finditer(text):
        start, end = run.span()
        if pos < start:
            parts.append(text[pos:start].lower())
            origin.extend(range(pos, start))
        for i in range(start, end):
            folded = _fold_char(text[i])
            if folded:
                parts.append(folded)
                origin.extend([i] * len(folded))
        pos = end
    if pos < len(text):
        parts.append(text[pos:].lower())
        origin.extend(range(pos, len(text)))
    return "".join(parts), origin


class SecretMatcher:
    """Finds secret values in text however they are spelled (see the module's docstring) and
    replaces each occurrence with ``<redacted>``.

    Values shorter than :data:`MIN_SECRET_LENGTH` (before or after folding) are ignored. The
    repr never shows a value.
    """

    __slots__ = ("_needles",)

    def __init__(self, values: Iterable[str]) -> None:
        needles = {fold(v)[0] for v in values if len(v) >= MIN_SECRET_LENGTH}
        # Longest first: of two overlapping matches the merged span covers both anyway.
        self._needles = sorted(
            (n for n in needles if len(n) >= MIN_SECRET_LENGTH), key=len, reverse=True
        )

    def __bool__(self) -> bool:
        return bool(self._needles)

    def __repr__(self) -> str:
        return f"<SecretMatcher of {len(self._needles)} value(s)>"

    def redact(self, text: str) -> str:
        """*text* with every occurrence of a value replaced by ``<redacted>``."""
        if not self._needles:
            return text
        folded, origin = fold(text)
        spans: list[tuple[int, int]] = []
        for needle in self._needles:
            at = folded.find(needle)
            while at != -1:
                spans.append((at, at + len(needle)))
                at = folded.find(needle, at + 1)
        if not spans:
            return text
        spans.sort()
        out: list[str] = []
        pos = 0  # in text
        start, end = spans[0]
        for s, e in [*spans[1:], (len(folded) + 1, 0)]:
            if s < end:  # overlaps the current span: extend it
                end = max(end, e)
                continue
            # Back to the original: from the first character of the match to the last one.
            a, b = (start, end) if origin is None else (origin[start], origin[end - 1] + 1)
            out.append(text[pos:a])
            out.append(REDACTED)
            pos = b
            start, end = s, e
        out.append(text[pos:])
        return "".join(out)


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
        """*text* with every occurrence of the value, however spelled (upper-cased, split by
        zero-width characters: :class:`SecretMatcher`), replaced by ``<redacted>``.

        For text that came from outside (an upstream's error message may echo the token it
        refused) before it is kept or shown anywhere. Values shorter than
        :data:`MIN_SECRET_LENGTH` are not scrubbed.
        """
        return SecretMatcher((self._value,)).redact(text)

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


#: Mode bits that let others than the owner change a file: a secret file with any is refused
#: (whoever can write the subscriber or API token file can grant themselves access).
_WRITABLE_BY_OTHERS: Final = stat.S_IWGRP | stat.S_IWOTH


def check_secret_mode(source: str, mode: int) -> str | None:
    """Judge a secret file's permission bits (*source* names the file in messages).

    Raises :class:`SecretError` when its group or every user may write it; returns a warning
    when every user may read it (None: fine). Only the bits: a symlink is judged by the file
    it points to (systemd credentials and mounted secrets are often links).
    """
    octal = f"{stat.S_IMODE(mode):04o}"
    if mode & _WRITABLE_BY_OTHERS:
        who = "every user" if mode & stat.S_IWOTH else "its group"
        raise SecretError(
            f"{source} is writable by {who} (mode {octal}): refused, a secret file must be "
            "writable by its owner only (chmod go-w)"
        )
    if mode & stat.S_IROTH:
        return f"{source} is readable by every user (mode {octal}): chmod o-r"
    return None


def read_secret_file(path: Path, source: str, *, limit: int | None = None) -> bytes:
    """The bytes of the secret file *path* (expanded already), at most ``limit + 1`` of them.

    The permission check (:func:`check_secret_mode`) is made on the opened file, so what is
    read is what was checked. Raises :class:`SecretError` naming *source*, never the content.
    """
    try:
        with path.open("rb") as f:
            check_secret_mode(source, os.fstat(f.fileno()).st_mode)
            return f.read() if limit is None else f.read(limit + 1)
    except OSError as exc:
        raise SecretError(f"cannot read {source}: {exc.strerror}") from None


def secret_file_warning(path: Path, source: str) -> str | None:
    """:func:`check_secret_mode` of the file *path* (expanded already) names, without reading
    it; None when it does not exist or cannot be examined (reading it reports that)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    return check_secret_mode(source, mode)


def read_token_file(path: Path) -> Secret:
    """Read a one-token file (surrounding whitespace stripped; ``$VARS`` in the path expanded).

    Raises :class:`SecretError` naming the file when it is missing, unreadable, writable by
    others than its owner, or empty.
    """
    path = expand_path(path)
    source = f"token file {str(path)!r}"
    try:
        text = read_secret_file(path, source).decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"{source} is not UTF-8 text") from None
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
    source = f"token file {str(path)!r}"
    try:
        text = read_secret_file(path, source).decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"{source} is not UTF-8 text") from None
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
