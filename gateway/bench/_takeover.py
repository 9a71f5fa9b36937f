"""How long a cluster takes to take over an instance's fixtures after that instance is killed.

Run: ``python -m gateway.bench._takeover --fixtures 50,200 --lease-ttl 10,3 --standby off,on
--runs 3`` (docs/performance.md, "Cluster"). Needs a redis-server (``$DDE_REDIS_SERVER`` or
PATH).

One trial, all processes fresh, on loopback: the bench's feeder (F fixtures x 25 Hz), a
redis-server of its own, gateway A (``[cluster]`` with the given ``lease_ttl``) started alone
until it owns every fixture (all live), then gateway B, which relays them all, with one
subscriber on each *watched* fixture on B (``--watched``, a share of F, spread evenly over the
ids: fixtures 0, F/S, 2F/S, ...; the load generator, ``--fanout spread``). Both gateways run
with ``[upstream] connect_rate`` = ``--connect-rate``, the vendor's 5 per second by default:
B's connects queue there, and the order they go in is what the trial shows. With ``--standby
on`` both run with ``[cluster] standby = true``, and the kill waits until B stands by for every
fixture (``standing_by`` of its ``GET /v1/cluster``: a warm vendor connection each, opened at
the same connect rate). Then A gets SIGKILL
(no chance to release anything), and from that instant:

- *lease*: when Redis names B as the holder of each fixture's lease (polled every 50 ms);
- *owner live*: when B's ``GET /v1/fixtures`` shows the fixture ``live`` on B's own upstream
  (``role`` ``owner`` where the API has it; else an upstream with a connect, which a relay
  does not have), the same polls;
  reported for the watched fixtures and for all;
- *first frame*: for each of B's subscribers, the arrival of the first frame the feeder made
  after the kill (the new owner's upstream resumes from the stream's last vendor position, so
  the frames made meanwhile come first, as a backfill);
- *stall*: for each of B's subscribers, the longest time between two fresh frames (a frame
  stamped later than any before it; the gap spanning the kill is the one that matters).

The trial fails (and says so) when B took any fixture before the kill: a configured fixture is
handed to its first-ranked instance once that one has been live for ``lease_ttl``, so the kill
comes as soon as B relays everything (well within 3 s).

Prints one line per trial and a table of medians per (fixtures, lease_ttl); ``--json PATH``
writes every trial.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from gateway.bench._feeder import fixture_id
from gateway.bench._redis import BenchRedis, RedisStartError
from gateway.bench._run import (
    READY_TIMEOUT,
    TOKEN_ENV,
    BenchError,
    _feeder,
    _gateway_process,
    _loadgen,
    _wait_receiving,
    cluster_leases,
    http_json,
    raise_nofile_limit,
    wait_owner,
)
from gateway.bench._scenario import Scenario
from gateway.config import DEFAULT_CONNECT_RATE

POLL: Final = 0.05
#: The trial gives up this long after the kill, beyond the lease's time to live and the time
#: the connect rate needs for every fixture.
GIVE_UP: Final = 60.0
#: The vendor's connect rate per token (``[upstream] connect_rate``'s default).
VENDOR_CONNECT_RATE: Final = DEFAULT_CONNECT_RATE
#: How many times the connect rate's own time a start may take (every fixture live on A, every
#: standby connection on B) on a loaded machine before the trial gives up.
START_SLACK: Final = 3.0
#: Share of the fixtures with a subscriber on B.
WATCHED_SHARE: Final = 0.1


def _owner_live(fx: dict[str, Any]) -> bool:
    """Whether a fixture of B's ``GET /v1/fixtures`` is live on B's own upstream."""
    if fx.get("state") != "live":
        return False
    if "role" in fx:
        return bool(fx["role"] == "owner")
    return int((fx.get("upstream") or {}).get("connects") or 0) >= 1


def trial(
    fixtures: int,
    lease_ttl: float,
    frame_bytes: int,
    *,
    say: Any,
    logs: Path | None = None,
    connect_rate: float = VENDOR_CONNECT_RATE,
    watched_share: float = WATCHED_SHARE,
    standby: bool = False,
) -> dict[str, Any]:
    """One kill and takeover (see the module docstring); its figures in seconds."""
    n_watched = max(1, min(fixtures, round(fixtures * watched_share)))
    stride = fixtures // n_watched
    sc = Scenario(
        name="takeover",
        subscribers=n_watched,
        fixtures=fixtures,
        rate=25.0,
        frame_bytes=frame_bytes,
        fanout="spread",
        cluster=True,
    )
    env = dict(os.environ, **{TOKEN_ENV: secrets.token_urlsafe(24)})
    ids = [fixture_id(i) for i in range(fixtures)]
    watched = [fixture_id(k * stride) for k in range(n_watched)]
    with tempfile.TemporaryDirectory(prefix="dde-takeover-") as name, contextlib.ExitStack() as st:
        tmp = Path(name)
        if logs is not None:  # copied when the trial ends, whatever happened
            mode = "standby" if standby else "plain"
            dest = logs / f"{fixtures}-{lease_ttl:g}-{mode}-{time.strftime('%H%M%S')}"
            st.callback(shutil.copytree, tmp, dest, ignore=shutil.ignore_patterns("redis*"))
        feeder = _feeder(sc, env, st.enter_context(open(tmp / "feeder.log", "wb")))
        st.callback(feeder.stop)
        port = int(feeder.expect("listening")["port"])
        try:
            redis = st.enter_context(BenchRedis(tmp / "redis"))
        except (RedisStartError, OSError) as exc:
            raise BenchError(str(exc)) from None
        kw: dict[str, Any] = {
            "redis_url": redis.url,
            "lease_ttl": lease_ttl,
            "connect_rate": connect_rate,
            "standby": standby,
        }
        a = st.enter_context(_gateway_process(sc, "bench-a", port, env, tmp, **kw))
        start_timeout = READY_TIMEOUT + START_SLACK * fixtures / connect_rate
        # Every lease A's (Redis), and every fixture live on A's own upstream (A's API: the
        # state in the metas can lag a loaded Redis).
        wait_owner(redis, "bench-a", fixtures, start_timeout, state=None)
        _wait_live(a.http, fixtures, start_timeout)
        b = st.enter_context(_gateway_process(sc, "bench-b", port, env, tmp, **kw))
        if standby:
            _wait_standing_by(b.http, fixtures, start_timeout)
        lg_log = st.enter_context(open(tmp / "loadgen.log", "wb"))
        loadgen = _loadgen("gateway", sc, b.stream, env, lg_log, name="loadgen", stride=stride)
        st.callback(loadgen.stop)
        loadgen.expect("connected")
        _wait_receiving(loadgen, sc, lambda text: None)
        early = [fx for fx, (who, _) in cluster_leases(redis, fixtures).items() if who != "bench-a"]
        if early:
            raise BenchError(f"bench-b took {len(early)} fixtures before the kill (rebalancing)")

        t0 = time.monotonic()
        kill_ns = time.monotonic_ns()
        os.kill(a.pid, signal.SIGKILL)
        loadgen.ask(f"drop {kill_ns}", "drop")
        lease_at: dict[str, float] = {}
        live_at: dict[str, float] = {}
        while len(live_at) < fixtures:
            now = time.monotonic() - t0
            if now > lease_ttl + fixtures / connect_rate + GIVE_UP:
                raise BenchError(
                    f"after {now:.0f} s bench-b owns {len(lease_at)} and has {len(live_at)} "
                    f"of {fixtures} live"
                )
            for fx, (who, _) in cluster_leases(redis, fixtures).items():
                if who == "bench-b":
                    lease_at.setdefault(fx, now)
            try:
                view = http_json(b.http, "/v1/fixtures")
            except (OSError, ValueError):
                view = []
            for fx in view:
                if fx["fixture"] in lease_at and _owner_live(fx):
                    live_at.setdefault(fx["fixture"], time.monotonic() - t0)
            time.sleep(POLL)
        deadline = time.monotonic() + 5.0
        while True:  # every subscriber's first frame made after the kill
            report = loadgen.ask("report", "report")
            fresh = report["fresh_ms"] or {}
            if fresh.get("count", 0) >= n_watched or time.monotonic() > deadline:
                break
            time.sleep(0.2)

    leases = sorted(lease_at[fx] for fx in ids if fx in lease_at)
    lives = sorted(live_at[fx] for fx in ids)
    watched_lives = sorted(live_at[fx] for fx in watched)
    stall = report["stall_ms"] or {}
    result = {
        "fixtures": fixtures,
        "lease_ttl": lease_ttl,
        "standby": standby,
        "connect_rate": connect_rate,
        "watched": n_watched,
        "lease_first_s": leases[0],
        "lease_all_s": leases[-1],
        "watched_live_p50_s": statistics.median(watched_lives),
        "watched_live_all_s": watched_lives[-1],
        "owner_live_p50_s": statistics.median(lives),
        "owner_live_all_s": lives[-1],
        "first_frame_count": fresh.get("count", 0),
        "first_frame_p50_s": (fresh.get("p50") or 0) / 1000,
        "first_frame_max_s": (fresh.get("max") or 0) / 1000,
        "stall_p50_s": (stall.get("p50") or 0) / 1000,
        "stall_max_s": (stall.get("max") or 0) / 1000,
    }
    say(
        f"{fixtures} fixtures ({n_watched} watched), lease_ttl {lease_ttl:g}, standby "
        f"{'on' if standby else 'off'}, connect_rate "
        f"{connect_rate:g}: leases {leases[0]:.2f}-{leases[-1]:.2f} s, watched owner+live median "
        f"{result['watched_live_p50_s']:.2f} s, last {watched_lives[-1]:.2f} s; all owner+live "
        f"median {result['owner_live_p50_s']:.2f} s, last {lives[-1]:.2f} s; first frame median "
        f"{result['first_frame_p50_s']:.2f} s, last {result['first_frame_max_s']:.2f} s "
        f"({result['first_frame_count']} of {n_watched} subscribers); stall median "
        f"{result['stall_p50_s']:.2f} s, max {result['stall_max_s']:.2f} s"
    )
    return result


def _wait_live(http: int, fixtures: int, timeout: float) -> None:
    """Wait until the gateway on HTTP port *http* has *fixtures* fixtures live on its own
    upstream (``GET /v1/fixtures``); :class:`BenchError` after *timeout*."""
    t0 = time.monotonic()
    live = 0
    while time.monotonic() - t0 < timeout:
        try:
            live = sum(1 for fx in http_json(http, "/v1/fixtures") if _owner_live(fx))
        except (OSError, ValueError):
            live = 0
        if live >= fixtures:
            return
        time.sleep(0.2)
    raise BenchError(f"bench-a has {live} of {fixtures} fixtures live after {timeout:.0f} s")


def _wait_standing_by(http: int, fixtures: int, timeout: float) -> None:
    """Wait until the gateway on HTTP port *http* stands by for *fixtures* fixtures (its
    ``GET /v1/cluster`` ``standing_by``); :class:`BenchError` after *timeout*."""
    t0 = time.monotonic()
    had = 0
    while time.monotonic() - t0 < timeout:
        try:
            had = int(http_json(http, "/v1/cluster")["standing_by"])
        except (OSError, ValueError, KeyError, TypeError):
            had = 0
        if had >= fixtures:
            return
        time.sleep(0.2)
    raise BenchError(f"bench-b stands by for {had} of {fixtures} fixtures after {timeout:.0f} s")


_COLUMNS: Final = (
    ("lease_all_s", "all leases"),
    ("watched_live_p50_s", "watched live, median"),
    ("watched_live_all_s", "watched live, last"),
    ("owner_live_p50_s", "all live, median"),
    ("owner_live_all_s", "all live, last"),
    ("first_frame_max_s", "first frame, last subscriber"),
    ("stall_p50_s", "stall, median"),
    ("stall_max_s", "stall, max"),
)


def table(results: list[dict[str, Any]]) -> str:
    """Medians per (fixtures, lease_ttl, standby), the trials' values in brackets, seconds."""
    out = ["| fixtures, lease_ttl, standby | " + " | ".join(label for _, label in _COLUMNS) + " |"]
    out.append("|---" * (len(_COLUMNS) + 1) + "|")
    groups: dict[tuple[int, float, bool], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["fixtures"], r["lease_ttl"], r.get("standby", False)), []).append(r)
    for (fixtures, ttl, standby), rs in sorted(groups.items()):
        cells = []
        for key, _ in _COLUMNS:
            values = [r[key] for r in rs]
            each = " ".join(f"{v:.2f}" for v in values)
            cells.append(f"{statistics.median(values):.2f} [{each}]")
        mode = "on" if standby else "off"
        out.append(f"| {fixtures}, {ttl:g} s, {mode} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.bench._takeover")
    parser.add_argument("--fixtures", default="50,200", metavar="N[,N...]")
    parser.add_argument("--lease-ttl", default="10,3", metavar="S[,S...]")
    parser.add_argument(
        "--standby",
        default="off",
        metavar="off|on[,...]",
        help="[cluster] standby on both gateways (default %(default)s; off,on: both)",
    )
    parser.add_argument("--runs", type=int, default=3, help="trials per combination")
    parser.add_argument("--frame-bytes", type=int, default=3000)
    parser.add_argument(
        "--connect-rate",
        type=float,
        default=VENDOR_CONNECT_RATE,
        metavar="PER_S",
        help="both gateways' [upstream] connect_rate (default: the vendor's %(default)g)",
    )
    parser.add_argument(
        "--watched",
        type=float,
        default=WATCHED_SHARE,
        metavar="SHARE",
        help="share of the fixtures with a subscriber on B (default %(default)g)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    parser.add_argument(
        "--logs", type=Path, default=None, metavar="DIR", help="keep each trial's logs in DIR"
    )
    args = parser.parse_args(argv)
    if not args.connect_rate > 0:
        parser.error("--connect-rate must be > 0")
    if not 0 < args.watched <= 1:
        parser.error("--watched must be in (0, 1]")
    counts = [int(x) for x in args.fixtures.split(",")]
    ttls = [float(x) for x in args.lease_ttl.split(",")]
    modes = [x.strip() for x in args.standby.split(",")]
    if not modes or any(m not in ("on", "off") for m in modes):
        parser.error("--standby takes on, off or both (off,on)")
    raise_nofile_limit()

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    results: list[dict[str, Any]] = []
    errors: list[str] = []
    for run in range(args.runs):  # interleaved: every combination once per round
        for fixtures, ttl, mode in itertools.product(counts, ttls, modes):
            try:
                results.append(
                    trial(
                        fixtures,
                        ttl,
                        args.frame_bytes,
                        say=say,
                        logs=args.logs,
                        connect_rate=args.connect_rate,
                        watched_share=args.watched,
                        standby=mode == "on",
                    )
                )
            except (BenchError, OSError) as exc:
                errors.append(
                    f"run {run + 1}, {fixtures} fixtures, ttl {ttl:g}, standby {mode}: {exc}"
                )
                say(f"ERROR {errors[-1]}")
    print(table(results))
    if args.json is not None:
        args.json.write_text(json.dumps({"trials": results, "errors": errors}, indent=2) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
