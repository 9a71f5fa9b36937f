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
from gateway.bench._redis import BenchRedis, RedisStartError
from gateway.bench._report import evaluate, format_table
from gateway.bench._scenario import BENCH_BACKOFF_INITIAL, BENCH_QUEUE_BYTES, Scenario
from gateway.config import (
    DEFAULT_REDIS_TIMEOUT,
    ConfigError,
    ListenAddress,
    lease_round_interval,
    lease_validity,
    load_config,
)

TOKEN_ENV: Final = "DDE_BENCH_TOKEN"
#: A process that has not started by then has failed (a busy shared machine takes its time).
START_TIMEOUT: Final = 60.0
READY_TIMEOUT: Final = 60.0
STOP_TIMEOUT: Final = 10.0
#: The drop happens this far into the measured window, leaving the rest for the recovery.
DROP_AT: Final = 0.4
IDLE_SETTLE: Final = 1.0
#: The websockets relay, a file of this package run by its path: the child imports no gateway
#: code, so its memory figures are the relay's own.
PEER_SCRIPT: Final = Path(__file__).with_name("_peer.py")
#: ``[cluster] lease_ttl`` of the bench's instances: far longer than a run, so the instance
#: started first keeps every fixture (a configured fixture is handed over to its first-ranked
#: instance only once that one has been live for lease_ttl) and the others relay everything.
#: Lease rounds still run every second (the tick is at most 1 s whatever the TTL).
BENCH_LEASE_TTL: Final = 300.0
#: ``[upstream] connect_rate``: high enough not to throttle hundreds of fixtures (the feeder
#: has no limit); the take-over bench runs at the vendor's 5 per second instead.
BENCH_CONNECT_RATE: Final = 1000.0
#: ``[cluster] stream_maxlen``: a minute at 25 Hz (docs/cluster.md, "Redis sizing").
BENCH_STREAM_MAXLEN: Final = 1500
#: The gateways' ``[gateway] drain_timeout``: a stop of the bench's processes is quick.
BENCH_DRAIN_TIMEOUT: Final = 2.0
BENCH_KEY_PREFIX: Final = "bench"
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


def gateway_config_text(
    sc: Scenario,
    feeder_port: int,
    stream: int,
    http: int,
    *,
    redis_url: str | None = None,
    instance: str = "bench-1",
    lease_ttl: float = BENCH_LEASE_TTL,
    connect_rate: float = BENCH_CONNECT_RATE,
    standby: bool = False,
    drain_timeout: float = BENCH_DRAIN_TIMEOUT,
    cluster_extra: Sequence[str] = (),
) -> str:
    """The TOML the gateway runs with: loopback listeners, the feeder as its tracking vendor,
    a connect rate that does not throttle hundreds of fixtures, and limits above the load.

    *redis_url*: a ``[cluster]`` section (member *instance*) on that Redis, with
    :data:`BENCH_LEASE_TTL` and :data:`BENCH_STREAM_MAXLEN` (and ``standby = true`` with
    *standby*); ``reuse_port`` when the scenario runs several instances on one listener;
    *cluster_extra*: more lines for ``[cluster]``."""
    connections = sc.subscribers + sc.stuck + sc.idle + 100
    lines = [
        "[gateway]",
        f'stream_listen = "127.0.0.1:{stream}"',
        f'http_listen = "127.0.0.1:{http}"',
        f"drain_timeout = {drain_timeout:g}",
        'log_level = "warning"',
        *(["reuse_port = true"] if sc.instances > 1 else []),
        "",
        "[upstream]",
        f'token_env = "{TOKEN_ENV}"',
        f"connect_rate = {connect_rate:g}",
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
    if redis_url is not None:
        budget = lease_validity(lease_ttl) - lease_round_interval(lease_ttl)
        lines += [
            "",
            "[cluster]",
            f"redis_url = {json.dumps(redis_url)}",
            f"instance = {json.dumps(instance)}",
            f"lease_ttl = {lease_ttl:g}",
            # A short lease needs a shorter wait for Redis than the default (the config's rule:
            # a round must give up on a silent Redis before its leases lapse); half the budget.
            *([f"redis_timeout = {budget / 2:g}"] if budget <= DEFAULT_REDIS_TIMEOUT else []),
            f"stream_maxlen = {BENCH_STREAM_MAXLEN}",
            f'key_prefix = "{BENCH_KEY_PREFIX}"',
            *(["standby = true"] if standby else []),
            *cluster_extra,
        ]
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


@attrs.frozen
class _Instance:
    """A running target process: its name, pid, subscriber port and HTTP port (0: none)."""

    name: str
    pid: int
    stream: int
    http: int = 0
    #: The gateway's process (None: not a gateway the bench started).
    proc: subprocess.Popen[bytes] | None = attrs.field(default=None, eq=False, repr=False)


def http_json(port: int, path: str, timeout: float = 2.0) -> Any:
    """GET ``http://127.0.0.1:<port><path>`` and decode its JSON (no proxy: loopback)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
        return json.loads(resp.read())


def cluster_leases(redis: BenchRedis, fixtures: int) -> dict[str, tuple[str | None, str | None]]:
    """Fixture id -> (the instance holding its lease, the state its owner wrote in its meta),
    as the bench's Redis has them (None where unset)."""
    ids = [fixture_id(i) for i in range(fixtures)]
    prefix = f"{BENCH_KEY_PREFIX}:%s:tracking/%s"
    replies = redis.pipeline(
        [("GET", prefix % ("lease", fx)) for fx in ids]
        + [("HGET", prefix % ("meta", fx), "state") for fx in ids]
    )

    def text(value: Any) -> str | None:
        return value.decode() if isinstance(value, bytes) else None

    out: dict[str, tuple[str | None, str | None]] = {}
    for i, fx in enumerate(ids):
        token = text(replies[i])
        out[fx] = (None if token is None else token.rsplit("/", 1)[0], text(replies[len(ids) + i]))
    return out


def wait_owner(
    redis: BenchRedis,
    instance: str,
    fixtures: int,
    timeout: float = READY_TIMEOUT,
    *,
    state: str | None = "live",
) -> float:
    """Wait until *instance* holds the lease of every fixture and each is *state* (the state
    its owner wrote beside the stream; None: any); the seconds it took. :class:`BenchError`
    after *timeout*."""
    t0 = time.monotonic()
    done = 0
    while time.monotonic() - t0 < timeout:
        leases = cluster_leases(redis, fixtures)
        done = sum(
            1
            for who, written in leases.values()
            if who == instance and (state is None or written == state)
        )
        if done == fixtures:
            return time.monotonic() - t0
        time.sleep(0.1)
    what = state or "any state"
    raise BenchError(f"{instance} owned {done} of {fixtures} ({what}) after {timeout:.0f} s")


@contextlib.contextmanager
def _gateway_process(
    sc: Scenario,
    name: str,
    feeder_port: int,
    env: dict[str, str],
    tmp: Path,
    *,
    stream: int = 0,
    life: int = 0,
    **config_keys: Any,
) -> Iterator[_Instance]:
    """One gateway as ``dde-gateway run`` starts it, on a generated config; stopped after
    (SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`; not if it has exited meanwhile).
    *config_keys*: :func:`gateway_config_text`'s (``redis_url``, ``lease_ttl``, ...). *life*
    above 0: the same instance started again (its own log file)."""
    log_path = tmp / (f"{name}.log" if not life else f"{name}.{life}.log")
    with open(log_path, "wb") as log:
        config = tmp / f"{name}.toml"
        config.write_text(
            gateway_config_text(sc, feeder_port, stream, 0, instance=name, **config_keys)
        )
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
            bound_stream, http = _bound_ports(proc, log_path)
            _wait_http_ready(proc, http, log_path)
            yield _Instance(name, proc.pid, bound_stream, http, proc)
        finally:
            _stop(proc)


@contextlib.contextmanager
def _target(
    kind: str, sc: Scenario, feeder_port: int, env: dict[str, str], tmp: Path, *, say: Any
) -> Iterator[tuple[list[_Instance], BenchRedis | None]]:
    """Start the gateway (with its cluster: Redis and the other instances) or the peer; yield
    the processes and the bench's Redis (None without a cluster); stop them all after.

    In a cluster the first instance is started alone and owns every fixture (all live) before
    the next one starts; the others then relay every fixture (waited for too)."""
    if kind == "peer":
        log_path = tmp / "peer.log"
        with open(log_path, "wb") as log:
            argv = [sys.executable, str(PEER_SCRIPT), "--feeder-port", str(feeder_port)]
            peer = _Child("peer", [*argv, "--fixtures", str(sc.fixtures)], env, log)
            try:
                port = peer.expect("listening")["port"]
                yield [_Instance("peer", peer.proc.pid, int(port))], None
            except BenchError as exc:
                raise BenchError(f"{exc}: {_tail(log_path)}") from None
            finally:
                peer.stop()
        return
    if not sc.cluster:
        with _gateway_process(sc, "gateway", feeder_port, env, tmp) as inst:
            yield [inst], None
        return
    with contextlib.ExitStack() as st:
        try:
            redis = st.enter_context(BenchRedis(tmp / "redis"))
        except (RedisStartError, OSError) as exc:
            raise BenchError(f"cluster: {exc}") from None
        say(f"redis-server pid {redis.pid} on {redis.url}")
        out: list[_Instance] = []
        for i in range(2 if sc.relay else sc.instances):
            shared = out[0].stream if out and sc.instances > 1 else 0
            inst = st.enter_context(
                _gateway_process(
                    sc, f"bench-{i + 1}", feeder_port, env, tmp, stream=shared, redis_url=redis.url
                )
            )
            if not out:
                took = wait_owner(redis, inst.name, sc.fixtures)
                say(f"{inst.name} owns all {sc.fixtures} fixtures, live, after {took:.1f} s")
            out.append(inst)
        yield out, redis


def _subscribers(inst: _Instance) -> int | None:
    """Connected subscribers of a gateway (``GET /v1/status``), None if it does not say."""
    try:
        return int(http_json(inst.http, "/v1/status")["subscribers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _feeder(sc: Scenario, env: dict[str, str], log: IO[bytes]) -> _Child:
    argv = [sys.executable, "-m", "gateway.bench._feeder", "--token-env", TOKEN_ENV]
    argv += ["--fixtures", str(sc.fixtures), "--rate", str(sc.rate)]
    return _Child("feeder", [*argv, "--frame-bytes", str(sc.frame_bytes)], env, log)


def _loadgen(
    kind: str,
    sc: Scenario,
    port: int,
    env: dict[str, str],
    log: IO[bytes],
    *,
    name: str,
    stride: int = 1,
) -> _Child:
    return _Child(
        name,
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
            "--stride",
            str(stride),
            "--stuck",
            str(sc.stuck),
            "--idle",
            str(sc.idle),
            *(["--deflate"] if sc.compression == "deflate" and kind == "gateway" else []),
            *(["--nice", str(sc.loadgen_nice)] if sc.loadgen_nice else []),
        ],
        env,
        log,
    )


#: Scripts a lease round runs (heartbeat, leases, metas; the API set is a MULTI, not a script;
#: no on-demand feeds here), about once a second (the tick is at most 1 s).
_ROUND_SCRIPTS_PER_S: Final = 3


def _redis_figures(
    stats0: dict[str, dict[str, float]],
    stats1: dict[str, dict[str, float]],
    instances: int,
    window: float,
) -> dict[str, Any]:
    """Per command: calls/s and us per call over the window (commands run by scripts
    included); frames appended (XADD calls) and the append requests (EVALSHA calls less an
    estimate of the lease rounds' scripts) with the frames per request."""
    per_command: dict[str, dict[str, float]] = {}
    for cmd, after in stats1.items():
        before = stats0.get(cmd, {"calls": 0.0, "usec": 0.0})
        calls = after["calls"] - before["calls"]
        if calls > 0 and cmd not in ("info", "ping", "get", "hget"):
            per_command[cmd] = {
                "calls_per_s": calls / window,
                "us_per_call": (after["usec"] - before["usec"]) / calls,
            }
    appended = per_command.get("xadd", {}).get("calls_per_s", 0.0)
    evalsha = per_command.get("evalsha", {}).get("calls_per_s", 0.0)
    requests = evalsha - _ROUND_SCRIPTS_PER_S * instances
    return {
        "commands": per_command,
        "frames_appended_per_s": appended,
        "append_requests_per_s": requests if requests > 0 else None,
        "frames_per_append": appended / requests if requests > 0 and appended else None,
    }


def measure(
    kind: str, sc: Scenario, *, progress: bool = True, slow_steps: Path | None = None
) -> Result:
    """Run *sc* against the gateway or the peer (*kind*) and return its figures.

    With ``sc.relay`` the relay instance's figures (its CPU, its subscribers' deliveries and
    latency, in the same window) are under the result's ``"relay"`` key.
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
        feeder = _feeder(sc, env, feeder_log)
        st.callback(feeder.stop)
        feeder_port = int(feeder.expect("listening")["port"])
        procs, redis = st.enter_context(_target(kind, sc, feeder_port, env, tmp, say=say))
        cluster = kind == "gateway" and sc.cluster
        # The measured sides: each its processes (CPU summed) and its own load generator.
        sides = [("main", procs[:1]), ("relay", procs[1:])] if sc.relay else [("main", procs)]
        for inst in procs:
            say(f"{inst.name} pid {inst.pid} on port {inst.stream}")
        pids = [inst.pid for inst in procs]
        rss_before = {pid: memory_kib(pid)["VmRSS"] for pid in pids}
        loadgens: list[_Child] = []
        for phase, group in sides:
            loadgen_log = st.enter_context(open(tmp / f"loadgen-{phase}.log", "wb"))
            name = "loadgen" if phase == "main" else f"loadgen ({phase})"
            loadgen = _loadgen(kind, sc, group[0].stream, env, loadgen_log, name=name)
            st.callback(loadgen.stop)
            loadgens.append(loadgen)
        connect_timeout = START_TIMEOUT + (sc.subscribers + sc.stuck + sc.idle) / 100
        for loadgen in loadgens:
            connected = loadgen.expect("connected", connect_timeout)
            say(
                f"{sc.subscribers + sc.stuck + sc.idle} subscribers connected in "
                f"{connected['seconds']:.1f} s"
            )
        rss_idle_kib: dict[str, float | None] = dict.fromkeys((p for p, _ in sides))
        if sc.idle:
            time.sleep(IDLE_SETTLE)
            for phase, group in sides:
                grown = sum(memory_kib(i.pid)["VmRSS"] - rss_before[i.pid] for i in group)
                rss_idle_kib[phase] = grown / sc.idle
        for loadgen in loadgens:
            _wait_receiving(loadgen, sc, say)
        time.sleep(sc.warmup)

        load0 = os.getloadavg()[0]
        ticks0 = machine_ticks()
        cpu0 = {pid: cpu_seconds(pid) for pid in pids}
        writes0 = {pid: write_calls(pid) for pid in pids}
        redis_cpu0 = cpu_seconds(redis.pid) if redis is not None else 0.0
        stats0 = redis.commandstats() if redis is not None else {}
        fs0 = feeder.ask("stats", "stats")
        t0 = time.monotonic()
        for loadgen in loadgens:
            loadgen.ask("mark", "marked")
        drop_ns: int | None = None
        last = (t0, 0, sum(cpu0.values()))
        while (elapsed := time.monotonic() - t0) < sc.duration:
            time.sleep(min(1.0, sc.duration - elapsed))
            if sc.drop and drop_ns is None and time.monotonic() - t0 >= sc.duration * DROP_AT:
                drop_ns = int(feeder.ask("drop", "dropped")["t_ns"])
                for loadgen in loadgens:
                    loadgen.ask(f"drop {drop_ns}", "drop")
                say("upstream connections dropped")
            now, cpu = time.monotonic(), sum(cpu_seconds(pid) for pid in pids)
            done = sum(int(lg.ask("progress", "progress")["deliveries"]) for lg in loadgens)
            dt = now - last[0]
            say(
                f"{now - t0:5.1f}/{sc.duration:.0f} s  {(done - last[1]) / dt:9.0f} deliveries/s"
                f"  target CPU {100 * (cpu - last[2]) / dt:5.1f}%"
            )
            last = (now, done, cpu)
        cpu1 = {pid: cpu_seconds(pid) for pid in pids}
        writes1 = {pid: write_calls(pid) for pid in pids}
        redis_cpu1 = cpu_seconds(redis.pid) if redis is not None else 0.0
        stats1 = redis.commandstats() if redis is not None else {}
        leases = cluster_leases(redis, sc.fixtures) if redis is not None else {}
        ticks1 = machine_ticks()
        fs1 = feeder.ask("stats", "stats")
        reports = [loadgen.ask("report", "report") for loadgen in loadgens]
        t1 = time.monotonic()
        mem = {pid: memory_kib(pid) for pid in pids}
        subscribers = {i.pid: _subscribers(i) for i in procs} if cluster else {}
        redis_memory = redis.used_memory() if redis is not None else None

    window = t1 - t0
    common = {
        "frames_in_per_s": (int(fs1["made"]) - int(fs0["made"])) / window,
        "feeder_cpu_percent": 100 * (float(fs1["cpu_s"]) - float(fs0["cpu_s"])) / window,
        # Other work on the machine skews every figure (CPU time is the least affected).
        "load_average": max(load0, os.getloadavg()[0]),
        # On a virtual machine, CPU time the hypervisor gave to others: it drives latency tails.
        "steal_percent": steal_percent(ticks0, ticks1),
    }
    results: dict[str, Result] = {}
    for (phase, group), report in zip(sides, reports, strict=True):
        gpids = [i.pid for i in group]
        cpu = sum(cpu1[p] - cpu0[p] for p in gpids)
        writes = sum(writes1[p] - writes0[p] for p in gpids)
        deliveries = int(report["deliveries"])
        fresh = report.get("fresh_ms") or {}
        run: Result = {
            "target": kind,
            "window_s": round(window, 3),
            "deliveries": deliveries,
            "frames_out_per_s": deliveries / window,
            "target_cpu_s": cpu,
            "cpu_percent": 100 * cpu / window,
            "deliveries_per_cpu_s": deliveries / cpu if cpu > 0 else None,
            "us_cpu_per_delivery": 1e6 * cpu / deliveries if deliveries else None,
            # write()/writev() calls; the peer (asyncio) sends with send(), which is not counted.
            "writes_per_delivery": (
                writes / deliveries if deliveries and kind == "gateway" else None
            ),
            "wire_bytes_per_frame": int(report["bytes"]) / deliveries if deliveries else None,
            "compressed_frames": int(report.get("compressed", 0)),
            "latency_ms": report["latency_ms"],
            # Summed over the side's processes (their peaks need not coincide).
            "rss_kib": sum(mem[p]["VmRSS"] for p in gpids),
            "peak_rss_kib": sum(mem[p]["VmHWM"] for p in gpids),
            "rss_before_kib": sum(rss_before[p] for p in gpids),
            "rss_per_idle_kib": rss_idle_kib[phase],
            "drop_to_fresh_ms": fresh.get("max") if drop_ns is not None else None,
            "fresh_subscribers": fresh.get("count") if drop_ns is not None else None,
            "healthy": report["healthy"],
            "healthy_open": report["healthy_open"],
            "idle_open": report["idle_open"],
            "stuck": report["stuck"],
            "stuck_closed": report["stuck_closed"],
            "closed": report["closed"],
            "loadgen_cpu_percent": 100 * float(report["cpu_s"]) / window,
            **common,
        }
        if cluster:
            run["instances"] = [
                {
                    "name": inst.name,
                    "cpu_percent": 100 * (cpu1[inst.pid] - cpu0[inst.pid]) / window,
                    "owned": sum(1 for who, _ in leases.values() if who == inst.name),
                    "subscribers": subscribers.get(inst.pid),
                }
                for inst in group
            ]
        results[phase] = run
    main = results.pop("main")
    if redis is not None:
        main["redis_cpu_percent"] = 100 * (redis_cpu1 - redis_cpu0) / window
        main["redis_used_memory_mib"] = (redis_memory or 0) / 2**20
        main["redis"] = _redis_figures(stats0, stats1, len(procs), window)
    if "relay" in results:
        main["relay"] = results["relay"]
    return main


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
                run = measure(kind, variant, progress=progress, slow_steps=slow_steps)
                relay = run.pop("relay", None)
                runs.setdefault(kind, {})[phase] = run
                if relay is not None:
                    runs[kind]["relay"] = relay
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
    need = max((sc.subscribers + sc.stuck + sc.idle) * (2 if sc.relay else 1) for sc in scenarios)
    need += 200
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
