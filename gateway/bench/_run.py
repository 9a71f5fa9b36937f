"""Process orchestration: one scenario, one target (gateway or peer), one measured window.

Every run starts fresh processes on loopback and stops them afterwards, whatever happens:

    feeder   python -m gateway.bench._feeder      (JSON lines on stdout, commands on stdin)
    target   python -m gateway run --config TMP   (generated TOML, token via token_env)
             or python gateway/bench/_peer.py   (the websockets relay, by its path)
    loadgen  python -m gateway.bench._loadgen

The target's CPU time is read from /proc/<pid>/stat at the start and the end of the measured
window only (warm-up and connection set-up are excluded); memory from /proc/<pid>/status.
Ports are picked by binding port 0 and closing: another process could take one in between,
which shows as a start failure (:class:`BenchError`), not as a wrong figure.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import resource
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Final

import attrs

from gateway import __version__
from gateway.bench._feeder import fixture_id
from gateway.bench._procstat import (
    cpu_seconds,
    machine_ticks,
    memory_kib,
    steal_percent,
    write_calls,
)
from gateway.bench._report import evaluate, format_table
from gateway.bench._scenario import BENCH_BACKOFF_INITIAL, BENCH_QUEUE_BYTES, Scenario
from gateway.config import ConfigError, ListenAddress, load_config

TOKEN_ENV: Final = "DDE_BENCH_TOKEN"
START_TIMEOUT: Final = 30.0
READY_TIMEOUT: Final = 60.0
STOP_TIMEOUT: Final = 10.0
#: The drop happens this far into the measured window, leaving the rest for the recovery.
DROP_AT: Final = 0.4
IDLE_SETTLE: Final = 1.0
#: The websockets relay, a file of this package run by its path: the child imports no gateway
#: code, so its memory figures are the relay's own.
PEER_SCRIPT: Final = Path(__file__).with_name("_peer.py")
#: What the peer needs and how to get it; said once when the comparison is skipped.
PEER_MISSING: Final = (
    "websockets is not installed; the 'bench' extra installs it: pip install 'dde-gateway[bench]'"
)

Result = dict[str, Any]


class BenchError(Exception):
    """A benchmark run could not complete (a process failed to start, nothing arrived...)."""


class PeerUnavailable(BenchError):
    """The peer was asked for (``--peer``, or ``--no-gateway``) but websockets is missing."""


def peer_available() -> bool:
    """True when the websockets peer can run: websockets (the ``bench`` extra) is importable."""
    return importlib.util.find_spec("websockets") is not None


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE to its hard limit (children inherit it); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


class _Child:
    """A child process speaking JSON lines: commands on stdin, events on stdout.

    A thread reads stdout so every wait has a timeout; stderr goes to *log*."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: IO[bytes]) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env
        )
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.events.put(json.loads(line))
        self.events.put(None)

    def expect(self, event: str, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"{self.name}: no {event!r} within {timeout:.0f} s") from None
            if msg is None:
                raise BenchError(f"{self.name} exited (status {self.proc.wait()})")
            if msg.get("event") == "error":
                raise BenchError(f"{self.name}: {msg.get('message')}")
            if msg.get("event") == event:
                return msg

    def ask(self, command: str, event: str, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            raise BenchError(f"{self.name} is gone") from None
        return self.expect(event, timeout)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        _stop(self.proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def gateway_config_text(sc: Scenario, feeder_port: int, stream: int, http: int) -> str:
    """The TOML the gateway runs with: loopback listeners, the feeder as its tracking vendor,
    a connect rate that does not throttle hundreds of fixtures, and limits above the load."""
    connections = sc.subscribers + sc.stuck + sc.idle + 100
    lines = [
        "[gateway]",
        f'stream_listen = "127.0.0.1:{stream}"',
        f'http_listen = "127.0.0.1:{http}"',
        "drain_timeout = 2.0",
        'log_level = "warning"',
        "",
        "[upstream]",
        f'token_env = "{TOKEN_ENV}"',
        "connect_rate = 1000.0",
        f"backoff_initial = {BENCH_BACKOFF_INITIAL}",
        "",
        "[feeds.tracking]",
        'kind = "tracking"',
        f'url = "ws://127.0.0.1:{feeder_port}/ws/soccer/tracking/low_latency"',
        "",
        "[subscribers]",
        f"queue_bytes = {BENCH_QUEUE_BYTES}",
        f"max_connections = {max(10_000, connections)}",
        f"max_subscriptions = {max(1000, sc.fixtures)}",
    ]
    if sc.write_delay:
        lines.append(f"write_delay = {sc.write_delay:g}")
    if sc.compression != "off":
        lines.append(f'compression = "{sc.compression}"')
    if sc.recorder_dir is not None:
        lines += ["", "[recorder]", f"dir = {json.dumps(sc.recorder_dir)}"]
    for i in range(sc.fixtures):
        lines += ["", "[[fixtures]]", 'feed = "tracking"', f'id = "{fixture_id(i)}"']
    return "\n".join(lines) + "\n"


def _bound_ports(proc: subprocess.Popen[bytes], log: Path) -> tuple[int, int]:
    """``(stream, http)`` ports of a gateway started on port 0, from its "gateway ready" line.

    Ports chosen in advance could be taken by another process before the gateway binds them;
    the gateway binds port 0 and says what it got (a JSON log line with ``stream``/``http``).
    """
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"gateway exited with status {proc.returncode}: {_tail(log)}")
        try:
            text = log.read_text(errors="replace")
        except OSError:
            text = ""
        for line in text.splitlines():
            if "gateway ready" not in line:
                continue
            try:
                record = json.loads(line)
                stream = ListenAddress.parse(record["stream"]).port
                http = ListenAddress.parse(record["http"]).port
            except (ValueError, KeyError, TypeError):
                continue
            return stream, http
        time.sleep(0.05)
    raise BenchError(f"gateway did not report its ports within {START_TIMEOUT:.0f} s: {_tail(log)}")


def _wait_http_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    url = f"http://127.0.0.1:{port}/readyz"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"gateway exited with status {proc.returncode}: {_tail(log)}")
        try:
            with opener.open(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    raise BenchError(f"gateway not ready within {START_TIMEOUT:.0f} s: {_tail(log)}")


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


@contextlib.contextmanager
def _target(
    kind: str, sc: Scenario, feeder_port: int, env: dict[str, str], tmp: Path
) -> Iterator[tuple[int, int]]:
    """Start the gateway or the peer; yield ``(pid, subscriber port)``; stop it after."""
    log_path = tmp / f"{kind}.log"
    with open(log_path, "wb") as log:
        if kind == "gateway":
            config = tmp / "gateway.toml"
            config.write_text(gateway_config_text(sc, feeder_port, 0, 0))
            try:
                load_config(config)
            except ConfigError as exc:
                raise BenchError(f"generated config rejected: {exc}") from None
            argv = [sys.executable, "-m", "gateway", "run", "--config", str(config)]
            # Info level, JSON: the "gateway ready" line names the ports bound (see _bound_ports).
            proc = subprocess.Popen(
                [*argv, "--log-level", "info", "--log-format", "json"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
            try:
                stream, http = _bound_ports(proc, log_path)
                _wait_http_ready(proc, http, log_path)
                yield proc.pid, stream
            finally:
                _stop(proc)
        else:
            argv = [sys.executable, str(PEER_SCRIPT), "--feeder-port", str(feeder_port)]
            peer = _Child("peer", [*argv, "--fixtures", str(sc.fixtures)], env, log)
            try:
                port = peer.expect("listening")["port"]
                yield peer.proc.pid, int(port)
            except BenchError as exc:
                raise BenchError(f"{exc}: {_tail(log_path)}") from None
            finally:
                peer.stop()


def measure(
    kind: str, sc: Scenario, *, progress: bool = True, slow_steps: Path | None = None
) -> Result:
    """Run *sc* against the gateway or the peer (*kind*) and return its figures.

    *slow_steps*: the gateway appends its task steps over 10 ms there (JSON lines,
    :mod:`gateway.service._slowsteps`)."""
    token = secrets.token_urlsafe(24)
    env = dict(os.environ, **{TOKEN_ENV: token})
    if slow_steps is not None and kind == "gateway":
        env["DDE_GATEWAY_SLOW_STEPS"] = str(slow_steps)
    label = f"{sc.name}/{kind}" + (" (with stuck)" if sc.stuck else "")

    def say(text: str) -> None:
        if progress:
            print(f"[{label}] {text}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="dde-bench-") as tmpname, contextlib.ExitStack() as st:
        tmp = Path(tmpname)
        feeder_log = st.enter_context(open(tmp / "feeder.log", "wb"))
        feeder = _Child(
            "feeder",
            [
                sys.executable,
                "-m",
                "gateway.bench._feeder",
                "--fixtures",
                str(sc.fixtures),
                "--rate",
                str(sc.rate),
                "--frame-bytes",
                str(sc.frame_bytes),
                "--token-env",
                TOKEN_ENV,
            ],
            env,
            feeder_log,
        )
        st.callback(feeder.stop)
        feeder_port = int(feeder.expect("listening")["port"])
        pid, port = st.enter_context(_target(kind, sc, feeder_port, env, tmp))
        say(f"target pid {pid} on port {port}")
        rss_before = memory_kib(pid)["VmRSS"]
        loadgen_log = st.enter_context(open(tmp / "loadgen.log", "wb"))
        loadgen = _Child(
            "loadgen",
            [
                sys.executable,
                "-m",
                "gateway.bench._loadgen",
                "--kind",
                kind,
                "--port",
                str(port),
                "--subscribers",
                str(sc.subscribers),
                "--fixtures",
                str(sc.fixtures),
                "--fanout",
                sc.fanout,
                "--stuck",
                str(sc.stuck),
                "--idle",
                str(sc.idle),
                *(["--deflate"] if sc.compression == "deflate" and kind == "gateway" else []),
            ],
            env,
            loadgen_log,
        )
        st.callback(loadgen.stop)
        connect_timeout = START_TIMEOUT + (sc.subscribers + sc.stuck + sc.idle) / 100
        connected = loadgen.expect("connected", connect_timeout)
        say(
            f"{sc.subscribers + sc.stuck + sc.idle} subscribers connected in "
            f"{connected['seconds']:.1f} s"
        )
        rss_idle_kib: float | None = None
        if sc.idle:
            time.sleep(IDLE_SETTLE)
            rss_idle_kib = (memory_kib(pid)["VmRSS"] - rss_before) / sc.idle
        _wait_receiving(loadgen, sc, say)
        time.sleep(sc.warmup)

        load0 = os.getloadavg()[0]
        ticks0 = machine_ticks()
        cpu0 = cpu_seconds(pid)
        writes0 = write_calls(pid)
        fs0 = feeder.ask("stats", "stats")
        t0 = time.monotonic()
        loadgen.ask("mark", "marked")
        drop_ns: int | None = None
        last = (t0, 0, cpu0)
        while (elapsed := time.monotonic() - t0) < sc.duration:
            time.sleep(min(1.0, sc.duration - elapsed))
            if sc.drop and drop_ns is None and time.monotonic() - t0 >= sc.duration * DROP_AT:
                drop_ns = int(feeder.ask("drop", "dropped")["t_ns"])
                loadgen.ask(f"drop {drop_ns}", "drop")
                say("upstream connections dropped")
            now, cpu = time.monotonic(), cpu_seconds(pid)
            done = int(loadgen.ask("progress", "progress")["deliveries"])
            dt = now - last[0]
            say(
                f"{now - t0:5.1f}/{sc.duration:.0f} s  {(done - last[1]) / dt:9.0f} deliveries/s"
                f"  target CPU {100 * (cpu - last[2]) / dt:5.1f}%"
            )
            last = (now, done, cpu)
        cpu1 = cpu_seconds(pid)
        writes1 = write_calls(pid)
        ticks1 = machine_ticks()
        fs1 = feeder.ask("stats", "stats")
        report = loadgen.ask("report", "report")
        t1 = time.monotonic()
        mem = memory_kib(pid)

    window = t1 - t0
    cpu = cpu1 - cpu0
    frames_in = int(fs1["made"]) - int(fs0["made"])
    deliveries = int(report["deliveries"])
    fresh = report.get("fresh_ms") or {}
    return {
        "target": kind,
        "window_s": round(window, 3),
        "deliveries": deliveries,
        "frames_in_per_s": frames_in / window,
        "frames_out_per_s": deliveries / window,
        "target_cpu_s": cpu,
        "cpu_percent": 100 * cpu / window,
        "deliveries_per_cpu_s": deliveries / cpu if cpu > 0 else None,
        "us_cpu_per_delivery": 1e6 * cpu / deliveries if deliveries else None,
        # write()/writev() calls; the peer (asyncio) sends with send(), which is not counted.
        "writes_per_delivery": (writes1 - writes0) / deliveries
        if deliveries and kind == "gateway"
        else None,
        "wire_bytes_per_frame": int(report["bytes"]) / deliveries if deliveries else None,
        "compressed_frames": int(report.get("compressed", 0)),
        "latency_ms": report["latency_ms"],
        "rss_kib": mem["VmRSS"],
        "peak_rss_kib": mem["VmHWM"],
        "rss_before_kib": rss_before,
        "rss_per_idle_kib": rss_idle_kib,
        "drop_to_fresh_ms": fresh.get("max") if drop_ns is not None else None,
        "fresh_subscribers": fresh.get("count") if drop_ns is not None else None,
        "healthy": report["healthy"],
        "healthy_open": report["healthy_open"],
        "idle_open": report["idle_open"],
        "stuck": report["stuck"],
        "stuck_closed": report["stuck_closed"],
        "closed": report["closed"],
        "loadgen_cpu_percent": 100 * float(report["cpu_s"]) / window,
        "feeder_cpu_percent": 100 * (float(fs1["cpu_s"]) - float(fs0["cpu_s"])) / window,
        # Other work on the machine skews every figure (CPU time is the least affected).
        "load_average": max(load0, os.getloadavg()[0]),
        # On a virtual machine, CPU time the hypervisor gave to others: it drives latency tails.
        "steal_percent": steal_percent(ticks0, ticks1),
    }


def _wait_receiving(loadgen: _Child, sc: Scenario, say: Any) -> None:
    """Wait until every healthy subscriber has had a frame (upstreams connected, data flowing)."""
    if not sc.subscribers:
        return
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        ready = loadgen.ask("ready", "ready")
        if ready["receiving"] >= ready["of"]:
            return
        if time.monotonic() > deadline:
            raise BenchError(
                f"only {ready['receiving']} of {ready['of']} subscribers received a frame "
                f"within {READY_TIMEOUT:.0f} s"
            )
        time.sleep(0.2)


def run_scenario(
    sc: Scenario, targets: Sequence[str], *, progress: bool = True, slow_steps: Path | None = None
) -> Result:
    """Every target through *sc* (and its baseline without stuck subscribers, if asked)."""
    runs: dict[str, dict[str, Result]] = {}
    errors: list[str] = []
    for kind in targets:
        phases = [("main", sc)]
        if sc.baseline and sc.stuck:
            phases.insert(0, ("baseline", attrs.evolve(sc, stuck=0)))
        for phase, variant in phases:
            try:
                runs.setdefault(kind, {})[phase] = measure(
                    kind, variant, progress=progress, slow_steps=slow_steps
                )
            except (BenchError, OSError) as exc:
                errors.append(f"{sc.name}/{kind}/{phase}: {exc}")
    return {"scenario": attrs.asdict(sc), "runs": runs, "errors": errors}


def run_bench(
    scenarios: Sequence[Scenario],
    *,
    gateway: bool = True,
    peer: bool | None = None,
    json_path: Path | None = None,
    progress: bool = True,
    slow_steps: Path | None = None,
) -> dict[str, Any]:
    """Run *scenarios*, print the table, write *json_path*; return the whole result.

    ``peer=None`` measures the websockets peer when it is available, and otherwise says once
    on stderr that the comparison was skipped and which extra installs it. Raises
    :class:`PeerUnavailable` when the peer is asked for (or is the only target) but missing,
    :class:`BenchError` when nothing is to be measured, or after printing the table when a
    run failed (its error is in the result and the JSON too)."""
    if peer is None and gateway:
        peer = peer_available()
        if not peer:
            print(f"bench: peer comparison skipped: {PEER_MISSING}", file=sys.stderr, flush=True)
    elif peer is not False and not peer_available():
        raise PeerUnavailable(f"cannot measure the peer: {PEER_MISSING}")
    elif peer is None:
        peer = True
    targets = [k for k, on in (("gateway", gateway), ("peer", peer)) if on]
    if not targets:
        raise BenchError("nothing to measure: both --no-gateway and --no-peer")
    nofile = raise_nofile_limit()
    need = max(sc.subscribers + sc.stuck + sc.idle for sc in scenarios) + 200
    if nofile < need:
        raise BenchError(f"open-file limit {nofile} is below the {need} this run needs")
    results = [
        run_scenario(sc, targets, progress=progress, slow_steps=slow_steps) for sc in scenarios
    ]
    for res in results:
        res["checks"] = evaluate(res)
    doc = {
        "version": __version__,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "results": results,
    }
    print(format_table(results))
    if json_path is not None:
        json_path.write_text(json.dumps(doc, indent=2) + "\n")
    errors = [e for res in results for e in res["errors"]]
    if errors:
        raise BenchError("; ".join(errors))
    return doc
