"""The ready-made monitoring of ``config/monitoring/`` against a real gateway, with promtool.

- ``promtool check metrics`` finds nothing to say about a real gateway's ``/metrics`` (a
  single-instance cluster on a real Redis with a recorder, following a tracking and a fastpath
  fixture of the simulator: every family present).
- Every metric the Grafana dashboard and the alert rules use is on that ``/metrics``.
- ``promtool check rules`` and ``promtool test rules`` pass on the alert rules.

promtool comes from Debian's ``prometheus`` package (``.ci/test`` installs it as root when
missing); without it these tests fail in CI (``CI=true``) and skip elsewhere.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Final

import pytest
import requests
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.service import Gateway
from tests.conftest import require_tool
from tests.kit import http_url, simulator_and_gateway, wait_until
from tests.redis_kit import RedisServer

MONITORING: Final = Path(__file__).resolve().parent.parent / "config" / "monitoring"
DASHBOARD: Final = MONITORING / "grafana-dashboard.json"
ALERTS: Final = MONITORING / "alerts.yml"
ALERTS_TEST: Final = MONITORING / "alerts_test.yml"
FX: Final = "5501b26a-1c44-4c3b-9ff5-9322084d41f9"
FX2: Final = "08456e52-9cf7-48cc-913c-f45ec0a1b2c3"
#: A metric name in PromQL: the gateway's families and prometheus_client's own collectors.
METRIC_NAME: Final = re.compile(r"\b(?:dde|process|python)_[a-z0-9_]+\b")
#: Series Prometheus makes itself, never on a target's /metrics.
SCRAPE_SERIES: Final = frozenset({"up"})


@pytest.fixture
def promtool() -> str:
    """promtool's path; fails (CI) or skips (elsewhere) the test without it."""
    found = shutil.which("promtool")
    require_tool(
        "promtool",
        None
        if found
        else "no promtool on PATH: apt-get install -y prometheus (.ci/test does it as root)",
    )
    assert found is not None
    return found


async def run_promtool(promtool: str, *args: str, stdin: bytes = b"") -> tuple[int, str]:
    """promtool's exit status and its stdout and stderr together."""
    with trio.fail_after(60):
        done = await trio.run_process(
            [promtool, *args], stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )
    return done.returncode, (done.stdout + done.stderr).decode()


def dashboard_exprs() -> list[str]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def alert_exprs() -> list[str]:
    rules: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def used_metrics(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


def exposed_names(text: str) -> set[str]:
    """Every family and sample name of an exposition (``x``, ``x_total``, ``x_bucket`` ...)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def _data_aged(gw: Gateway, feed: str) -> bool:
    age = gw.data_age().get(feed)
    return age is not None and age.count > 0


async def test_real_metrics_pass_promtool_and_hold_every_metric_monitoring_uses(
    tmp_path: Path, redis_server: RedisServer, promtool: str
) -> None:
    async with simulator_and_gateway(
        tmp_path,
        [("tracking", FX), ("actions", FX2)],
        recorder={"dir": str(tmp_path / "rec")},
        cluster={"redis_url": f"redis://127.0.0.1:{redis_server.port}/0", "instance": "gw-m"},
    ) as (_, gw):
        # Every family with labels has its series once both feeds had a frame and a data age.
        for feed, fixture in (("tracking", FX), ("actions", FX2)):
            await wait_until(lambda f=feed, x=fixture: gw.latest(f, x) is not None, 30)
            await wait_until(lambda f=feed: _data_aged(gw, f), 30)
        url = http_url(gw, "/metrics")
        with trio.fail_after(30):
            reply = await trio.to_thread.run_sync(lambda: requests.get(url, timeout=20))
    assert reply.status_code == 200
    text = reply.text

    status, said = await run_promtool(promtool, "check", "metrics", stdin=reply.content)
    assert (status, said.strip()) == (0, ""), said

    exposed = exposed_names(text)
    for name in ("dde_build_info", "process_resident_memory_bytes", "process_open_fds"):
        assert name in exposed
    for what, exprs in (("dashboard", dashboard_exprs()), ("alert rules", alert_exprs())):
        used = used_metrics(exprs)
        assert used, what
        assert used - exposed == set(), f"the {what} use metrics a gateway does not expose"


async def test_alert_rules_check_and_their_unit_tests_pass(promtool: str) -> None:
    status, said = await run_promtool(promtool, "check", "rules", str(ALERTS))
    assert status == 0, said
    status, said = await run_promtool(promtool, "test", "rules", str(ALERTS_TEST))
    assert status == 0, said
    assert "SUCCESS" in said
    # Every alert has a unit test that makes it fire.
    rules: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    tests: dict[str, Any] = yaml.safe_load(ALERTS_TEST.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert fired == alerts
    # Only series a gateway exposes (or Prometheus makes) are fed to the rules.
    fed = {
        re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", s["series"].strip("'"))[0]  # type: ignore[index]
        for test in tests["tests"]
        for s in test["input_series"]
    }
    assert fed - SCRAPE_SERIES <= used_metrics(alert_exprs())


def test_dashboard_is_one_grafana_dashboard_over_a_chosen_prometheus() -> None:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "dde-gateway"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in board["panels"] if p["type"] == "row"}
    assert titles == {"Fixtures", "Traffic", "Recorder", "Cluster", "Process"}
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            # Every query is scoped to the chosen instances.
            assert 'instance=~"$instance"' in target["expr"], target["expr"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
