"""The benchmark harness's own pieces, each checked alone.

Covers: the hand-written WebSocket codec (lengths at every header size, masking, partial input,
RFC 6455's handshake example), percentiles, scenario presets and knob overrides, the generated
gateway config (loaded by the real config loader), target verdicts and the table, the peer's
absence (websockets hidden: skipped with one clear line, or exit 2 when asked for), the floors'
options and a tiny run of each, and the feeder process speaking the tracking protocol to a
trio-websocket client (auth, unknown fixture, backfill, increasing ix, the ``_bt`` stamp first,
``drop``). Rules: real sockets on 127.0.0.1 port 0 inside ``trio.fail_after`` (child processes:
a subprocess timeout); no timing assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
import trio_websocket

import gateway.bench
from gateway.bench import (
    PEER_MISSING,
    PRESETS,
    ROLLING_INSTANCES,
    ROLLING_ROOM,
    SCENARIO_NAMES,
    ProtocolError,
    accept_key,
    add_arguments,
    check_server_handshake,
    client_handshake,
    encode_frame,
    evaluate,
    format_table,
    gateway_config_text,
    machine_ticks,
    parse_frames,
    peer_available,
    percentile,
    rolling_drain_timeout,
    rolling_owners,
    rolling_stalls,
    rolling_table,
    rolling_unsettled,
    run_from_args,
    scenarios_from_args,
    server_handshake,
    steal_percent,
    unmask,
)
from gateway.config import ConfigError, load_config
from gateway.wire import OP_PING, OP_TEXT
from tests.conftest import TEST_TOKEN

# -- codec ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
@pytest.mark.parametrize("mask", [False, True])
def test_frames_round_trip_at_every_header_size(size: int, mask: bool) -> None:
    body = bytes(range(256)) * (size // 256 + 1)
    body = body[:size]
    data = encode_frame(OP_TEXT, body, mask=mask) + encode_frame(OP_PING, b"p", mask=mask)
    frames, pos = parse_frames(data)
    assert pos == len(data)
    (op1, s1, e1), (op2, s2, e2) = frames
    read = unmask if mask else (lambda buf, s, e: bytes(buf[s:e]))
    assert (op1, read(data, s1, e1)) == (OP_TEXT, body)
    assert (op2, read(data, s2, e2)) == (OP_PING, b"p")


def test_partial_frames_wait_for_more_bytes() -> None:
    data = encode_frame(OP_TEXT, b"x" * 300)
    for cut in (1, 2, 3, 100, len(data) - 1):
        assert parse_frames(data[:cut]) == ([], 0)
    assert parse_frames(b"junk" + data, 4)[1] == 4 + len(data)


def test_handshake_matches_rfc_6455_example_and_round_trips() -> None:
    assert accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    request, expected = client_handshake("127.0.0.1", 1234, "/v1/stream")
    path, response = server_handshake(request.split(b"\r\n\r\n")[0])
    assert path == "/v1/stream"
    check_server_handshake(response.split(b"\r\n\r\n")[0], expected)
    with pytest.raises(ProtocolError):
        check_server_handshake(response.split(b"\r\n\r\n")[0], b"wrong")
    with pytest.raises(ProtocolError):
        check_server_handshake(b"HTTP/1.1 403 Forbidden", expected)
    with pytest.raises(ProtocolError):
        server_handshake(b"GET / HTTP/1.1\r\nHost: x")


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 1001))
    assert percentile(values, 50) == 500
    assert percentile(values, 99) == 990
    assert percentile(values, 99.9) == 999
    assert percentile([7], 99.9) == 7
    assert percentile([], 50) == 0


# -- scenarios, config, report --------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_knobs_override_presets_and_all_runs_every_preset() -> None:
    (paced,) = scenarios_from_args(_parse("--scenario", "paced", "--duration", "3"))
    assert paced == attrs.evolve(PRESETS["paced"], duration=3.0)
    everything = scenarios_from_args(_parse("--scenario", "all", "--rate", "5"))
    assert [s.name for s in everything] == list(SCENARIO_NAMES)
    assert {s.rate for s in everything} == {5.0}
    (custom,) = scenarios_from_args(_parse("--subscribers", "7", "--fanout", "spread"))
    assert (custom.name, custom.subscribers, custom.fanout) == ("custom", 7, "spread")
    assert PRESETS["paced"].offered_deliveries == 25_000
    assert PRESETS["ingest"].offered_deliveries == 5_000


def test_bad_knobs_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_from_args(_parse("--subscribers", "-1")) == 2
    assert "'subscribers' must be >= 0" in capsys.readouterr().err
    assert run_from_args(_parse("--no-peer", "--no-gateway")) == 2
    assert "nothing to measure" in capsys.readouterr().err


def test_generated_gateway_config_is_accepted_by_the_loader(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(gateway_config_text(PRESETS["ingest"], 4000, 4001, 4002))
    config = load_config(path)
    assert len(config.fixtures) == 200
    assert config.upstream.token_env == "DDE_BENCH_TOKEN"
    assert config.feeds["tracking"].url == "ws://127.0.0.1:4000/ws/soccer/tracking/low_latency"
    # Unthrottled unless asked: the take-over bench asks for the vendor's rate.
    assert config.upstream.connect_rate == 1000
    path.write_text(gateway_config_text(PRESETS["ingest"], 4000, 4001, 4002, connect_rate=5))
    assert load_config(path).upstream.connect_rate == 5
    # The take-over bench's standby: [cluster] standby = true on each instance.
    for standby in (False, True):
        text = gateway_config_text(
            PRESETS["ingest"], 4000, 4001, 4002, redis_url="redis://127.0.0.1:1/0", standby=standby
        )
        path.write_text(text)
        cluster = load_config(path).cluster
        assert cluster is not None and cluster.standby is standby


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--connect-rate=0",), "--connect-rate must be > 0"),
        (("--watched=0",), "--watched must"),
        (("--standby=yes",), "--standby takes on, off or both"),
    ],
)
def test_takeover_options_are_checked(argv: tuple[str, ...], message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.bench._takeover", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert message in out.stderr


def _run(p99: float, cpu: float = 10.0, per_cpu: float = 1e5, rss: int = 50_000) -> Any:
    return {
        "frames_in_per_s": 500.0,
        "frames_out_per_s": 25_000.0,
        "deliveries_per_cpu_s": per_cpu,
        "cpu_percent": cpu,
        "latency_ms": {"count": 10, "p50": p99 / 2, "p99": p99, "p999": p99 * 2, "max": p99 * 3},
        "peak_rss_kib": rss,
        "rss_per_idle_kib": None,
        "drop_to_fresh_ms": None,
        "healthy": 5,
        "healthy_open": 5,
        "idle_open": 0,
        "loadgen_cpu_percent": 20.0,
        "feeder_cpu_percent": 5.0,
        "load_average": 1.0,
    }


def test_verdicts_follow_the_targets() -> None:
    paced: Any = {
        "scenario": {"name": "paced", "stuck": 0},
        "runs": {"gateway": {"main": _run(4.0)}},
    }
    assert [c["ok"] for c in evaluate(paced)] == [True, True]
    paced["runs"]["gateway"]["main"] = _run(6.0, cpu=60.0)
    assert [c["ok"] for c in evaluate(paced)] == [False, False]

    sat: Any = {
        "scenario": {"name": "saturated", "stuck": 0},
        "runs": {"gateway": {"main": _run(1, per_cpu=3e5)}, "peer": {"main": _run(1)}},
    }
    (check,) = evaluate(sat)
    assert (check["value"], check["ok"]) == (3.0, True)
    del sat["runs"]["peer"]
    assert evaluate(sat)[0]["ok"] is None  # no peer, no verdict

    stuck: Any = {
        "scenario": {"name": "stuck", "stuck": 5, "subscribers": 45},
        "runs": {"gateway": {"baseline": _run(2.0), "main": _run(2.4, rss=60_000)}},
    }
    ratio, growth = evaluate(stuck)
    assert (ratio["ok"], growth["ok"]) == (False, True)
    stuck["checks"] = evaluate(stuck)
    table = format_table([stuck])
    assert "stuck (baseline)" in table and "stuck (5 of 50)" in table
    assert "MISSED (1.20)" in table


def test_steal_is_read_from_proc_stat_and_reported() -> None:
    steal, total = machine_ticks()
    assert 0 <= steal <= total and total > 0
    assert steal_percent((10, 1000), (30, 2000)) == 2.0
    assert steal_percent((10, 1000), (10, 1000)) == 0.0  # no time passed: no division by zero
    quiet: Any = {
        "scenario": {"name": "paced", "stuck": 0},
        "runs": {"gateway": {"main": _run(4.0) | {"steal_percent": 0.4}}},
    }
    quiet["checks"] = evaluate(quiet)
    table = format_table([quiet])
    assert "(machine CPU stolen by host %)" in table and "0.4" in table
    assert "hypervisor" not in table
    quiet["runs"]["gateway"]["main"]["steal_percent"] = 7.5
    assert "the hypervisor took up to 7.5 %" in format_table([quiet])


# -- the peer and its optional extra --------------------------------------------------------


EXTRA_HINT = "pip install 'dde-gateway[bench]'"


def test_without_websockets_the_peer_is_skipped_once_and_the_extra_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "websockets", None)  # "import websockets" now fails
    assert not peer_available()
    targets: list[list[str]] = []

    def fake_scenario(sc: Any, kinds: Any, *, progress: bool = True, **_: Any) -> Any:
        targets.append(list(kinds))
        return {"scenario": attrs.asdict(sc), "runs": {}, "errors": []}

    # Stand-ins for the processes a scenario starts (by dotted path: no import of internals).
    monkeypatch.setattr("gateway.bench._run.run_scenario", fake_scenario)
    monkeypatch.setattr("gateway.bench._run.raise_nofile_limit", lambda: 1 << 20)

    assert run_from_args(_parse("--scenario", "all", "--quiet")) == 0
    assert targets == [["gateway"]] * len(SCENARIO_NAMES)  # the gateway is still measured
    err = capsys.readouterr().err
    assert err.count("peer comparison skipped") == 1, err
    assert err.count(EXTRA_HINT) == 1 and PEER_MISSING in err

    # Asked for explicitly (or the only target): a usage error naming the extra, nothing run.
    for argv in (("--peer",), ("--no-gateway",)):
        assert run_from_args(_parse(*argv)) == 2
        err = capsys.readouterr().err
        assert EXTRA_HINT in err and "skipped" not in err
    assert len(targets) == len(SCENARIO_NAMES)

    monkeypatch.delitem(sys.modules, "websockets")
    assert peer_available()  # the test environment has it: the test extra includes it


def test_the_peer_is_a_file_of_the_package() -> None:
    assert gateway.bench.PEER_SCRIPT.is_file()
    assert gateway.bench.PEER_SCRIPT.parent == Path(gateway.bench.__file__).parent


# -- the floors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--floor", "ingest", "--stuck", "1"), "--floor ingest does not take --stuck"),
        (("--floor", "fanout", "--fixtures", "2"), "--floor fanout does not take --fixtures"),
        (("--floor", "fanout", "--scenario", "paced"), "does not take --scenario"),
        (("--floor", "fanout", "--peer"), "does not take --peer"),
        (("--floor", "ingest", "--work", "parse,nope"), "--work takes parse, frame, not nope"),
        (("--floor", "ingest", "--work", "parse", "--loop", "epoll"), "trio loop only"),
        (("--floor", "ingest", "--rate", "0"), "'rate' must be > 0"),
        (("--floor", "fanout", "--subscribers", "0"), "'subscribers' must be >= 1"),
        (("--floor", "fanout", "--write-delay", "5,10"), "one whole --write-delay in ms, not 5,10"),
        (("--floor", "ingest", "--write-delay", "5"), "--floor ingest does not take --write-delay"),
        (("--frames", "10"), "--frames only with --floor"),
        (("--scenario", "paced", "--loop", "epoll"), "--loop only with --floor"),
    ],
)
def test_floor_options_are_checked(
    argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_from_args(_parse(*argv)) == 2
    assert message in capsys.readouterr().err


def _bench(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "bench", *argv],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def test_fanout_floor_runs_with_its_baseline() -> None:
    out = _bench(
        "--floor", "fanout", "--subscribers", "3", "--frames", "50", "--frame-bytes", "500",
        "--rate", "500", "--baseline",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("3 subscribers x 50 frames of 501 B: ")
    assert "us CPU per delivery" in lines[0]
    assert any(line.startswith("reader: bytes ") for line in lines)
    assert lines[-1].startswith("baseline: bare os.write ") and "(0 incomplete" in lines[-1]


def test_fanout_floor_with_a_write_delay_batches_and_so_does_its_baseline() -> None:
    out = _bench(
        "--floor", "fanout", "--subscribers", "3", "--frames", "60", "--frame-bytes", "500",
        "--rate", "400", "--write-delay", "10", "--baseline",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("3 subscribers x 60 frames of 501 B: ")
    # Every frame reached every reader (the readers count the bytes of 60 frames each).
    (reader,) = [line for line in lines if line.startswith("reader: bytes ")]
    assert int(reader.split()[2]) >= 3 * 60 * 501
    # A batch: a frame and the four due within 10 ms after it at 400 Hz.
    assert lines[-1].startswith("baseline: bare os.write of 5 frame(s) "), lines[-1]
    assert "(0 incomplete" in lines[-1]


@pytest.mark.parametrize("loop", ["trio", "epoll"])
def test_ingest_floor_runs(loop: str) -> None:
    work = ["--work", "parse,frame"] if loop == "trio" else []
    out = _bench(
        "--floor", "ingest", "--fixtures", "2", "--rate", "50", "--frame-bytes", "400",
        "--warmup", "0.3", "--duration", "0.7", "--loop", loop, *work,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    loop_name = "trio, work: parse,frame" if loop == "trio" else "bare epoll, work: none"
    assert line.startswith(f"2 fixtures x 50 Hz x 400 B, {loop_name}: "), line
    assert "frames/s relayed, CPU " in line


# -- the feeder process -----------------------------------------------------------------------


class _Lines:
    """Newline-separated JSON objects from a trio receive stream (the feeder's stdout)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = b""

    async def next(self) -> Any:
        while b"\n" not in self.buf:
            chunk = await self.stream.receive_some()
            assert chunk, "feeder closed its stdout"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


async def _wait_for_ix(url: str, fixture: str, ix: int) -> None:
    """Follow *fixture* live until a frame with index >= *ix* came: the feeder holds 0..ix."""
    async with trio_websocket.open_websocket_url(url) as ws:
        await ws.send_message(json.dumps({"authToken": TEST_TOKEN}))
        await ws.get_message()  # Authorisation accepted
        await ws.send_message(json.dumps({"fixtureId": fixture, "backfill": 0}))
        while orjson.loads(await ws.get_message()).get("ix", -1) < ix:  # heartbeats have none
            pass


async def test_feeder_speaks_the_tracking_protocol() -> None:
    env = dict(os.environ, DDE_BENCH_TOKEN=TEST_TOKEN)
    argv = [sys.executable, "-m", "gateway.bench._feeder", "--fixtures", "2", "--rate", "200"]
    proc = await trio.lowlevel.open_process(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    assert proc.stdin is not None and proc.stdout is not None
    out = _Lines(proc.stdout)
    try:
        with trio.fail_after(30):
            url = f"ws://127.0.0.1:{(await out.next())['port']}/ws/soccer/tracking/low_latency"
            async with trio_websocket.open_websocket_url(url) as ws:
                await ws.send_message('{"authToken": "wrong"}')
                assert "could not be authenticated" in str(await ws.get_message())
            async with trio_websocket.open_websocket_url(url) as ws:
                await ws.send_message(json.dumps({"authToken": TEST_TOKEN}))
                assert "Authorisation accepted" in str(await ws.get_message())
                await ws.send_message('{"fixtureId": "nope", "backfill": 0}')
                assert "Could not find fixture topic" in str(await ws.get_message())
                await _wait_for_ix(url, "bench-0001", 10)  # history holds more than 5
                await ws.send_message('{"fixtureId": "bench-0001", "backfill": 5}')
                frames = [await ws.get_message() for _ in range(10)]
            assert all(str(f).startswith('{"_bt":') for f in frames)
            docs = [orjson.loads(f) for f in frames]
            ixs = [d["ix"] for d in docs]
            assert ixs == list(range(ixs[0], ixs[0] + 10)) and ixs[0] > 0
            assert {d["id"] for d in docs} == {"bench-0001"}

            async with trio_websocket.open_websocket_url(url) as ws:
                await ws.send_message(json.dumps({"authToken": TEST_TOKEN}))
                await ws.get_message()
                await ws.send_message('{"fixtureId": "bench-0000", "backfill": 0}')
                await ws.get_message()
                await proc.stdin.send_all(b"drop\n")
                dropped = await out.next()
                assert dropped["event"] == "dropped" and dropped["closed"] == 1
                with pytest.raises(trio_websocket.ConnectionClosed):
                    while True:
                        await ws.get_message()
            await proc.stdin.aclose()  # EOF stops the feeder
            assert await proc.wait() == 0
    finally:
        proc.kill()


def test_write_delay_and_compression_runs_one_scenario_per_value(tmp_path: Path) -> None:
    scs = scenarios_from_args(
        _parse("--scenario", "paced", "--write-delay", "0,5", "--compression", "off,deflate")
    )
    assert [(sc.name, sc.write_delay, sc.compression) for sc in scs] == [
        ("paced", 0.0, "off"),
        ("paced", 5.0, "off"),
        ("paced", 0.0, "deflate"),
        ("paced", 5.0, "deflate"),
    ]
    assert [sc.write_delay for sc in scenarios_from_args(_parse("--scenario", "paced"))] == [0]
    text = gateway_config_text(scs[3], 1, 2, 3)
    assert "write_delay = 5\n" in text
    assert 'compression = "deflate"\n' in text
    assert "write_delay" not in gateway_config_text(scs[0], 1, 2, 3)
    path = tmp_path / "gw.toml"
    path.write_text(text)
    subs = load_config(path).subscribers
    assert (subs.write_delay, subs.compression) == (5, "deflate")


def test_loadgen_nice_applies_to_every_scenario_and_is_bounded() -> None:
    scs = scenarios_from_args(
        _parse("--scenario", "paced", "--write-delay", "0,5", "--loadgen-nice", "10")
    )
    assert [sc.loadgen_nice for sc in scs] == [10, 10]
    assert [sc.loadgen_nice for sc in scenarios_from_args(_parse("--scenario", "paced"))] == [0]
    out = _bench("--scenario", "paced", "--loadgen-nice", "20")
    assert out.returncode == 2
    assert "loadgen_nice" in out.stderr
    out = _bench("--floor", "fanout", "--loadgen-nice", "5")
    assert out.returncode == 2
    assert "--loadgen-nice" in out.stderr


def test_the_load_generator_lowers_its_own_priority() -> None:
    """``--nice N``: the load generator is at niceness N before it connects (here to a server
    that never answers the upgrade, so it waits there until killed)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        argv = [sys.executable, "-m", "gateway.bench._loadgen", "--port", str(port), "--nice", "7"]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            base = os.getpriority(os.PRIO_PROCESS, 0)
            deadline = time.monotonic() + 30
            while os.getpriority(os.PRIO_PROCESS, proc.pid) != min(base + 7, 19):
                assert proc.poll() is None, "the load generator ended"
                assert time.monotonic() < deadline, "niceness not applied"
                time.sleep(0.01)  # polling another process's state: no event to wait on
        finally:
            proc.kill()
            proc.wait()


def test_compressed_frames_keep_rsv1_in_parse_frames() -> None:
    frames, _ = parse_frames(
        bytes((0x80 | 0x40 | OP_TEXT, 2)) + b"ab" + encode_frame(OP_TEXT, b"c")
    )
    assert [op for op, _, _ in frames] == [0x40 | OP_TEXT, OP_TEXT]
    assert (
        "permessage-deflate"
        in client_handshake("h", 1, "/", extensions="permessage-deflate")[0].decode()
    )


def test_cluster_options_make_cluster_scenarios_and_configs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (plain,) = scenarios_from_args(_parse("--scenario", "ingest"))
    assert (plain.cluster, plain.relay, plain.instances) == (False, False, 1)
    (relay,) = scenarios_from_args(_parse("--scenario", "ingest", "--relay"))
    assert (relay.cluster, relay.relay, relay.instances) == (True, True, 1)
    scs = scenarios_from_args(_parse("--scenario", "saturated", "--instances", "1,2"))
    assert [(sc.cluster, sc.instances) for sc in scs] == [(True, 1), (True, 2)]
    (one,) = scenarios_from_args(_parse("--cluster"))
    assert one.cluster and not one.relay
    with pytest.raises(ValueError, match="need cluster"):
        attrs.evolve(plain, relay=True)
    with pytest.raises(ValueError, match="one owner"):
        attrs.evolve(relay, instances=2)
    assert run_from_args(_parse("--floor", "ingest", "--cluster")) == 2
    assert "--cluster" in capsys.readouterr().err

    assert "[cluster]" not in gateway_config_text(plain, 1, 2, 3)
    text = gateway_config_text(scs[1], 1, 0, 0, redis_url="redis://127.0.0.1:7/0", instance="b-2")
    path = tmp_path / "c.toml"
    path.write_text(text)
    config = load_config(path)
    assert config.gateway.reuse_port
    assert config.cluster is not None
    assert (config.cluster.redis_url, config.cluster.instance) == ("redis://127.0.0.1:7/0", "b-2")
    assert config.cluster.lease_ttl == 300
    assert not load_config_text(tmp_path, gateway_config_text(scs[0], 1, 0, 0)).gateway.reuse_port


def load_config_text(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "x.toml"
    path.write_text(text)
    return load_config(path)


# -- the rolling-restart bench (gateway/bench/_rolling.py) ------------------------------------


def test_rolling_bench_parts() -> None:
    # A stop hands a third of the fixtures over at the connect rate, with room to spare.
    assert rolling_drain_timeout(150, 5.0) == 2 * (10 + ROLLING_ROOM)
    want = rolling_owners(30, ROLLING_INSTANCES)
    assert set(want.values()) == set(ROLLING_INSTANCES)  # 30 fixtures: each gets some
    two = rolling_owners(30, ROLLING_INSTANCES[1:])
    assert all(two[fx] == who for fx, who in want.items() if who != "bench-a")
    leases: dict[str, tuple[str | None, str | None]] = {fx: (w, "live") for fx, w in want.items()}
    assert rolling_unsettled(leases, want) == []
    first, second = sorted(want)[:2]
    leases[first] = (want[first], "connecting")
    leases[second] = (None, None)
    assert rolling_unsettled(leases, want) == sorted([first, second])
    stalls = rolling_stalls(
        {
            "bench-a": {"stall_ms": {"count": 3, "p50": 40.0, "max": 90.0, "each": [40, 90, 30]}},
            "bench-b": {"stall_ms": {"count": 3, "p50": 60.0, "max": 80.0, "each": [80, 60, 50]}},
        },
        ["f0", "f1", "f2"],
        {"f1"},
    )
    assert stalls == {
        "stall_max_s": 0.09,
        "stall_p50_s": 0.06,
        "stall_moved_s": 0.09,  # f1: 90 ms on bench-a
        "stall_still_s": 0.08,  # f0: 80 ms on bench-b
    }
    trial = {
        "fixtures": 50,
        "standby": False,
        "stall_max_s": 0.2,
        "stall_p50_s": 0.05,
        "stall_moved_s": 0.2,
        "stall_still_s": 0.1,
        "lost": 0,
        "duplicates": 0,
        "stop_max_s": 4.0,
        "rebalance_max_s": 12.0,
        "total_s": 50.0,
        "vendor_connects": 100,
        "load_max": 2.5,
    }
    text = rolling_table([trial, {**trial, "stall_max_s": 0.4, "vendor_connects": 102}])
    row = text.splitlines()[2]
    assert row.startswith("| 50 | 0.30 [0.20 0.40] | 0.05 [0.05 0.05] | 0.20 [0.20 0.20] |"), row
    assert "| 0.10 [0.10 0.10] | 0 [0 0] | 0 [0 0] | 4.00 [4.00 4.00] |" in row
    assert "| 101 [100 102] |" in row


def test_rolling_bench_config_has_the_drain_time_and_the_extra_cluster_lines(
    tmp_path: Path,
) -> None:
    sc = attrs.evolve(PRESETS["ingest"], cluster=True)
    text = gateway_config_text(
        sc,
        1,
        0,
        0,
        redis_url="redis://127.0.0.1:7/0",
        lease_ttl=5,
        drain_timeout=47.5,
        cluster_extra=['key_prefix = "x"'],
    )
    with pytest.raises(
        ConfigError, match="Cannot overwrite a value"
    ):  # a duplicate key: the lines are there
        load_config_text(tmp_path, text)
    config = load_config_text(tmp_path, text.replace('key_prefix = "bench"\n', ""))
    assert config.gateway.drain_timeout == 47.5
    assert config.cluster is not None and config.cluster.key_prefix == "x"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--connect-rate=0",), "--connect-rate must be > 0"),
        (("--fixtures=2",), "at least 3"),
        (("--fixtures=a",), "numbers separated by commas"),
    ],
)
def test_rolling_options_are_checked(argv: tuple[str, ...], message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.bench._rolling", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert message in out.stderr


def test_the_load_generator_counts_lost_and_repeated_frames_by_ix() -> None:
    """With one fixture per subscriber (``--fanout spread``) the report says how many frames
    a subscriber never got between two it got, and how many it got again (by the feeder's
    ``ix``): the load generator against a gateway stand-in on a real socket."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)
        port = listener.getsockname()[1]
        argv = [sys.executable, "-m", "gateway.bench._loadgen", "--port", str(port)]
        proc = subprocess.Popen(
            [*argv, "--fanout", "spread"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(30)
                head = b""
                while b"\r\n\r\n" not in head:
                    head += conn.recv(4096)
                _, response = server_handshake(head.partition(b"\r\n\r\n")[0])
                conn.sendall(response)
                assert conn.recv(4096)  # its subscribe message: it reads from now on

                def frame(seq: int, ix: int) -> bytes:
                    data = f'{{"_bt":{1000 + seq},"id":"bench-0000","ix":{ix},"mt":0}}'
                    env = '{"type":"frame","feed":"tracking","fixture":"bench-0000",'
                    return encode_frame(OP_TEXT, f'{env}"seq":{seq},"data":{data}}}'.encode())

                for seq, ix in enumerate([5, 6, 8, 8, 9, 12, 7, 13], start=1):
                    conn.sendall(frame(seq, ix))
                # A short message and the next frame in one read: the short one is not a
                # frame (it once borrowed the next one's stamp and ix: a repeat).
                beat = encode_frame(OP_TEXT, b'{"type":"heartbeat"}')
                conn.sendall(beat + frame(9, 14) + frame(10, 16))
                deadline = time.monotonic() + 30
                while True:  # until it read them all (it reads while it answers)
                    proc.stdin.write(b"report\n")
                    proc.stdin.flush()
                    report = json.loads(proc.stdout.readline())
                    while report.get("event") != "report":
                        report = json.loads(proc.stdout.readline())
                    if report["lost"] + report["duplicates"] >= 1 + 2 + 1 + 2:
                        break
                    assert time.monotonic() < deadline, report
                    time.sleep(0.05)  # another process's progress: no event to wait on
        finally:
            proc.kill()
            proc.wait()
    assert (report["lost"], report["duplicates"]) == (1 + 2 + 1, 2)
    first = report["ix_events"][0]
    assert first[:5] == [0, "lost", 6, 8, 3]  # subscriber, what, last ix, ix, its seq
