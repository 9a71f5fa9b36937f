"""What the gateway's log lines carry: structured fields (given at the call or bound to the
task) and throttled repeats. A leaf: imports nothing of the gateway. The formatter that renders
them, with redaction and journald priorities, is ``gateway.service``'s (docs/operations.md,
"Logs")."""

from gateway.logs._fields import FIELDS_ATTR, bound_fields, fields, log_context, own_log_context
from gateway.logs._throttle import DEFAULT_INTERVAL, LogThrottle

__all__ = [
    "DEFAULT_INTERVAL",
    "FIELDS_ATTR",
    "LogThrottle",
    "bound_fields",
    "fields",
    "log_context",
    "own_log_context",
]
