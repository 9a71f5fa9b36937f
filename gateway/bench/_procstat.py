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


def write_calls(pid: int) -> int:
    """Write system calls *pid* has made so far (``syscw`` of /proc/<pid>/io: ``write`` and
    ``writev``, not ``send``/``sendto``). Raises OSError when the process is gone."""
    with open(f"/proc/{pid}/io", "rb") as f:
        for line in f:
            if line.startswith(b"syscw:"):
                return int(line.split()[1])
    return 0


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` (resident now) and ``VmHWM`` (peak resident) of *pid*, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            name, _, value = line.partition(b":")
            if name in (b"VmRSS", b"VmHWM"):
                out[name.decode()] = int(value.split()[0])
    return out


def machine_ticks() -> tuple[int, int]:
    """(steal, total) CPU ticks of the whole machine so far, from the ``cpu`` line of /proc/stat.

    Steal is time the hypervisor ran something else while a virtual CPU wanted to run: a virtual
    machine's latency figures are only as good as its steal is low.
    """
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()
    # cpu user nice system idle iowait irq softirq steal guest guest_nice (guest is in user)
    ticks = [int(x) for x in fields[1:9]]
    return ticks[7], sum(ticks)


def steal_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of the machine's CPU time stolen between two :func:`machine_ticks` readings."""
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total > 0 else 0.0
