"""Process orchestration (first version: placeholder while the pieces land)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gateway.bench._scenario import Scenario


class BenchError(Exception):
    """A benchmark run could not complete (a process failed to start, nothing arrived...)."""


def run_bench(
    scenarios: Sequence[Scenario],
    *,
    gateway: bool = True,
    peer: bool | None = None,
    json_path: Path | None = None,
    progress: bool = True,
) -> dict[str, object]:
    raise BenchError("the benchmark harness is not finished yet")
