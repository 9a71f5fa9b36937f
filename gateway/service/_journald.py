"""journald priorities: is stderr the journal, and each level's syslog priority.

systemd connects a service's stderr to journald and names that stream in ``JOURNAL_STREAM``
(``<device>:<inode>``, systemd.exec(5)). A line starting with ``<N>`` (N a syslog priority,
0-7) is stored with priority N and the prefix removed (``SyslogLevelPrefix=yes``, the
default), so ``journalctl -p warning`` finds warnings. The variable is inherited by children
whose stderr may be elsewhere (a pipe, a file): only when our stream's device and inode are
the ones it names is the stream the journal (sd_journal_stream_fd(3)'s own advice).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Final, TextIO

#: The environment variable systemd sets when stdout/stderr are connected to the journal.
JOURNAL_STREAM: Final = "JOURNAL_STREAM"

# syslog(3) priorities: LOG_CRIT 2, LOG_ERR 3, LOG_WARNING 4, LOG_INFO 6, LOG_DEBUG 7.
_PRIORITIES: Final = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_DEBUG: Final = 7


def journal_priority(levelno: int) -> int:
    """The syslog priority of a logging level (a custom level: the next standard one below)."""
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return _DEBUG


def writes_to_journal(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """True when *stream* is the journal stream named by ``$JOURNAL_STREAM``."""
    named = environ.get(JOURNAL_STREAM, "")
    device, sep, inode = named.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        # No file descriptor (a StringIO), a closed stream, a malformed variable.
        return False
