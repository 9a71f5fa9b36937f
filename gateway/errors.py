"""Errors several packages raise for the same reason, defined once (a leaf module).

Example::

    >>> raise BadRequest("$.backfill: must be >= -1")
    Traceback (most recent call last):
    ...
    gateway.errors.BadRequest: $.backfill: must be >= -1
"""

from __future__ import annotations


class BadRequest(ValueError):
    """A client's request (an HTTP body or parameter, a subscriber's message) is invalid.

    The message is written for that client and safe to show it: it names what is wrong (with
    its field path where there is one, e.g. ``$.backfill``) and never echoes more than a short
    cut of the client's own input. The HTTP API answers it with 400, the multiplexed stream
    with an ``error`` message.
    """
