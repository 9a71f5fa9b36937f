"""Targets and the printed table.

Each figure of a gateway run is shown next to the peer's and, where the issue sets one, its
target and whether it was met. A missed target is a finding to report, not a harness failure.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Final

from gateway.bench._scenario import BENCH_BACKOFF_INITIAL, BENCH_QUEUE_BYTES

Result = dict[str, Any]

#: Target values from the issue (docs/performance.md).
SATURATED_RATIO: Final = 1.5
PACED_P99_MS: Final = 5.0
CPU_PERCENT_MAX: Final = 50.0
STUCK_P99_SLACK: Final = 1.10
DROP_SLACK_MS: Final = 200.0
IDLE_BYTES_MAX: Final = 30_000


def _lat(q: str) -> Callable[[Result], float | None]:
    return lambda r: r["latency_ms"][q] if r["latency_ms"]["count"] else None


def _each(run: Result, key: str, fmt: str) -> str | None:
    """*key* of every instance of a several-instance run, " / "-separated (else None)."""
    instances = run.get("instances") or []
    if len(instances) < 2:
        return None
    return " / ".join("-" if i.get(key) is None else fmt.format(i[key]) for i in instances)


#: From this share of stolen CPU time on, the report warns about latency tails.
STEAL_NOTE_PERCENT: Final = 2.0

# (key, label, how to read it from a run, format)
ROWS: Final[list[tuple[str, str, Callable[[Result], Any], str]]] = [
    ("frames_in_per_s", "frames in /s", lambda r: r["frames_in_per_s"], "{:,.0f}"),
    ("frames_out_per_s", "deliveries (frames out) /s", lambda r: r["frames_out_per_s"], "{:,.0f}"),
    (
        "deliveries_per_cpu_s",
        "deliveries per CPU-second",
        lambda r: r["deliveries_per_cpu_s"],
        "{:,.0f}",
    ),
    (
        "us_cpu_per_delivery",
        "CPU us per delivery",
        lambda r: r.get("us_cpu_per_delivery"),
        "{:.2f}",
    ),
    (
        "writes_per_delivery",
        "write syscalls per delivery",
        lambda r: r.get("writes_per_delivery"),
        "{:.3f}",
    ),
    (
        "wire_bytes_per_frame",
        "payload bytes per frame",
        lambda r: r.get("wire_bytes_per_frame"),
        "{:,.0f}",
    ),
    ("cpu_percent", "CPU % of one core", lambda r: r["cpu_percent"], "{:.1f}"),
    (
        "instances_cpu",
        "CPU % per instance",
        lambda r: _each(r, "cpu_percent", "{:.1f}"),
        "{}",
    ),
    (
        "instances_subscribers",
        "subscribers per instance",
        lambda r: _each(r, "subscribers", "{}"),
        "{}",
    ),
    (
        "frames_appended_per_s",
        "frames appended to redis /s",
        lambda r: (r.get("redis") or {}).get("frames_appended_per_s"),
        "{:,.0f}",
    ),
    (
        "frames_per_append",
        "frames per append request",
        lambda r: (r.get("redis") or {}).get("frames_per_append"),
        "{:.1f}",
    ),
    (
        "redis_cpu_percent",
        "redis CPU % of one core",
        lambda r: r.get("redis_cpu_percent"),
        "{:.1f}",
    ),
    ("p50", "added latency p50 ms", _lat("p50"), "{:.2f}"),
    ("p99", "added latency p99 ms", _lat("p99"), "{:.2f}"),
    ("p999", "added latency p99.9 ms", _lat("p999"), "{:.2f}"),
    ("peak_rss_mib", "peak RSS MiB", lambda r: r["peak_rss_kib"] / 1024, "{:.1f}"),
    (
        "rss_per_idle_kb",
        "RSS per idle subscriber KB",
        lambda r: None if r["rss_per_idle_kib"] is None else r["rss_per_idle_kib"] * 1.024,
        "{:.1f}",
    ),
    ("drop_to_fresh_ms", "drop -> first fresh frame ms", lambda r: r["drop_to_fresh_ms"], "{:.0f}"),
    (
        "stuck_closed",
        "stuck subscribers closed by it",
        lambda r: r["stuck_closed"] if r.get("stuck") else None,
        "{:d}",
    ),
    (
        "idle_open",
        "idle subscribers still open",
        lambda r: r["idle_open"] if r["rss_per_idle_kib"] is not None else None,
        "{:d}",
    ),
    (
        "healthy_closed",
        "healthy subscribers closed",
        lambda r: r["healthy"] - r["healthy_open"],
        "{:d}",
    ),
    ("loadgen_cpu_percent", "(load generator CPU %)", lambda r: r["loadgen_cpu_percent"], "{:.0f}"),
    ("feeder_cpu_percent", "(feeder CPU %)", lambda r: r["feeder_cpu_percent"], "{:.0f}"),
    ("load_average", "(machine load average, 1 min)", lambda r: r["load_average"], "{:.1f}"),
    ("steal_percent", "(machine CPU stolen by host %)", lambda r: r.get("steal_percent"), "{:.1f}"),
]


#: Rows only a cluster run has (``--cluster``; the per-instance ones with several instances).
CLUSTER_ROWS: Final = frozenset(
    {
        "instances_cpu",
        "instances_subscribers",
        "frames_appended_per_s",
        "frames_per_append",
        "redis_cpu_percent",
    }
)


def _get(res: Result, kind: str, phase: str, key: str) -> Any:
    run = res["runs"].get(kind, {}).get(phase)
    if run is None:
        return None
    for k, _, read, _ in ROWS:
        if k == key:
            return read(run)
    raise KeyError(key)


def _check(
    figure: str, target: str, value: Any, ok: bool | None, *, derived: bool = False
) -> Result:
    """``derived``: *value* is computed from the figure (a ratio, a growth), so the table
    shows it beside the verdict."""
    return {"figure": figure, "target": target, "value": value, "ok": ok, "derived": derived}


def evaluate(res: Result) -> list[Result]:
    """The issue's targets that apply to this scenario, each with its value and verdict
    (``ok`` None when a figure is missing, e.g. the peer was not run)."""
    name = res["scenario"]["name"]

    def gw(key: str, phase: str = "main") -> Any:
        return _get(res, "gateway", phase, key)

    checks: list[Result] = []

    def add(figure: str, target: str, value: Any, ok: Callable[[Any], bool], **kw: bool) -> None:
        checks.append(_check(figure, target, value, None if value is None else ok(value), **kw))

    if name == "saturated":
        g, p = gw("deliveries_per_cpu_s"), _get(res, "peer", "main", "deliveries_per_cpu_s")
        ratio = g / p if g and p else None
        add(
            "deliveries_per_cpu_s",
            f">= {SATURATED_RATIO}x peer",
            ratio,
            lambda v: v >= SATURATED_RATIO,
            derived=True,
        )
    if name == "paced":
        add("p99", f"<= {PACED_P99_MS:g} ms", gw("p99"), lambda v: v <= PACED_P99_MS)
    if name in ("paced", "ingest"):
        add(
            "cpu_percent",
            f"< {CPU_PERCENT_MAX:g}%",
            gw("cpu_percent"),
            lambda v: v < CPU_PERCENT_MAX,
        )
    if name == "stuck":
        base, stuck = gw("p99", "baseline"), gw("p99")
        ratio = stuck / base if stuck is not None and base else None
        add(
            "p99",
            f"<= {STUCK_P99_SLACK:.2f}x baseline",
            ratio,
            lambda v: v <= STUCK_P99_SLACK,
            derived=True,
        )
        base_rss, rss = gw("peak_rss_mib", "baseline"), gw("peak_rss_mib")
        budget = res["scenario"]["stuck"] * BENCH_QUEUE_BYTES / 2**20
        growth = rss - base_rss if rss is not None and base_rss is not None else None
        add(
            "peak_rss_mib",
            f"growth <= {budget:.0f} MiB (their queues)",
            growth,
            lambda v: v <= budget,
            derived=True,
        )
    if name == "drop":
        limit = BENCH_BACKOFF_INITIAL * 1000 + DROP_SLACK_MS
        add("drop_to_fresh_ms", f"<= {limit:.0f} ms", gw("drop_to_fresh_ms"), lambda v: v <= limit)
    if name == "idle":
        add(
            "rss_per_idle_kb",
            f"<= {IDLE_BYTES_MAX / 1000:g} KB",
            gw("rss_per_idle_kb"),
            lambda v: v * 1000 <= IDLE_BYTES_MAX,
        )
    return checks


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def format_table(results: Sequence[Result]) -> str:
    """The human table: one block per scenario (and phase), rows with a figure only."""
    head = f"{'scenario':<24} {'figure':<30} {'gateway':>11} {'peer':>11} {'gw/peer':>8}  target"
    out = [head, "-" * len(head)]
    for res in results:
        name = res["scenario"]["name"]
        checks = {c["figure"]: c for c in res.get("checks", [])}
        gw_phases = res["runs"].get("gateway", {})
        phases = [p for p in ("baseline", "main", "relay") if p == "main" or p in gw_phases]
        sc = res["scenario"]
        if sc.get("write_delay"):
            name = f"{name} wd={sc['write_delay']:g}"
        if sc.get("compression", "off") != "off":
            name = f"{name} {sc['compression']}"
        if sc.get("loadgen_nice"):
            name = f"{name} nice={sc['loadgen_nice']}"
        if sc.get("cluster"):
            count = sc.get("instances", 1)
            name = f"{name} cluster" if count == 1 else f"{name} x{count}"
        for phase in phases:
            label = name if phase == "main" else f"{name} ({phase})"
            if phase == "main" and sc["stuck"]:
                label = f"{name} ({sc['stuck']} of {sc['subscribers'] + sc['stuck']})"
            for key, text, _, fmt in ROWS:
                g = _get(res, "gateway", phase, key)
                p = _get(res, "peer", phase, key)
                if g is None and p is None:
                    continue
                numbers = isinstance(g, float | int) and isinstance(p, float | int)
                ratio = f"{g / p:.2f}" if numbers and p and not key.startswith("healthy") else ""
                target = ""
                check = checks.get(key) if phase == "main" else None
                if check is not None:
                    verdict = {True: "MET", False: "MISSED", None: "n/a"}[check["ok"]]
                    shown = check["derived"] and check["value"] is not None
                    extra = f" ({check['value']:.2f})" if shown else ""
                    target = f"{check['target']}: {verdict}{extra}"
                cells = f"{_fmt(g, fmt):>11} {_fmt(p, fmt):>11} {ratio:>8}"
                out.append(f"{label:<24} {text:<30} {cells}  {target}")
                label = ""
        for error in res.get("errors", []):
            out.append(f"{'':<24} ERROR {error}")
        out.append("")
    cpus = os.cpu_count() or 1
    loads = [
        run["load_average"]
        for res in results
        for phases in res["runs"].values()
        for run in phases.values()
    ]
    if loads and max(loads) > cpus:
        out.append(
            f"note: the machine's load average reached {max(loads):.1f} on {cpus} CPUs: other "
            "work competed with the run; latencies are the least trustworthy figures."
        )
    steals = [
        run.get("steal_percent") or 0.0
        for res in results
        for phases in res["runs"].values()
        for run in phases.values()
    ]
    if steals and max(steals) >= STEAL_NOTE_PERCENT:
        out.append(
            f"note: the hypervisor took up to {max(steals):.1f} % of this machine's CPU time "
            "during a window (steal): the virtual CPUs stalled now and then, which shows in the "
            "latency tails (p99, p99.9) of every target alike."
        )
    return "\n".join(out)
