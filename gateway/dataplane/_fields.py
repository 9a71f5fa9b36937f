"""Checks of the fields every ``/v1/stream`` request shares: unknown keys, ``feed``, ``fixture``.

Each refusal is a :class:`~gateway.errors.BadRequest` whose text is the ``error`` message the
client gets (docs/protocol.md).
"""

from __future__ import annotations

from typing import Any

from gateway.errors import BadRequest


def check_keys(req: dict[str, Any], allowed: frozenset[str]) -> None:
    """Refuse the first (in sorted order) key of *req* that is not *allowed*."""
    extra = sorted(k for k in req if k not in allowed)
    if extra:
        raise BadRequest(f"unknown field {extra[0][:40]!r}")


def field_str(req: dict[str, Any], name: str) -> str:
    """A required non-empty string field (``feed``, ``fixture``)."""
    value = req.get(name)
    if value is None:
        raise BadRequest(f"missing field {name!r}")
    if type(value) is not str or not value:
        raise BadRequest(f"{name} must be a non-empty string")
    return value
