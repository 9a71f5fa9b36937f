"""Subscriber token files: who may read which feeds, for both subscriber endpoints.

One token per line, optionally followed by the feeds it may read::

    # comments and blank lines are skipped
    3f9c1d0e8a7b4c2d9e1f0a6b5c4d3e2f                 every feed
    0a1b2c3d4e5f60718293a4b5c6d7e8f9 tracking,actions   only these two

Parsing is strict: a line with more than two fields, a token with a character outside
printable ASCII, an empty feed name, a feed the config does not know, the same token twice or
a file without any token is an error naming the file and the line - never the token. Tokens
are compared in constant time (:meth:`Secret.matches`), every entry each time.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Final

import attrs

from gateway.config._secret import Secret, SecretError, expand_path, read_secret_file

#: What a token may be made of: printable ASCII without spaces (it travels in HTTP headers).
_TOKEN_CHARS: Final = re.compile(r"^[\x21-\x7e]+$")
#: What a feed name in the file may look like (the config's feed names are TOML keys).
_FEED_NAME: Final = re.compile(r"^[^\s,]+$")
#: Larger files are refused: a token file holds tokens, not data.
MAX_TOKEN_FILE_BYTES: Final = 1024 * 1024


@attrs.frozen(repr=False)
class TokenGrant:
    """One line of a token file: the token and the feeds it may read (None: every feed).

    ``line`` is where it came from, so a log line can say which entry was used without the
    token. The repr never shows the token.
    """

    secret: Secret
    feeds: frozenset[str] | None
    line: int

    def allows(self, feed: str) -> bool:
        return self.feeds is None or feed in self.feeds

    def __repr__(self) -> str:
        feeds = "*" if self.feeds is None else ",".join(sorted(self.feeds))
        return f"<TokenGrant line {self.line} feeds {feeds}>"


@attrs.frozen(repr=False)
class SubscriberTokens:
    """The grants of one token file (``source`` names the file in messages)."""

    grants: tuple[TokenGrant, ...]
    source: str = ""

    def match(self, candidate: str) -> TokenGrant | None:
        """The grant whose token equals *candidate*, or None.

        Every entry is compared (constant time each), whether or not one matched already, so
        the time taken says nothing about which entry or how much of it matched.
        """
        found: TokenGrant | None = None
        for grant in self.grants:
            if grant.secret.matches(candidate) and found is None:
                found = grant
        return found

    def __len__(self) -> int:
        return len(self.grants)

    def __repr__(self) -> str:
        return f"<SubscriberTokens {len(self.grants)} from {self.source!r}>"


def parse_subscriber_tokens(
    text: str, *, source: str = "<text>", feeds: Collection[str] | None = None
) -> SubscriberTokens:
    """Parse token file text. *feeds*: the configured feed names, checked when given.

    Raises :class:`SecretError` naming *source* and the line of the first problem.
    """
    grants: list[TokenGrant] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}, line {n}"
        fields = line.split()
        if len(fields) > 2:
            raise SecretError(
                f"{where}: expected TOKEN or TOKEN FEED[,FEED...], found {len(fields)} "
                "fields (no spaces inside the feed list)"
            )
        token = fields[0]
        if _TOKEN_CHARS.match(token) is None:
            raise SecretError(f"{where}: a token may only hold printable ASCII characters")
        allowed: frozenset[str] | None = None
        if len(fields) == 2:
            names = fields[1].split(",")
            if any(not name or _FEED_NAME.match(name) is None for name in names):
                raise SecretError(f"{where}: empty feed name in the feed list")
            if feeds is not None:
                unknown = sorted(set(names) - set(feeds))
                if unknown:
                    known = ", ".join(sorted(feeds)) or "none"
                    raise SecretError(
                        f"{where}: unknown feed {unknown[0]!r} (configured feeds: {known})"
                    )
            allowed = frozenset(names)
        if token in seen:
            raise SecretError(f"{where}: the same token as line {seen[token]}")
        seen[token] = n
        grants.append(TokenGrant(Secret(token), allowed, n))
    if not grants:
        raise SecretError(f"{source} holds no token")
    return SubscriberTokens(tuple(grants), source)


def read_subscriber_tokens(path: Path, *, feeds: Iterable[str] | None = None) -> SubscriberTokens:
    """Read and parse a subscriber token file (``$VARS`` in the path expanded).

    Raises :class:`SecretError` naming the file (and the line), never a token.
    """
    path = expand_path(path)
    source = f"token file {str(path)!r}"
    data = read_secret_file(path, source, limit=MAX_TOKEN_FILE_BYTES)
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise SecretError(f"{source} is larger than {MAX_TOKEN_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SecretError(f"{source}, line {line}: not UTF-8 text") from None
    return parse_subscriber_tokens(
        text, source=source, feeds=None if feeds is None else frozenset(feeds)
    )
