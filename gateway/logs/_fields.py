"""Structured fields of a log line: given at the call, or bound to the task that logs.

Two ways for a field to reach a line (the formatter, ``gateway.service``, merges both; a field
given at the call wins over a bound one of the same name):

- at the call, through :func:`fields`::

      log.info("reloaded", extra=fields(added=added, removed=removed))

- bound to the running task with :func:`log_context`: every line logged inside the block, by
  this task and by the tasks it starts there (trio copies the context into a new task), carries
  them. The gateway binds ``feed`` and ``fixture`` in each fixture's upstream task,
  ``subscriber`` in each subscriber connection's task and ``instance`` in the cluster node's
  task, so a line need not repeat them::

      with own_log_context(feed="tracking", fixture="5501b26a"):
          await runner.run_forever(connect)

The binding is structlog's context-local context (:mod:`structlog.contextvars`, one
:class:`contextvars.ContextVar` per key): a leaf, importing nothing of the gateway.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

import structlog

#: The attribute of a LogRecord that carries structured fields (``extra={FIELDS_ATTR: {...}}``).
FIELDS_ATTR: Final = "fields"


def fields(**values: object) -> dict[str, object]:
    """Structured fields for one log call: ``log.info("msg", extra=fields(feed="x"))``."""
    return {FIELDS_ATTR: values}


@contextmanager
def log_context(**values: object) -> Iterator[None]:
    """Every line logged in the block (by this task and the tasks it starts) carries *values*.

    Restored on exit, so a block run in a parent's task leaves that task's fields as they were.
    """
    with structlog.contextvars.bound_contextvars(**values):
        yield


#: Bound fields that name where a line comes from (the cluster instance), not what it is
#: about: :func:`own_log_context` keeps them.
NODE_FIELDS: Final = frozenset({"instance"})


@contextmanager
def own_log_context(**values: object) -> Iterator[None]:
    """Like :func:`log_context`, but the subject's fields bound before (all but
    :data:`NODE_FIELDS`) are dropped in the block.

    For a long-lived task started on behalf of another: trio copies the starting task's
    context, so a fixture task started on demand by a subscriber's task would otherwise name
    that subscriber on every line, long after it left.
    """
    before = structlog.contextvars.get_contextvars()
    structlog.contextvars.clear_contextvars()
    kept = {k: v for k, v in before.items() if k in NODE_FIELDS}
    try:
        with structlog.contextvars.bound_contextvars(**kept, **values):
            yield
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**before)


def bound_fields() -> list[tuple[str, object]]:
    """The fields bound to the current task (what :func:`log_context` set), for the formatter:
    sorted by name (a context's own order varies from run to run)."""
    return sorted(structlog.contextvars.get_contextvars().items())
