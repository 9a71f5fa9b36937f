"""How a cluster of three gateways goes through a rolling restart: stalls, losses, time.

Run: ``python -m gateway.bench._rolling --fixtures 50,200 --runs 3`` (docs/performance.md,
"Cluster"). Needs a redis-server (``$DDE_REDIS_SERVER`` or PATH).

One trial, all processes fresh, on loopback: the bench's feeder (F fixtures x 25 Hz), a
redis-server of its own and three gateways (``[cluster]`` with ``--lease-ttl``, ``[upstream]
connect_rate`` = ``--connect-rate``, the vendor's 5 per second by default, ``drain_timeout``
long enough for a stop to hand its share over at that rate), started together and left to
settle: every fixture's lease held by its rendezvous first choice, its state ``live``.
Each gateway has a load generator with one subscriber per fixture (``--fanout spread``; a
share of them, spread evenly over the ids, with ``--watched``).

Then each instance in turn, a *phase*: SIGTERM; it hands its fixtures over make-before-break
and exits (its status must be 0); the others own everything (settled as rendezvous over the
two); it is started again with a new load generator; it takes its share back (settled as at
the start). From the SIGTERM to the end of the phase, for every subscriber of the two other
instances (and of the restarted one from its first frame on) the *stall*: the longest time
between two fresh frames (a frame stamped later than any before: the load generator's
``drop``). Per phase and instance the median and the largest stall over the fixtures; the
stopped instance's own subscribers are closed (1001) and not counted (a client reconnects,
with ``after``, elsewhere: ``tests/test_cluster_rolling.py`` checks that).

Per trial: the largest stall anywhere, the largest per-instance median, the frames lost and
repeated over all subscribers (by the feeder's ``ix``, each subscriber's own, across its whole
life), how long each stop took (SIGTERM to exit) and the rebalance after each restart, the
whole rolling restart (first SIGTERM to the last phase settled), the vendor connections
opened meanwhile (ideally two per fixture: one handover out, one back), the machine's load
average, and the instances' cluster counters that say what went wrong (:data:`COUNTERS`:
handover fallbacks, fencing, appends dropped, Redis failures; ``GET /v1/cluster``).
``--standby`` adds ``standby = true`` to ``[cluster]`` (hot standby, docs/cluster.md).

Prints one line per phase and trial and a table of medians per fixture count; ``--json PATH``
writes every trial.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Final

import attrs

from gateway.bench._feeder import fixture_id
from gateway.bench._redis import BenchRedis, RedisReplyError, RedisStartError
from gateway.bench._rollfigures import (
    INSTANCES,
    ROOM,
    drain_timeout,
    owners,
    stall_figures,
    table,
    unsettled,
)
from gateway.bench._run import (
    TOKEN_ENV,
    BenchError,
    _Child,
    _feeder,
    _gateway_process,
    _Instance,
    _loadgen,
    _wait_receiving,
    cluster_leases,
    http_json,
    raise_nofile_limit,
)
from gateway.bench._scenario import Scenario
from gateway.config import DEFAULT_CONNECT_RATE

POLL: Final = 0.1
#: The vendor's connect rate per token (``[upstream] connect_rate``'s default).
VENDOR_CONNECT_RATE: Final = DEFAULT_CONNECT_RATE
DEFAULT_LEASE_TTL: Final = 5.0
#: Kept running after a phase settled, so a stall at its very end is seen.
TAIL: Final = 1.0
#: The cluster counters of each instance summed into a trial's result (docs/cluster.md).
COUNTERS: Final = (
    "handovers_warm",
    "handover_fallbacks",
    "fenced",
    "leases_lost",
    "append_dropped",
    "append_lost",
    "append_failures",
    "relay_failures",
)

Say = Callable[[str], None]


@attrs.define
class _Member:
    """One instance's current life: its process context, the process and its load generator."""

    stack: contextlib.ExitStack
    inst: _Instance
    loadgen: _Child
    #: Its cluster counters (:data:`COUNTERS`) as last read.
    counters: dict[str, int] = attrs.field(factory=dict)


class _Trial:
    """One rolling restart (see the module docstring)."""

    def __init__(
        self,
        fixtures: int,
        *,
        lease_ttl: float,
        connect_rate: float,
        frame_bytes: int,
        standby: bool,
        watched: float,
        say: Say,
    ) -> None:
        self.fixtures = fixtures
        self.connect_rate = connect_rate
        self.say = say
        n_watched = max(1, min(fixtures, round(fixtures * watched)))
        #: Subscriber k of each load generator takes fixture k * stride.
        self.stride = fixtures // n_watched
        self.watched = [fixture_id(k * self.stride % fixtures) for k in range(n_watched)]
        self.sc = Scenario(
            name="rolling",
            subscribers=n_watched,
            fixtures=fixtures,
            rate=25.0,
            frame_bytes=frame_bytes,
            fanout="spread",
            cluster=True,
        )
        self.env = dict(os.environ, **{TOKEN_ENV: secrets.token_urlsafe(24)})
        self.drain = drain_timeout(fixtures, connect_rate)
        self.keys: dict[str, Any] = {
            "lease_ttl": lease_ttl,
            "connect_rate": connect_rate,
            "drain_timeout": self.drain,
            "cluster_extra": ["standby = true"] if standby else [],
        }
        self.members: dict[str, _Member] = {}
        #: Lost and repeated frames of every load generator that has ended.
        self.lost = 0
        self.duplicates = 0
        #: :data:`COUNTERS` summed over every instance's lives.
        self.counters: dict[str, int] = {}

    # -- processes -------------------------------------------------------------------------

    def start(self, name: str, tmp: Path, port: int, *, life: int = 0) -> None:
        """Start instance *name* and a load generator on it; wait until every subscriber
        has had a frame."""
        with contextlib.ExitStack() as stack:  # closed here on a failure, else kept
            inst = stack.enter_context(
                _gateway_process(self.sc, name, port, self.env, tmp, life=life, **self.keys)
            )
            log = stack.enter_context(open(tmp / f"loadgen-{name}.{life}.log", "wb"))
            loadgen = _loadgen(
                "gateway", self.sc, inst.stream, self.env, log, name=name, stride=self.stride
            )
            stack.callback(loadgen.stop)
            loadgen.expect("connected")
            self.members[name] = _Member(stack.pop_all(), inst, loadgen)

    def receiving(self, name: str) -> None:
        _wait_receiving(self.members[name].loadgen, self.sc, lambda text: None)

    def end_loadgen(self, member: _Member) -> dict[str, Any]:
        """The load generator's last report; its losses counted (and said, if any)."""
        report = member.loadgen.ask("report", "report")
        lost, repeated = int(report["lost"] or 0), int(report["duplicates"] or 0)
        self.lost += lost
        self.duplicates += repeated
        if lost or repeated:
            self.say(
                f"  {member.inst.name}'s subscribers: {lost} frames lost, {repeated} repeated "
                f"(first: {report['ix_events']})"
            )
        member.loadgen.stop()
        return report

    def read_counters(self, member: _Member) -> None:
        """Keep the instance's cluster counters (``GET /v1/cluster``) as of now, if it
        answers: what went wrong where (fallbacks, drops) is counted there."""
        try:
            counters = http_json(member.inst.http, "/v1/cluster")["counters"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        member.counters = {k: int(counters.get(k) or 0) for k in COUNTERS}

    def end_counters(self, member: _Member) -> None:
        for key, value in member.counters.items():
            self.counters[key] = self.counters.get(key, 0) + value

    def stop(self, name: str) -> tuple[float, dict[str, Any]]:
        """SIGTERM instance *name*, wait for it to exit 0: (seconds, its subscribers' last
        report). :class:`BenchError` if it does not exit in time or exits otherwise."""
        member = self.members.pop(name)
        proc = member.inst.proc
        assert proc is not None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        status: int | None = None
        while status is None:  # its counters while it drains: the handovers of its stop
            self.read_counters(member)
            try:
                status = proc.wait(1.0)
            except subprocess.TimeoutExpired:
                if time.monotonic() - t0 > self.drain + ROOM:
                    member.stack.close()
                    raise BenchError(
                        f"{name} did not exit within {self.drain + ROOM:.0f} s"
                    ) from None
        took = time.monotonic() - t0
        self.end_counters(member)
        report = self.end_loadgen(member)
        member.stack.close()
        if status != 0:
            raise BenchError(f"{name} exited with status {status} after SIGTERM")
        return took, report

    def close(self) -> None:
        for member in list(self.members.values()):
            self.read_counters(member)
            self.end_counters(member)
            with contextlib.suppress(BenchError, OSError):
                self.end_loadgen(member)
            member.stack.close()
        self.members.clear()

    # -- waits -----------------------------------------------------------------------------

    def settle(self, redis: BenchRedis, instances: Sequence[str], what: str) -> float:
        """Wait until every fixture is owned, live, by its rendezvous choice among
        *instances*; the seconds it took."""
        want = owners(self.fixtures, instances)
        timeout = 2 * self.fixtures / self.connect_rate + 2 * ROOM
        t0 = time.monotonic()
        left = list(want)
        while True:
            try:
                left = unsettled(cluster_leases(redis, self.fixtures), want)
            except (OSError, RedisReplyError):
                pass  # a busy machine: Redis slower than the poll's timeout; ask again
            if not left:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise BenchError(f"{what}: {len(left)} fixtures not settled after {timeout:.0f} s")
            time.sleep(POLL)

    def mark(self, names: Sequence[str]) -> None:
        """Start measuring stalls on these instances' subscribers from now."""
        now = time.monotonic_ns()
        for name in names:
            self.members[name].loadgen.ask(f"drop {now}", "drop")

    def reports(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {name: self.members[name].loadgen.ask("report", "report") for name in names}

    # -- the trial -------------------------------------------------------------------------

    def run(self, tmp: Path, st: contextlib.ExitStack, feeder_log: IO[bytes]) -> dict[str, Any]:
        feeder = _feeder(self.sc, self.env, feeder_log)
        st.callback(feeder.stop)
        port = int(feeder.expect("listening")["port"])
        try:
            redis = st.enter_context(BenchRedis(tmp / "redis"))
        except (RedisStartError, OSError) as exc:
            raise BenchError(str(exc)) from None
        self.keys["redis_url"] = redis.url
        st.callback(self.close)
        # All three at once: each claims its share from its second round (docs/cluster.md),
        # nothing to rebalance before the trial.
        with concurrent.futures.ThreadPoolExecutor(len(INSTANCES)) as pool:
            for started in [pool.submit(self.start, name, tmp, port) for name in INSTANCES]:
                started.result()
        took = self.settle(redis, INSTANCES, "start")
        for name in INSTANCES:
            self.receiving(name)
        self.say(f"{self.fixtures} fixtures: 3 instances settled {took:.1f} s after they started")

        accepted0 = int(feeder.ask("stats", "stats")["accepted"])
        began = time.monotonic()
        phases: list[dict[str, Any]] = []
        for name in INSTANCES:
            others = [n for n in INSTANCES if n != name]
            self.mark(others)
            stop_s, closed = self.stop(name)
            self.settle(redis, others, f"{name} stopped")
            t_start = time.monotonic()
            self.start(name, tmp, port, life=1)
            self.receiving(name)
            self.mark([name])
            back_s = self.settle(redis, INSTANCES, f"{name} back")
            time.sleep(TAIL)
            phase = {
                "stopped": name,
                "stop_s": stop_s,
                "rebalance_s": time.monotonic() - t_start - TAIL,
                "settle_after_ready_s": back_s,
                "closed": closed["closed"],
                # The machine's load when the phase ended: on a shared host, read it beside
                # the stalls (a starved process stalls its fixtures whatever the cluster does).
                "load": os.getloadavg()[0],
                **stall_figures(
                    self.reports([*others, name]),
                    self.watched,
                    [fx for fx, who in owners(self.fixtures, INSTANCES).items() if who == name],
                ),
            }
            phases.append(phase)
            self.say(
                f"  {name}: stop {stop_s:.1f} s, share back {phase['rebalance_s']:.1f} s after "
                f"its start; stall max {phase['stall_max_s']:.2f} s, median "
                f"{phase['stall_p50_s']:.2f} s (fixtures moved {phase['stall_moved_s']:.2f} s, "
                f"the others {phase['stall_still_s']:.2f} s); its subscribers closed "
                f"{closed['closed']}; "
                f"load {phase['load']:.1f}"
            )
        total = time.monotonic() - began
        connects = int(feeder.ask("stats", "stats")["accepted"]) - accepted0
        self.close()
        noted = {k: v for k, v in self.counters.items() if v and k != "handovers_warm"}
        result = {
            "fixtures": self.fixtures,
            "lease_ttl": self.keys["lease_ttl"],
            "connect_rate": self.connect_rate,
            "standby": bool(self.keys["cluster_extra"]),
            "watched": self.sc.subscribers,
            "phases": phases,
            "stall_max_s": max(p["stall_max_s"] for p in phases),
            "stall_p50_s": max(p["stall_p50_s"] for p in phases),
            "stall_moved_s": max(p["stall_moved_s"] for p in phases),
            "stall_still_s": max(p["stall_still_s"] for p in phases),
            "stop_max_s": max(p["stop_s"] for p in phases),
            "rebalance_max_s": max(p["rebalance_s"] for p in phases),
            "total_s": total,
            "vendor_connects": connects,
            "load_max": max(p["load"] for p in phases),
            "counters": self.counters,
            "lost": self.lost,
            "duplicates": self.duplicates,
        }
        self.say(
            f"{self.fixtures} fixtures: rolling restart {total:.1f} s; stall max "
            f"{result['stall_max_s']:.2f} s, median {result['stall_p50_s']:.2f} s; lost "
            f"{self.lost}, repeated {self.duplicates}; {connects} vendor connects; "
            f"{self.counters.get('handovers_warm', 0)} handovers make-before-break, "
            f"what went wrong: {noted or 'nothing'}"
        )
        return result


def trial(
    fixtures: int,
    *,
    lease_ttl: float,
    connect_rate: float = VENDOR_CONNECT_RATE,
    frame_bytes: int = 3000,
    standby: bool = False,
    watched: float = 1.0,
    say: Say,
    logs: Path | None = None,
) -> dict[str, Any]:
    """One rolling restart of three fresh instances (the module docstring); its figures."""
    t = _Trial(
        fixtures,
        lease_ttl=lease_ttl,
        connect_rate=connect_rate,
        frame_bytes=frame_bytes,
        standby=standby,
        watched=watched,
        say=say,
    )
    with tempfile.TemporaryDirectory(prefix="dde-rolling-") as name, contextlib.ExitStack() as st:
        tmp = Path(name)
        if logs is not None:  # copied when the trial ends, whatever happened
            dest = logs / f"{fixtures}-{time.strftime('%H%M%S')}"
            st.callback(shutil.copytree, tmp, dest, ignore=shutil.ignore_patterns("redis*"))
        return t.run(tmp, st, st.enter_context(open(tmp / "feeder.log", "wb")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.bench._rolling")
    parser.add_argument("--fixtures", default="50,200", metavar="N[,N...]")
    parser.add_argument("--lease-ttl", type=float, default=DEFAULT_LEASE_TTL, metavar="S")
    parser.add_argument("--runs", type=int, default=3, help="trials per fixture count")
    parser.add_argument("--frame-bytes", type=int, default=3000)
    parser.add_argument(
        "--connect-rate",
        type=float,
        default=VENDOR_CONNECT_RATE,
        metavar="PER_S",
        help="the gateways' [upstream] connect_rate (default: the vendor's %(default)g)",
    )
    parser.add_argument(
        "--standby", action="store_true", help="[cluster] standby = true (hot standby)"
    )
    parser.add_argument(
        "--watched",
        type=float,
        default=1.0,
        metavar="SHARE",
        help="share of the fixtures with a subscriber on each instance (default: every one; "
        "fewer spare a small machine's CPU)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    parser.add_argument(
        "--logs", type=Path, default=None, metavar="DIR", help="keep each trial's logs in DIR"
    )
    args = parser.parse_args(argv)
    if not args.connect_rate > 0:
        parser.error("--connect-rate must be > 0")
    if not args.lease_ttl > 0:
        parser.error("--lease-ttl must be > 0")
    if not 0 < args.watched <= 1:
        parser.error("--watched must be in (0, 1]")
    try:
        counts = [int(x) for x in args.fixtures.split(",")]
    except ValueError:
        parser.error("--fixtures takes numbers separated by commas")
    if any(n < len(INSTANCES) for n in counts):
        parser.error(f"--fixtures: at least {len(INSTANCES)} (one per instance)")
    raise_nofile_limit()

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    results: list[dict[str, Any]] = []
    errors: list[str] = []
    for run in range(args.runs):  # interleaved: every count once per round
        for fixtures in counts:
            try:
                results.append(
                    trial(
                        fixtures,
                        lease_ttl=args.lease_ttl,
                        connect_rate=args.connect_rate,
                        frame_bytes=args.frame_bytes,
                        standby=args.standby,
                        watched=args.watched,
                        say=say,
                        logs=args.logs,
                    )
                )
            except (BenchError, OSError) as exc:
                errors.append(f"run {run + 1}, {fixtures} fixtures: {exc}")
                say(f"ERROR {errors[-1]}")
            if args.json is not None:  # after every trial: a long run interrupted keeps them
                text = json.dumps({"trials": results, "errors": errors}, indent=2)
                args.json.write_text(text + "\n")
    if results:
        print(table(results))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
