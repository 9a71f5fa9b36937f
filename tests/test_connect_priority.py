"""Connect order when attempts queue at ``[upstream] connect_rate``: watched fixtures first.

A start, a restart or a cluster take-over asks for many upstream connections at once, and the
vendor grants about 5 per second: the fixtures people watch must not wait behind the others.
The order itself (and its fairness) is unit-tested under MockClock in test_upstream_units.py;
here a real gateway starts 16 fixtures against the simulator at 3 connects per second, with
subscribers on the last 3 of the config. The fixtures reach the limiter in no fixed order (each
reads the token in a worker thread first), and the first to arrive is granted at once: the test
takes the ones granted before the subscribers came as given, and checks that every later slot
goes to a watched fixture until none waits (first come, first served passes this about once in
a hundred runs or less).
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio_websocket

from tests.kit import next_of_type, simulator_and_gateway, stream_url, wait_until
from tests.test_dataplane import subscribe

RATE = 3.0


async def test_subscribed_fixtures_connect_before_the_others_at_start(tmp_path: Path) -> None:
    ids = [f"P{i}" for i in range(16)]
    watched = set(ids[-3:])
    with trio.fail_after(60):
        async with (
            simulator_and_gateway(
                tmp_path, [("tracking", i) for i in ids], upstream={"connect_rate": RATE}
            ) as (sim, gw),
            trio_websocket.open_websocket_url(stream_url(gw)) as ws1,
            trio_websocket.open_websocket_url(stream_url(gw)) as ws2,
            trio_websocket.open_websocket_url(stream_url(gw)) as ws3,
        ):
            subs = (ws1, ws2, ws3)
            for ws, fx in zip(subs, sorted(watched), strict=True):
                await subscribe(ws, fx)
            limiter = gw.supervisor.limiter

            def connected() -> list[str]:
                seen: list[str] = []
                for a in sim.attempts:
                    if a.fixture_id is not None and a.fixture_id not in seen:
                        seen.append(a.fixture_id)
                return seen

            # Every fixture has either connected (granted before the subscribers came) or
            # waits at the limiter: from now on each slot is granted knowing the subscribers.
            await wait_until(lambda: len(connected()) + sum(limiter.waiting) == len(ids))
            early = connected()
            waiting = watched - set(early)
            assert waiting and len(early) <= len(ids) - 8, early  # else it proves nothing

            await wait_until(lambda: len(connected()) == len(ids), timeout=30)
            later = [fx for fx in connected() if fx not in early]
            assert set(later[: len(waiting)]) == waiting, connected()
            # And their subscribers get the vendor's frames.
            for ws in subs:
                await next_of_type(ws, "frame")
