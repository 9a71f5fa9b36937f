"""A fixture's key in the cluster (``feed/fixture``: leases, streams, handovers) and the log
fields of a line about one."""

from __future__ import annotations

from gateway.logs import fields


def fixture_key(feed: str, fixture: str) -> str:
    return f"{feed}/{fixture}"


def split_key(key: str) -> tuple[str, str]:
    feed, fixture = key.rsplit("/", 1)
    return feed, fixture


def key_fields(key: str) -> dict[str, object]:
    """The fields of a log line about *key*: ``extra=key_fields(key)``."""
    feed, fixture = split_key(key)
    return fields(feed=feed, fixture=fixture)
