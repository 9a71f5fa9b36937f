"""CPU time and memory of another process, read from /proc (Linux only)."""

from __future__ import annotations

import os
from typing import Final

_TICKS: Final = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds *pid* has used so far (resolution 1/CLK_TCK, usually 10 ms).

    Raises OSError when the process is gone."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14 and 15)


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` (resident now) and ``VmHWM`` (peak resident) of *pid*, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            name, _, value = line.partition(b":")
            if name in (b"VmRSS", b"VmHWM"):
                out[name.decode()] = int(value.split()[0])
    return out
