"""Smoke test of ``dde-gateway bench``: a tiny run end to end, gateway and websockets peer.

Covers: the feeder, the gateway started exactly as ``dde-gateway run`` with a generated config,
the peer, the load generator, the drop, idle and stuck measurements, the table and the JSON file.
Rules: real processes on 127.0.0.1 (ports picked by the harness); no threshold on any speed
figure - only that every figure exists and is sane (non-zero, ordered percentiles, every
subscriber saw fresh frames after the drop). Marked slow; about 15 s on a loaded 2-core box.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.bench import ROWS, Scenario, peer_available, run_bench

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
    for _, label, _, _ in ROWS:
        assert label in table
    assert "ERROR" not in table
