"""What the rolling-restart bench (:mod:`gateway.bench._rolling`) waits for and reports, I/O-free:
the instances, the drain time a stop needs, who owns what, when a phase has settled, the
stall figures of a phase and the table of medians."""

from __future__ import annotations

import statistics
from collections.abc import Collection, Sequence
from typing import Any, Final

from gateway.bench._feeder import fixture_id
from gateway.cluster import rank

INSTANCES: Final = ("bench-a", "bench-b", "bench-c")
#: Room beyond what the connect rate needs, for the drain's handovers and every settle.
ROOM: Final = 30.0


def drain_timeout(fixtures: int, connect_rate: float) -> float:
    """A ``drain_timeout`` whose half (a stop's handover time) hands a third of *fixtures*
    over at *connect_rate*, with :data:`ROOM` to spare."""
    return 2 * (fixtures / len(INSTANCES) / connect_rate + ROOM)


def owners(fixtures: int, instances: Sequence[str]) -> dict[str, str]:
    """Fixture id -> the instance rendezvous hashing gives it among *instances*."""
    ids = (fixture_id(i) for i in range(fixtures))
    return {fx: rank(f"tracking/{fx}", instances)[0] for fx in ids}


def unsettled(leases: dict[str, tuple[str | None, str | None]], want: dict[str, str]) -> list[str]:
    """The fixtures whose lease is not held as *want* says, or whose owner is not live."""
    return [fx for fx, who in want.items() if leases.get(fx) != (who, "live")]


def stall_figures(
    reports: dict[str, dict[str, Any]], watched: Sequence[str], moved: Collection[str]
) -> dict[str, float]:
    """From the load generators' reports of one phase (instance -> report; subscriber k on
    fixture ``watched[k]``): the largest stall and the largest per-instance median, and the
    largest stalls of the fixtures *moved* in the phase (handed over and back) and of the
    others (what the machine adds whatever the cluster does), seconds."""
    stalls = [r["stall_ms"] or {} for r in reports.values()]
    moved_s, still_s = [0.0], [0.0]
    for s in stalls:
        for fx, ms in zip(watched, s.get("each") or [], strict=False):
            (moved_s if fx in moved else still_s).append(ms / 1000)
    return {
        "stall_max_s": max((s.get("max") or 0.0) for s in stalls) / 1000,
        "stall_p50_s": max((s.get("p50") or 0.0) for s in stalls) / 1000,
        "stall_moved_s": max(moved_s),
        "stall_still_s": max(still_s),
    }


_COLUMNS: Final = (
    ("stall_max_s", "stall, max (s)"),
    ("stall_p50_s", "stall, median (s)"),
    ("stall_moved_s", "stall, fixtures moved (s)"),
    ("stall_still_s", "stall, the others (s)"),
    ("lost", "lost"),
    ("duplicates", "repeated"),
    ("stop_max_s", "slowest stop (s)"),
    ("rebalance_max_s", "slowest rejoin (s)"),
    ("total_s", "whole restart (s)"),
    ("vendor_connects", "vendor connects"),
    ("load_max", "load (1 min), max"),
)


def table(results: list[dict[str, Any]]) -> str:
    """Medians per (fixtures, standby), the trials' values in brackets."""
    out = ["| fixtures | " + " | ".join(label for _, label in _COLUMNS) + " |"]
    out.append("|---" * (len(_COLUMNS) + 1) + "|")
    groups: dict[tuple[int, bool], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["fixtures"], r["standby"]), []).append(r)
    for (fixtures, standby), rs in sorted(groups.items()):
        cells = []
        for key, _ in _COLUMNS:
            values = [r[key] for r in rs]
            fmt = "{:.0f}" if isinstance(values[0], int) else "{:.2f}"
            each = " ".join(fmt.format(v) for v in values)
            cells.append(f"{fmt.format(statistics.median(values))} [{each}]")
        label = f"{fixtures}{', standby' if standby else ''}"
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)
