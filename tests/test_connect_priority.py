"""Connect order when attempts queue at ``[upstream] connect_rate``: watched fixtures first.

A start, a restart or a cluster take-over asks for many upstream connections at once, and the
vendor grants about 5 per second: the fixtures people watch must not wait behind the others.
The order itself (and its fairness) is unit-tested under MockClock in test_upstream_units.py;
here a real gateway starts 16 fixtures against the simulator at 3 connects per second, with
subscribers on the last 3 of the config. The fixtures reach the limiter in no fixed order (each
reads the token in a worker thread first), and the first to arrive is granted at once: the test
takes the ones granted before the subscribers came as given, and checks that every later slot
goes to a watched fixture until none waits (first come, first served passes this about once in
a hundred runs or less). Then a cluster take-over after a kill -9, at 2 connects per second.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio_websocket

from tests.kit import next_of_type, simulator_and_gateway, stream_url, wait_until
from tests.redis_kit import RedisServer
from tests.test_cluster_gateway import Subscriber, cluster_of, ranked, settled, tracking
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


async def test_a_take_over_connects_the_new_owners_watched_fixtures_first(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """gw-a owns 10 fixtures and dies (kill -9); gw-b, which relayed them, gains them all in
    one round and takes them over in key order. Its subscribers watch the last two: at 2
    connects per second they are connected right after the first one taken over (which finds
    the limiter idle and goes at once), not 4 s later as the last in line."""
    fixtures = ranked(10, "gw-a")  # sorted: the order gw-b takes them over
    watched = fixtures[-2:]
    with trio.fail_after(90):
        async with (
            cluster_of(
                tmp_path, redis_server, tracking(fixtures), upstream={"connect_rate": 2.0}
            ) as c,
            trio.open_nursery() as nursery,
        ):
            a = await c.start("gw-a")
            await wait_until(lambda: settled([a], fixtures, c.sim), 40)
            b = await c.start("gw-b")
            await wait_until(lambda: settled([a, b], fixtures, c.sim), 20)
            sub = await Subscriber.open(nursery, b)
            for fx in watched:
                await sub.subscribe("tracking", fx)
            await wait_until(lambda: all(sub.count(fx) >= 1 for fx in watched))
            before = len(c.sim.attempts)
            await c.kill(a)
            await wait_until(lambda: all(b.owns(fx) for fx in fixtures), 20)
            await wait_until(lambda: settled([b], fixtures, c.sim), 30)
            after = [x.fixture_id for x in c.sim.attempts[before:]]
            assert set(after) == set(fixtures), after
            assert set(watched) <= set(after[:3]), after
            await sub.close()
            nursery.cancel_scope.cancel()
        c.check_healthy()
