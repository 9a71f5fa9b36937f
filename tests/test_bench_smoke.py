"""Smoke test of ``dde-gateway bench``: a tiny run end to end, gateway and websockets peer.

Covers: the feeder, the gateway started exactly as ``dde-gateway run`` with a generated config,
the peer, the load generator, the drop, idle and stuck measurements, the table and the JSON file.
Rules: real processes on 127.0.0.1 (ports picked by the harness); no threshold on any speed
figure - only that every figure exists and is sane (non-zero, ordered percentiles, every
subscriber saw fresh frames after the drop). Marked slow; about 15 s on a loaded 2-core box.
The cluster runs (``--relay``, ``--instances 2``, the floor and takeover scripts) start a
redis-server of the bench's own: without one they skip (fail in CI), as ``redis_server`` does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from gateway.bench import (
    CLUSTER_ROWS,
    ROWS,
    Scenario,
    peer_available,
    run_bench,
)
from tests.conftest import require_redis

SMOKE = Scenario(
    name="smoke",
    subscribers=3,
    fixtures=2,
    rate=100.0,
    frame_bytes=600,
    duration=2.0,
    warmup=0.3,
    drop=True,
    idle=20,
    stuck=1,
)


@pytest.mark.slow
def test_bench_smoke_produces_a_complete_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert peer_available(), "websockets is a test requirement (and the 'bench' extra)"
    out = tmp_path / "bench.json"
    doc = run_bench([SMOKE], json_path=out, progress=False)

    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    (result,) = doc["results"]
    assert result["errors"] == []
    assert set(result["runs"]) == {"gateway", "peer"}
    for kind, phases in result["runs"].items():
        run = phases["main"]
        assert run["deliveries"] > 0, kind
        assert run["frames_in_per_s"] > 0, kind
        assert run["frames_out_per_s"] > 0, kind
        assert run["target_cpu_s"] > 0, kind
        assert run["deliveries_per_cpu_s"] > 0, kind
        lat = run["latency_ms"]
        assert lat["count"] == run["deliveries"], kind
        assert 0 < lat["p50"] <= lat["p99"] <= lat["p999"] <= lat["max"], kind
        assert run["peak_rss_kib"] >= run["rss_kib"] > 0, kind
        assert run["rss_per_idle_kib"] is not None, kind
        assert run["idle_open"] == SMOKE.idle, kind
        assert run["healthy_open"] == SMOKE.subscribers, kind
        assert run["stuck"] == SMOKE.stuck, kind
        # Every subscriber got a frame stamped after the drop: the upstream came back.
        assert run["fresh_subscribers"] == SMOKE.subscribers, kind
        assert run["drop_to_fresh_ms"] > 0, kind

    table = capsys.readouterr().out
    for key, label, _, _ in ROWS:
        assert (label in table) == (key not in CLUSTER_ROWS), label
    assert "ERROR" not in table


@pytest.mark.slow
def test_bench_cluster_smoke_relay_and_two_instances(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--cluster --relay`` and ``--instances 2``: the bench starts its own redis-server
    (skipped without one, failed in CI, like the ``redis_server`` fixture), and both sides of
    each run have deliveries, latencies, the appends and Redis's CPU."""
    require_redis()
    relay = attrs.evolve(
        SMOKE, name="smoke-relay", drop=False, idle=0, stuck=0, cluster=True, relay=True
    )
    pair = attrs.evolve(relay, name="smoke-x2", relay=False, instances=2, subscribers=6)
    doc = run_bench([relay, pair], peer=False, json_path=tmp_path / "b.json", progress=False)

    by_name = {res["scenario"]["name"]: res for res in doc["results"]}
    for res in by_name.values():
        assert res["errors"] == []
        main = res["runs"]["gateway"]["main"]
        assert main["redis_cpu_percent"] > 0
        assert main["redis"]["frames_appended_per_s"] > 0
        assert main["instances"][0]["owned"] == SMOKE.fixtures
    runs = by_name["smoke-relay"]["runs"]["gateway"]
    assert set(runs) == {"main", "relay"}
    for phase in ("main", "relay"):
        run = runs[phase]
        assert run["deliveries"] > 0, phase
        assert run["latency_ms"]["count"] == run["deliveries"], phase
        assert run["healthy_open"] == SMOKE.subscribers, phase
    assert runs["relay"]["instances"][0]["owned"] == 0
    (a, b) = by_name["smoke-x2"]["runs"]["gateway"]["main"]["instances"]
    assert (a["owned"], b["owned"]) == (SMOKE.fixtures, 0)
    assert a["subscribers"] + b["subscribers"] == 6
    table = capsys.readouterr().out
    for key, label, _, _ in ROWS:
        if key in CLUSTER_ROWS:
            assert label in table, label
    assert "smoke-relay cluster (relay)" in table
    assert "smoke-x2 x2" in table


@pytest.mark.slow
def test_cluster_floor_and_takeover_scripts_run(tmp_path: Path) -> None:
    """``python -m gateway.bench._cluster_floor`` and ``..._takeover`` (3 fixtures, lease_ttl 2:
    the shortest whose redis_timeout the bench need not cut below 0.5 s), tiny, as documented:
    every figure is there and sane (no speed asserted)."""
    require_redis()
    floor = subprocess.run(
        [
            *(sys.executable, "-m", "gateway.bench._cluster_floor"),
            *("--fixtures=3", "--rate=20", "--duration=1", "--warmup=0.3"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    figures = json.loads(floor.stdout.splitlines()[1])
    assert figures["frames_per_s"] > 0
    assert figures["frames_per_request"] >= 1
    assert figures["relay"]["entries_per_s"] > 0
    assert 0 <= figures["relay"]["lag_ms"]["p50"] <= figures["relay"]["lag_ms"]["max"]

    out = tmp_path / "takeover.json"
    takeover = subprocess.run(
        [
            *(sys.executable, "-m", "gateway.bench._takeover", "--fixtures=3", "--lease-ttl=2"),
            *("--runs=1", "--frame-bytes=600", "--watched=0.5", "--standby=on", f"--json={out}"),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    assert "| 3, 2 s, on |" in takeover.stdout
    doc = json.loads(out.read_text())
    assert doc["errors"] == []
    (result,) = doc["trials"]
    assert 0 < result["lease_first_s"] <= result["lease_all_s"] <= result["owner_live_all_s"]
    assert result["connect_rate"] == 5  # the vendor's, by default
    assert result["standby"] is True
    assert result["watched"] == 2  # round(3 * 0.5): one subscriber each
    assert result["first_frame_count"] == 2
    assert 0 < result["first_frame_p50_s"] <= result["first_frame_max_s"]
    assert 0 < result["watched_live_p50_s"] <= result["watched_live_all_s"]
    # The stall spans the kill: at least until the new owner's frames came.
    assert 0 < result["stall_p50_s"] <= result["stall_max_s"]


@pytest.mark.slow
def test_replay_bench_runs(tmp_path: Path) -> None:
    """``python -m gateway.bench._replay``, tiny (a 30 s match at 25 Hz written by the
    recorder, 3 replays at 50/s for 1 s): every figure is there and sane (no speed asserted);
    a second run reuses the recording."""
    out = tmp_path / "replay.json"
    argv = [
        *(sys.executable, "-m", "gateway.bench._replay", "--replays=3", "--rate=50"),
        *("--duration=1", "--runs=1", "--minutes=0.5", f"--recording={tmp_path / 'rec'}"),
        f"--json={out}",
    ]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    assert "writing 750 frames" in first.stderr
    doc = json.loads(out.read_text())
    assert doc["recording"]["frames"] == 750 and doc["recording"]["bytes_on_disk"] > 0
    (run,) = doc["runs"]
    assert run["replays"] == 3 and run["frames_per_s_asked"] == 150
    assert run["frames_per_s"] > 0 and run["slowest_client_frames"] > 0
    assert 0 < run["rss_baseline_mib"] <= run["rss_peak_mib"]
    again = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    assert "writing" not in again.stderr
