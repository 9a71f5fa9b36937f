"""The diagnostic slow-step instrument (``DDE_GATEWAY_SLOW_STEPS``): off by default; records a
step that blocks the loop, with its task name, and nothing for short steps."""

from __future__ import annotations

import io
import json
import time

import pytest
import trio

from gateway.service import SlowStepLog, instruments_from_env


def test_off_unless_the_environment_names_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DDE_GATEWAY_SLOW_STEPS", raising=False)
    assert instruments_from_env() == []


def test_a_blocking_step_is_recorded_with_its_task() -> None:
    out = io.StringIO()

    async def blocker() -> None:
        await trio.lowlevel.checkpoint()
        end = time.perf_counter() + 0.03
        while time.perf_counter() < end:  # blocks the loop: the step to report
            pass
        await trio.lowlevel.checkpoint()

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocker, name="the-blocker")
                for _ in range(5):
                    await trio.lowlevel.checkpoint()

    trio.run(main, instruments=[SlowStepLog(out, threshold_ms=20)])
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["task"] for r in records] == ["the-blocker"]
    assert records[0]["wall_ms"] >= 30
    assert "test_slowsteps.py" in records[0]["at"]
