"""Lame-duck drain (issue 25 item 6): SIGTERM's drain closes subscribers spread over
``[gateway] lame_duck_period`` with 1001 and a reason telling them to resume elsewhere, and
``/readyz`` is 503 from the first moment."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
import trio_websocket

from gateway.config import structure_config
from gateway.dataplane import close_spread
from gateway.wire import CLOSE_GOING_AWAY, DRAIN_REASON
from tests.kit import http_get, http_url, simulator_and_gateway, stream_url, wait_until

SUBSCRIBERS = 10
PERIOD = 2.0


class _Conn:
    def __init__(self, closed_at: list[float]) -> None:
        self.closed_at = closed_at

    def close(self, code: int, reason: str) -> None:
        assert (code, reason) == (CLOSE_GOING_AWAY, DRAIN_REASON)
        self.closed_at.append(trio.current_time())


@pytest.mark.parametrize("n", [1, 7, 1000])
async def test_closes_are_spread_evenly_over_the_period(
    n: int, autojump_clock: trio.testing.MockClock
) -> None:
    times: list[float] = []
    start = trio.current_time()
    await close_spread([_Conn(times) for _ in range(n)], 1.0, CLOSE_GOING_AWAY, DRAIN_REASON)
    offsets = [t - start for t in times]
    assert len(offsets) == n and offsets[0] == 0.0 and offsets[-1] < 1.0 + 0.0101
    if n > 1:
        # Each close is due at period * i / n: none early, none later than one tick.
        for i, at in enumerate(offsets):
            assert i / n <= at + 1e-9 and at < i / n + 0.0101


async def test_period_zero_closes_all_at_once(autojump_clock: trio.testing.MockClock) -> None:
    times: list[float] = []
    await close_spread([_Conn(times) for _ in range(50)], 0.0, CLOSE_GOING_AWAY, DRAIN_REASON)
    assert len(set(times)) == 1


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def test_a_short_drain_keeps_its_config_valid() -> None:
    """A ``drain_timeout`` below the default lame-duck period (a config written before the
    period existed) is not refused: the drain uses at most half the time it has left."""
    config = structure_config(
        {"gateway": {"drain_timeout": 2.0}, "upstream": {"token_env": "X"}, "feeds": {}}
    )
    assert config.gateway.lame_duck_period > config.gateway.drain_timeout


async def test_drain_spreads_the_closes_and_readyz_is_503_at_once(tmp_path: Path) -> None:
    closed: list[tuple[float, int, str]] = []
    ready_when_closed: list[bool] = []
    with trio.fail_after(60):
        async with simulator_and_gateway(
            tmp_path,
            [("tracking", "fx")],
            gateway={"lame_duck_period": PERIOD, "drain_timeout": 20.0},
        ) as (_sim, gw):

            async def subscriber(*, task_status: trio.TaskStatus[None]) -> None:
                async with trio_websocket.open_websocket_url(stream_url(gw)) as ws:
                    task_status.started()
                    try:
                        while True:
                            await ws.get_message()
                    except trio_websocket.ConnectionClosed as exc:
                        assert exc.reason is not None
                        ready_when_closed.append(gw.is_ready())
                        closed.append(
                            (trio.current_time(), exc.reason.code, exc.reason.reason or "")
                        )

            async with trio.open_nursery() as nursery:
                for _ in range(SUBSCRIBERS):
                    await nursery.start(subscriber)
                await wait_until(lambda: len(gw.registry) == SUBSCRIBERS)
                assert (await http_get(http_url(gw, "/readyz")))[0] == 200
                nursery.start_soon(gw.drain)
                await wait_until(lambda: len(closed) > 0)
                assert (await http_get(http_url(gw, "/readyz")))[0] == 503
    assert len(closed) == SUBSCRIBERS
    # Not ready from the first moment: already when the first subscriber saw its close.
    assert ready_when_closed == [False] * SUBSCRIBERS
    assert {(code, reason) for _, code, reason in closed} == {(CLOSE_GOING_AWAY, DRAIN_REASON)}
    times = sorted(t for t, _, _ in closed)
    # Healthy: spread over ~0.9 x PERIOD (1.8 s); all at once (the old drain): within ~10 ms.
    assert times[-1] - times[0] > PERIOD / 4, times
