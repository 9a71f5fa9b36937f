"""Rendezvous (highest random weight) hashing: which instance should own a fixture.

Every instance computes the same order from the same names, with no coordination: each
(instance, fixture) pair gets a pseudo-random weight and the heaviest instance comes first.
When an instance leaves, only its own fixtures move (each to its next-heaviest instance), and
with N instances each owns about 1/N of the fixtures.

Example::

    >>> rank("tracking/f1", ["gw-a", "gw-b"]) in (["gw-a", "gw-b"], ["gw-b", "gw-a"])
    True
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weight(instance: str, key: str) -> int:
    """The pair's weight: 64 bits of BLAKE2b over both names (stable across processes)."""
    digest = hashlib.blake2b(f"{instance}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(key: str, instances: Iterable[str]) -> list[str]:
    """*instances* ordered by preference for *key*: the one that should own it first."""
    return sorted(instances, key=lambda name: (-weight(name, key), name))
