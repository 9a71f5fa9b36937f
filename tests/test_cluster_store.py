"""The cluster's Redis side against a real redis-server: the Lua scripts through RedisStore.

Each test gets its own ``redis-server`` (``tests/redis_kit.py``) and opens the store exactly as
the gateway does (:func:`gateway.cluster.open_store` with a ``[cluster]`` section). Covered:
leases (acquire, renew, holders, release, expiry in Redis), fenced appends (wrong token, other
epoch, retried batch, trimming), takeover, metas, reads, on-demand and API sets, the
cluster-wide connect slots, heartbeats; and the failure boundary: the pool that keeps its
slots when blocking reads are cancelled, time out or lose Redis, every method failing as
:class:`RedisUnavailable` (quickly, never a coredis error) while Redis is down or hung, and
the password never in an error.

Expiry is waited for as a condition with a deadline (Redis's own clock decides), never a sleep.
"""

from __future__ import annotations

import itertools
import logging
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.cluster import (
    AppendGroup,
    Behind,
    Entry,
    Meta,
    RedisStore,
    RedisUnavailable,
    offer_value,
    open_store,
    ready_value,
)
from gateway.config import ClusterSection, ListenAddress
from tests.conftest import require_redis
from tests.redis_kit import RedisServer, SentinelGroup

K1 = "tracking/f1"
K2 = "tracking/f2"
TOK_A = "gw-a/0001"
TOK_B = "gw-b/0002"
EPOCH = "e1e1e1e1e1e1e1e1"


def section(server: RedisServer, **extra: Any) -> ClusterSection:
    """A ``[cluster]`` section for *server* (TCP; never a password in the URL)."""
    return ClusterSection(redis_url=f"redis://127.0.0.1:{server.port}/0", **extra)


@asynccontextmanager
async def store_of(server: RedisServer, **extra: Any) -> AsyncIterator[RedisStore]:
    config = section(server, **extra)
    # The password is read beforehand, as the gateway does (load_cluster_password at start).
    async with open_store(config, password=config.read_password()) as store:
        yield store


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Ask Redis until *check* holds; TooSlowError after *timeout* s (no fixed sleep)."""
    with trio.fail_after(timeout):
        while not await check():  # noqa: ASYNC110 - the state is in Redis: nothing to wait on
            await trio.sleep(0.02)


def frames(seqs: range, *, position: bool = True) -> list[tuple[int, int | None, float, bytes]]:
    return [(s, 1000 + s if position else None, 1.5 + s, b'{"ix":%d}' % s) for s in seqs]


def xlen(server: RedisServer, key: str) -> int:
    n = server.call("XLEN", f"dde:stream:{key}")
    assert isinstance(n, int)
    return n


# -- leases ----------------------------------------------------------------------------------


async def test_leases_acquire_renew_and_holders(redis_server: RedisServer) -> None:
    with trio.fail_after(20):
        async with store_of(redis_server) as store:
            assert await store.leases(TOK_A, 30.0, {}) == {}
            # Free and asked for: taken. Free and not asked for: stays free.
            assert await store.leases(TOK_A, 1.0, {K1: "a", K2: "-"}) == {K1: TOK_A, K2: None}
            assert redis_server.call("GET", f"dde:lease:{K2}") is None
            # Another token sees the holder and cannot take it.
            assert await store.leases(TOK_B, 30.0, {K1: "a", K2: "a"}) == {K1: TOK_A, K2: TOK_B}
            # The holder renews whatever the mode, with the new time to live.
            assert await store.leases(TOK_A, 30.0, {K1: "-"}) == {K1: TOK_A}
            pttl = redis_server.call("PTTL", f"dde:lease:{K1}")
            assert isinstance(pttl, int) and 25_000 < pttl <= 30_000


async def test_release_only_what_the_token_holds(redis_server: RedisServer) -> None:
    with trio.fail_after(20):
        async with store_of(redis_server) as store:
            await store.leases(TOK_A, 30.0, {K1: "a"})
            await store.leases(TOK_B, 30.0, {K2: "a"})
            assert await store.release(TOK_B, []) == 0
            assert await store.release(TOK_B, [K1]) == 0
            assert await store.leases(TOK_B, 30.0, {K1: "-"}) == {K1: TOK_A}
            assert await store.release(TOK_A, [K1, K2]) == 1
            assert await store.leases(TOK_B, 30.0, {K1: "-", K2: "-"}) == {K1: None, K2: TOK_B}
            # A released lease holds a marker for the cluster's lease_ttl (10 s by default):
            # free for a lease round, which takes it.
            assert redis_server.call("GET", f"dde:lease:{K1}") == b"-"
            pttl = redis_server.call("PTTL", f"dde:lease:{K1}")
            assert isinstance(pttl, int) and 0 < pttl <= 10_000
            assert await store.leases(TOK_B, 30.0, {K1: "a"}) == {K1: TOK_B}


async def test_a_lease_expires_after_its_ttl_in_redis(redis_server: RedisServer) -> None:
    with trio.fail_after(20):
        async with store_of(redis_server) as store:
            sent = trio.current_time()  # Redis starts the time to live after this
            assert await store.leases(TOK_A, 0.3, {K1: "a"}) == {K1: TOK_A}

            async def free() -> bool:
                return (await store.leases(TOK_B, 30.0, {K1: "-"}))[K1] is None

            await eventually(free, timeout=5.0)
            # Not before its time to live (PX counts whole milliseconds).
            assert trio.current_time() - sent >= 0.3 - 0.002
            # Free now: the other token may take it.
            assert await store.leases(TOK_B, 30.0, {K1: "a"}) == {K1: TOK_B}


async def test_a_handover_moves_the_lease_only_to_a_successor_in_step(
    redis_server: RedisServer,
) -> None:
    """Planned handovers (make-before-break): an offer only by the lease holder; the lease
    goes to the successor only once it answered ready, and only from the holder; after the
    transfer the old holder's appends are fenced and the successor's are taken."""
    offer, ready = offer_value("gw-b"), ready_value(TOK_B)
    with trio.fail_after(20):
        async with store_of(redis_server, lease_ttl=5.0) as store:
            await store.leases(TOK_A, 30.0, {K1: "a"})
            assert await store.offer(TOK_B, {K1: offer}, 10.0) == {K1: None}  # not its lease
            assert await store.offer(TOK_A, {K1: offer}, 10.0) == {K1: offer}
            assert await store.handovers([K1, K2]) == {K1: offer, K2: None}
            # Not answered yet: nothing moves.
            assert not await store.transfer(TOK_A, K1, TOK_B)
            assert await store.swap_handover([K1], offer_value("gw-c"), ready) == 0
            assert await store.swap_handover([K1], offer, ready) == 1
            # An offer renewed later keeps the answer; another token cannot hand it over.
            assert await store.offer(TOK_A, {K1: offer}, 10.0) == {K1: ready}
            assert not await store.transfer(TOK_B, K1, TOK_B)
            assert await store.transfer(TOK_A, K1, TOK_B)
            assert await store.handovers([K1]) == {K1: None}
            assert await store.leases(TOK_A, 30.0, {K1: "a"}) == {K1: TOK_B}
            pttl = redis_server.call("PTTL", f"dde:lease:{K1}")
            assert isinstance(pttl, int) and 0 < pttl <= 5_000
            group = AppendGroup(K1, EPOCH, frames(range(1, 3)), ("live", ""))
            assert await store.append(TOK_A, "gw-a", [group]) == ["fenced"]
            assert await store.append(TOK_B, "gw-b", [group]) == [2]
            # A withdrawn offer is gone; one of another value is left alone.
            await store.offer(TOK_B, {K1: offer_value("gw-a")}, 10.0)
            assert await store.swap_handover([K1], offer, None) == 0
            assert await store.swap_handover([K1], offer_value("gw-a"), None) == 1
            assert await store.handovers([K1]) == {K1: None}


# -- appends ---------------------------------------------------------------------------------


async def test_append_fenced_by_another_holder_or_a_released_lease(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(20):
        async with store_of(redis_server, lease_ttl=5.0) as store:
            group = AppendGroup(K1, EPOCH, frames(range(1, 4)), ("live", ""))
            await store.leases(TOK_B, 30.0, {K1: "a"})
            assert await store.append(TOK_A, "gw-a", [group]) == ["fenced"]
            assert xlen(redis_server, K1) == 0
            assert redis_server.call("EXISTS", f"dde:meta:{K1}") == 0
            # Released: free for a lease round, but a late append (of anyone, its last holder
            # included) does not take it back.
            assert await store.release(TOK_B, [K1]) == 1
            assert await store.append(TOK_B, "gw-b", [group]) == ["fenced"]
            assert await store.append(TOK_A, "gw-a", [group]) == ["fenced"]
            assert xlen(redis_server, K1) == 0
            assert await store.leases(TOK_A, 30.0, {K1: "a"}) == {K1: TOK_A}
            assert await store.append(TOK_A, "gw-a", [group]) == [3]


async def test_append_takes_a_lease_that_vanished(redis_server: RedisServer) -> None:
    """No lease key at all (it expired while Redis was away, or Redis lost its data): nobody
    holds it, so the append takes it for its token, with the cluster's lease_ttl."""
    with trio.fail_after(20):
        async with store_of(redis_server, lease_ttl=5.0) as store:
            group = AppendGroup(K1, EPOCH, frames(range(1, 3)))
            assert await store.append(TOK_A, "gw-a", [group]) == [2]
            assert redis_server.call("GET", f"dde:lease:{K1}") == TOK_A.encode()
            pttl = redis_server.call("PTTL", f"dde:lease:{K1}")
            assert isinstance(pttl, int) and 4_000 < pttl <= 5_000
            # Then it is the token's like any other: another token's append is fenced.
            more = AppendGroup(K1, EPOCH, frames(range(3, 5)))
            assert await store.append(TOK_B, "gw-b", [more]) == ["fenced"]
            assert await store.leases(TOK_B, 30.0, {K1: "a"}) == {K1: TOK_A}


async def test_append_entries_fields_meta_and_mixed_groups(redis_server: RedisServer) -> None:
    with trio.fail_after(20):
        async with store_of(redis_server) as store:
            await store.leases(TOK_A, 30.0, {K1: "a"})
            await store.leases(TOK_B, 30.0, {K2: "a"})
            ok = AppendGroup(K1, EPOCH, frames(range(1, 4)), ("live", "ok"))
            fenced = AppendGroup(K2, EPOCH, frames(range(1, 3)))
            assert await store.append(TOK_A, "gw-a", [fenced, ok]) == ["fenced", 3]
            assert xlen(redis_server, K1) == 3 and xlen(redis_server, K2) == 0
            entries = redis_server.call("XRANGE", f"dde:stream:{K1}", "-", "+")
            assert isinstance(entries, list)
            assert [e[0] for e in entries] == [b"1-0", b"2-0", b"3-0"]  # type: ignore[index]
            assert entries[0][1] == [b"p", b"1001", b"t", b"2.5", b"d", b'{"ix":1}']  # type: ignore[index]
            meta = redis_server.call("HGETALL", f"dde:meta:{K1}")
            assert isinstance(meta, list)
            assert dict(zip(meta[::2], meta[1::2], strict=True)) == {
                b"epoch": EPOCH.encode(),
                b"state": b"live",
                b"detail": b"ok",
                b"owner": b"gw-a",
                b"p": b"1003",
                b"t": b"4.5",
                b"last": b"3",
            }
            # A status alone: meta updated, nothing appended, reply 0.
            status = AppendGroup(K1, EPOCH, [], ("backoff", "vendor closed"))
            assert await store.append(TOK_A, "gw-a", [status]) == [0]
            assert (await store.metas([K1]))[K1] == Meta(
                EPOCH, "backoff", "vendor closed", "gw-a", first_seq=1, last_seq=3
            )
            assert xlen(redis_server, K1) == 3


async def test_append_with_another_epoch_is_refused(redis_server: RedisServer) -> None:
    with trio.fail_after(20):
        async with store_of(redis_server) as store:
            await store.leases(TOK_A, 30.0, {K1: "a"})
            assert await store.append(TOK_A, "gw-a", [AppendGroup(K1, EPOCH, frames(range(1, 3)))])
            other = AppendGroup(K1, "0" * 16, frames(range(3, 6)), ("live", ""))
            assert await store.append(TOK_A, "gw-a", [other]) == ["epoch"]
            assert xlen(redis_server, K1) == 2
            assert (await store.metas([K1]))[K1].epoch == EPOCH
            assert (await store.metas([K1]))[K1].state is None


async def test_a_retried_batch_writes_nothing_twice(redis_server: RedisServer) -> None:
    with trio.fail_after(20):
        async with store_of(redis_server) as store:
            await store.leases(TOK_A, 30.0, {K1: "a"})
            batch = [AppendGroup(K1, EPOCH, frames(range(1, 6)))]
            assert await store.append(TOK_A, "gw-a", batch) == [5]
            # The reply was lost, the appender retries the same batch: nothing new, 0.
            assert await store.append(TOK_A, "gw-a", batch) == [0]
            assert xlen(redis_server, K1) == 5
            # A batch overlapping what was written writes only the new frames.
            more = [AppendGroup(K1, EPOCH, frames(range(4, 9)))]
            assert await store.append(TOK_A, "gw-a", more) == [8]
            tail = await store.tail(K1, 0, 100)
            assert [e.seq for e in tail] == list(range(1, 9))


async def test_append_behind_what_redis_confirmed_writes_nothing(
    redis_server: RedisServer,
) -> None:
    """Redis lost the last confirmed appends (a replica promoted without them; simulated by
    writing the stream again without them: XDEL would keep its last id): an append expecting
    the stream up to seq 8 writes nothing and says where the stream ends (``Behind``); sent
    again with the missing frames first and the stream's real end as ``expect``, it writes
    them all, in order. A stream gone with its meta (Redis empty) is behind at 0; ``expect``
    0 (nothing confirmed yet) is never behind; a lease held by another is fenced first; a
    meta without ``last`` (an older version's) has the stream asked."""
    with trio.fail_after(20):
        async with store_of(redis_server) as store:
            await store.leases(TOK_A, 30.0, {K1: "a", K2: "a"})
            assert await store.append(TOK_A, "gw-a", [AppendGroup(K1, EPOCH, frames(range(1, 9)))])
            stream = f"dde:stream:{K1}"
            redis_server.call("DEL", stream)
            for seq, p, t, d in frames(range(1, 6)):
                redis_server.call("XADD", stream, f"{seq}-0", "p", str(p), "t", repr(t), "d", d)
            # The script keeps the stream's last seq beside it (a replica has both or neither).
            assert redis_server.call("HGET", f"dde:meta:{K1}", "last") == b"8"
            redis_server.call("HSET", f"dde:meta:{K1}", "last", "5")
            ahead = AppendGroup(K1, EPOCH, frames(range(9, 11)), ("live", ""), expect=8)
            fresh = AppendGroup(K2, EPOCH, frames(range(1, 3)), expect=0)
            assert await store.append(TOK_A, "gw-a", [ahead, fresh]) == [Behind(5), 2]
            assert [e.seq for e in await store.tail(K1, 0, 100)] == [1, 2, 3, 4, 5]
            again = AppendGroup(K1, EPOCH, frames(range(6, 11)), expect=5)
            assert await store.append(TOK_A, "gw-a", [again]) == [10]
            assert [e.seq for e in await store.tail(K1, 0, 100)] == list(range(1, 11))
            redis_server.call("DEL", f"dde:stream:{K2}", f"dde:meta:{K2}")
            lost = AppendGroup(K2, EPOCH, frames(range(3, 4)), expect=2)
            assert await store.append(TOK_A, "gw-a", [lost]) == [Behind(0)]
            # A meta without ``last`` (written by an older version): read from the stream.
            redis_server.call("HDEL", f"dde:meta:{K1}", "last")
            older = AppendGroup(K1, EPOCH, frames(range(11, 12)), expect=12)
            assert await store.append(TOK_A, "gw-a", [older]) == [Behind(10)]
            # Fenced before behind: another holder's lease refuses whatever the stream holds.
            await store.release(TOK_A, [K2])
            await store.leases(TOK_B, 30.0, {K2: "a"})
            assert await store.append(TOK_A, "gw-a", [lost]) == ["fenced"]


async def test_append_trims_the_stream_to_about_maxlen(redis_server: RedisServer) -> None:
    with trio.fail_after(30):
        async with store_of(redis_server, stream_maxlen=100) as store:
            await store.leases(TOK_A, 30.0, {K1: "a"})
            for start in range(1, 1001, 100):
                group = AppendGroup(K1, EPOCH, frames(range(start, start + 100)))
                assert await store.append(TOK_A, "gw-a", [group]) == [start + 99]
            n = xlen(redis_server, K1)
            assert 100 <= n <= 300, n  # MAXLEN ~: whole nodes, never below maxlen
            first = await store.first_seq(K1)
            assert first == 1001 - n  # the oldest went; what is left is contiguous
            assert (await store.takeover(K1)).seq == 1000


# -- takeover, metas --------------------------------------------------------------------------


async def test_takeover_of_nothing_and_after_appends(redis_server: RedisServer) -> None:
    with trio.fail_after(20):
        async with store_of(redis_server) as store:
            none = await store.takeover(K1)
            assert (none.epoch, none.seq, none.position, none.received_at) == (None, 0, None, None)
            await store.leases(TOK_A, 30.0, {K1: "a", K2: "a"})
            await store.append(TOK_A, "gw-a", [AppendGroup(K1, EPOCH, frames(range(1, 4)))])
            info = await store.takeover(K1)
            assert (info.epoch, info.seq, info.position, info.received_at) == (EPOCH, 3, 1003, 4.5)
            # The last entries have no vendor position (unnumbered packets): the last that had
            # one, with its receive time, is where a new owner resumes; seq is the last entry's.
            unnumbered = AppendGroup(K1, EPOCH, frames(range(4, 7), position=False))
            assert await store.append(TOK_A, "gw-a", [unnumbered]) == [6]
            info = await store.takeover(K1)
            assert (info.epoch, info.seq, info.position, info.received_at) == (EPOCH, 6, 1003, 4.5)
            # A stream that never had a position.
            only = AppendGroup(K2, EPOCH, frames(range(1, 3), position=False))
            await store.append(TOK_A, "gw-a", [only])
            info = await store.takeover(K2)
            assert (info.epoch, info.seq, info.position, info.received_at) == (EPOCH, 2, None, None)


async def test_metas_of_known_and_unknown_fixtures(redis_server: RedisServer) -> None:
    with trio.fail_after(20):
        async with store_of(redis_server) as store:
            assert await store.metas([]) == {}
            await store.leases(TOK_A, 30.0, {K1: "a"})
            await store.append(TOK_A, "gw-a", [AppendGroup(K1, EPOCH, [], ("live", "fine"))])
            assert await store.metas([K1, K2]) == {
                K1: Meta(EPOCH, "live", "fine", "gw-a", first_seq=0, last_seq=0),
                K2: Meta(None, None, None, None, first_seq=0, last_seq=0),
            }
            # The stream's first and last seqs come with it (what a relay's archive reads).
            await store.append(TOK_A, "gw-a", [AppendGroup(K1, EPOCH, frames(range(5, 9)))])
            assert (await store.metas([K1]))[K1] == Meta(
                EPOCH, "live", "fine", "gw-a", first_seq=5, last_seq=8
            )


# -- reads ------------------------------------------------------------------------------------


async def test_read_across_streams_and_its_shape(redis_server: RedisServer) -> None:
    with trio.fail_after(20):
        async with store_of(redis_server) as store:
            assert await store.read({}, block=5.0) == []  # nothing to read: no request at all
            await store.leases(TOK_A, 30.0, {K1: "a", K2: "a"})
            await store.append(
                TOK_A,
                "gw-a",
                [
                    AppendGroup(K1, EPOCH, frames(range(1, 4))),
                    AppendGroup(K2, EPOCH, frames(range(1, 3), position=False)),
                ],
            )
            got = dict(await store.read({K1: 1, K2: 0, "tracking/none": 0}, block=0.1))
            assert set(got) == {K1, K2}  # only the streams that had entries
            assert got[K1] == [
                Entry(seq=2, position=1002, received_at=3.5, data=b'{"ix":2}'),
                Entry(seq=3, position=1003, received_at=4.5, data=b'{"ix":3}'),
            ]
            assert [(e.seq, e.position) for e in got[K2]] == [(1, None), (2, None)]
            # count bounds one read (all streams together as far as Redis goes per stream).
            limited = dict(await store.read({K1: 0}, block=0.1, count=2))
            assert [e.seq for e in limited[K1]] == [1, 2]
            # Nothing new: the block expires and the read returns [].
            t0 = trio.current_time()
            assert await store.read({K1: 3, K2: 2}, block=0.2) == []
            assert trio.current_time() - t0 >= 0.15
        # A read blocks for at most half of redis_timeout, so its reply comes within it.
        async with store_of(redis_server, redis_timeout=0.4) as store:
            t0 = trio.current_time()
            assert await store.read({K1: 3}, block=30.0) == []
            assert 0.15 <= trio.current_time() - t0 < 0.4


async def test_a_blocking_read_wakes_on_an_append(redis_server: RedisServer) -> None:
    with trio.fail_after(20):
        async with store_of(redis_server) as store, trio.open_nursery() as nursery:
            await store.leases(TOK_A, 30.0, {K2: "a"})
            got: list[tuple[str, list[Entry]]] = []

            async def reader() -> None:
                got.extend(await store.read({K1: 0, K2: 0}, block=5.0))

            nursery.start_soon(reader)
            await eventually(lambda: _blocked(redis_server))
            t0 = trio.current_time()
            await store.append(TOK_A, "gw-a", [AppendGroup(K2, EPOCH, frames(range(1, 2)))])
        assert [(k, [e.seq for e in es]) for k, es in got] == [(K2, [1])]
        assert trio.current_time() - t0 < 4.0  # woken, not the block expiring


async def _blocked(server: RedisServer) -> bool:
    info = server.call("INFO", "clients")
    assert isinstance(info, bytes)
    return b"blocked_clients:0\r\n" not in info


async def test_tail_and_first_seq(redis_server: RedisServer) -> None:
    with trio.fail_after(20):
        async with store_of(redis_server) as store:
            assert await store.tail(K1, 0, 10) == [] and await store.first_seq(K1) == 0
            await store.leases(TOK_A, 30.0, {K1: "a"})
            await store.append(TOK_A, "gw-a", [AppendGroup(K1, EPOCH, frames(range(1, 11)))])
            assert [e.seq for e in await store.tail(K1, 0, 3)] == [1, 2, 3]
            assert [e.seq for e in await store.tail(K1, 7, 100)] == [8, 9, 10]
            assert await store.tail(K1, 10, 100) == []
            assert (await store.tail(K1, 4, 1))[0] == Entry(5, 1005, 6.5, b'{"ix":5}')
            assert await store.first_seq(K1) == 1


# -- shared sets, connect slots, heartbeats ----------------------------------------------------


async def test_demand_set_is_cluster_wide_and_expires(redis_server: RedisServer) -> None:
    with trio.fail_after(20):
        async with store_of(redis_server) as a, store_of(redis_server) as b:
            assert await a.demand("actions", ["x1"], 0.3) == {"x1"}
            assert await b.demand("actions", ["y1", "y2"], 30.0) == {"x1", "y1", "y2"}
            assert await b.demand("tracking", [], 30.0) == set()  # per feed

            async def x_gone() -> bool:
                return await b.demand("actions", [], 30.0) == {"y1", "y2"}

            # a stopped refreshing (its instance died): its fixtures leave the set by themselves.
            await eventually(x_gone, timeout=5.0)


async def test_api_fixtures_set(redis_server: RedisServer) -> None:
    with trio.fail_after(20):
        async with store_of(redis_server) as a, store_of(redis_server) as b:
            assert await a.api_fixtures({}, []) == {}
            assert await a.api_fixtures({K1: 3, K2: 0}, []) == {K1: 3, K2: 0}
            assert await b.api_fixtures({"actions/x": -1}, [K1]) == {K2: 0, "actions/x": -1}
            assert await a.api_fixtures({}, ["tracking/never"]) == {K2: 0, "actions/x": -1}
            assert await a.api_fixtures({K2: 7}, []) == {K2: 7, "actions/x": -1}


async def test_connect_slots_are_spaced_cluster_wide(redis_server: RedisServer) -> None:
    """Reservations from two instances, back to back: each returned delay is its slot minus
    Redis's time of the call, and successive slots are at least ``1 / rate`` apart."""
    rate = 1.0  # slots a second apart: the requests, a few ms each, are always faster
    spacing_ms = 1000.0 / rate
    with trio.fail_after(30):
        async with store_of(redis_server) as a, store_of(redis_server) as b:
            slots: list[float] = []
            delays: list[float] = []
            for i in range(8):
                before = _redis_ms(redis_server)
                delay = await (a if i % 2 else b).reserve_connect(rate)
                after = _redis_ms(redis_server)
                nxt = redis_server.call("GET", "dde:connect")
                assert isinstance(nxt, bytes)
                slot = float(nxt) - spacing_ms  # the script keeps slot + spacing
                # The delay returned is the wait from Redis's time of the call to the slot.
                assert before - 1.0 <= slot - delay * 1000 <= after + 1.0
                slots.append(slot)
                delays.append(delay)
            assert delays[0] == 0.0  # nothing reserved before: at once
            assert all(d > 0 for d in delays[1:])  # back to back: each waits for its slot
            gaps = [b - a for a, b in itertools.pairwise(slots)]
            assert all(g >= spacing_ms - 0.002 for g in gaps), gaps  # .3f rounding only
            # Taken one after the other, faster than the rate: exactly one spacing apart.
            assert all(g <= spacing_ms + 0.002 for g in gaps), gaps


def _redis_ms(server: RedisServer) -> float:
    t = server.call("TIME")
    assert isinstance(t, list)
    sec, usec = t
    assert isinstance(sec, bytes) and isinstance(usec, bytes)
    return int(sec) * 1000 + int(usec) / 1000


async def test_heartbeat_live_set_and_expiry(redis_server: RedisServer) -> None:
    with trio.fail_after(20):
        async with store_of(redis_server) as store:
            assert await store.heartbeat("gw-a", 0.3, '{"v":"a"}') == {"gw-a": '{"v":"a"}'}
            assert await store.heartbeat("gw-b", 30.0, "b") == {"gw-a": '{"v":"a"}', "gw-b": "b"}

            async def a_gone() -> bool:
                return await store.heartbeat("gw-b", 30.0, "b2") == {"gw-b": "b2"}

            await eventually(a_gone, timeout=5.0)
            assert redis_server.call("HGET", "dde:instance-info", "gw-a") is None
            await store.heartbeat("gw-c", 30.0, "c")
            await store.leave("gw-b")
            assert await store.heartbeat("gw-c", 30.0, "c") == {"gw-c": "c"}
            assert redis_server.call("HGET", "dde:instance-info", "gw-b") is None


async def test_key_prefix_separates_clusters(redis_server: RedisServer) -> None:
    with trio.fail_after(20):
        async with (
            store_of(redis_server) as one,
            store_of(redis_server, key_prefix="other") as two,
        ):
            await one.leases(TOK_A, 30.0, {K1: "a"})
            assert await two.leases(TOK_B, 30.0, {K1: "a"}) == {K1: TOK_B}
            assert redis_server.call("GET", f"other:lease:{K1}") == TOK_B.encode()


# -- the pool: blocking reads cancelled, timed out, cut by a restart ---------------------------


def small_pool(server: RedisServer, **extra: Any) -> ClusterSection:
    """A store whose pool has 2 connections (a query option of the unix URL reaches it)."""
    return ClusterSection(redis_url=f"unix://{server.unix_socket}?db=0&max_connections=2", **extra)


async def test_cancelled_and_timed_out_reads_keep_the_pool_usable(
    redis_server: RedisServer,
) -> None:
    """coredis 6.9 loses a pool slot for each blocking read that ends early; the store's pool
    gives it back. With 2 slots, 3 cancelled reads, 3 timed-out reads and 3 cancelled
    pipelines later every command still gets a connection (each would otherwise fail with a
    pool timeout, ``redis_timeout``)."""
    with trio.fail_after(60):
        async with open_store(small_pool(redis_server, redis_timeout=0.4)) as store:
            pool = store._client.connection_pool
            assert pool.max_connections == 2
            await store.ping()
            for _ in range(3):
                with trio.move_on_after(0.05) as scope:
                    await store.read({K1: 0}, block=5.0)  # blocks 0.2 s: half the timeout
                assert scope.cancelled_caught
            await store.ping()
            # No reply within redis_timeout (a hung server): timed out.
            redis_server.pause()
            try:
                for _ in range(3):
                    with pytest.raises(RedisUnavailable):
                        await store.read({K1: 0}, block=5.0)
            finally:
                redis_server.resume()
            await store.ping()
            # Pipelines (the API set) take a connection of their own too.
            redis_server.pause()
            try:
                for _ in range(3):
                    with trio.move_on_after(0.05), suppress(RedisUnavailable):
                        await store.api_fixtures({K1: 0}, [])
            finally:
                redis_server.resume()
            await _all_work(store)
            assert len(pool._available_connections) == 2


async def test_redis_restarts_under_a_blocking_read(redis_server: RedisServer) -> None:
    with trio.fail_after(60):
        async with open_store(small_pool(redis_server, redis_timeout=5.0)) as store:

            async def reader(failed: list[str]) -> None:
                try:
                    await store.read({K1: 0}, block=2.5)
                except RedisUnavailable as exc:
                    failed.append(str(exc))

            for _ in range(3):
                failed: list[str] = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(reader, failed)
                    await eventually(lambda: _blocked(redis_server))
                    await redis_server.arestart(keep_data=False)
                assert failed, "the read should have failed when redis went away"
                await store.ping()
            await _all_work(store)
            assert len(store._client.connection_pool._available_connections) == 2


async def _all_work(store: RedisStore) -> None:
    """Every kind of request succeeds (scripts reload themselves after a restart)."""
    await store.ping()
    assert await store.leases(TOK_A, 30.0, {K1: "a"}) == {K1: TOK_A}
    assert await store.append(TOK_A, "gw-a", [AppendGroup(K1, EPOCH, frames(range(1, 3)))])
    assert [e.seq for _, es in await store.read({K1: 0}, block=0.1) for e in es] == [1, 2]
    assert await store.api_fixtures({K2: 0}, [])
    assert await store.release(TOK_A, [K1]) == 1


# -- Redis down, hung, or refusing: RedisUnavailable only, quickly, no password -----------------

CALLS: dict[str, Callable[[RedisStore], Awaitable[object]]] = {
    "ping": lambda s: s.ping(),
    "heartbeat": lambda s: s.heartbeat("gw-a", 5.0, "{}"),
    "leave": lambda s: s.leave("gw-a"),
    "leases": lambda s: s.leases(TOK_A, 5.0, {K1: "a"}),
    "release": lambda s: s.release(TOK_A, [K1]),
    "append": lambda s: s.append(TOK_A, "gw-a", [AppendGroup(K1, EPOCH, frames(range(1, 2)))]),
    "takeover": lambda s: s.takeover(K1),
    "metas": lambda s: s.metas([K1]),
    "demand": lambda s: s.demand("actions", ["x"], 5.0),
    "api_fixtures": lambda s: s.api_fixtures({K1: 0}, []),
    "reserve_connect": lambda s: s.reserve_connect(2.0),
    "read": lambda s: s.read({K1: 0}, block=0.1),
    "tail": lambda s: s.tail(K1, 0, 10),
    "first_seq": lambda s: s.first_seq(K1),
}


async def _each_fails(store: RedisStore, bound: float) -> dict[str, RedisUnavailable]:
    """Run every method at once; each must raise RedisUnavailable within *bound* seconds."""
    errors: dict[str, RedisUnavailable] = {}
    took: dict[str, float] = {}

    async def one(name: str, call: Callable[[RedisStore], Awaitable[object]]) -> None:
        t0 = time.monotonic()
        with pytest.raises(RedisUnavailable) as info:
            await call(store)
        took[name] = time.monotonic() - t0
        errors[name] = info.value

    async with trio.open_nursery() as nursery:
        for name, call in CALLS.items():
            nursery.start_soon(one, name, call)
    assert set(errors) == set(CALLS)
    slow = {name: round(t, 2) for name, t in took.items() if t > bound}
    assert not slow, f"slower than {bound} s: {slow}"
    return errors


def _everything_said(exc: BaseException) -> str:
    """The error as a log line with its traceback would show it, plus every chained error."""
    out = ["".join(traceback.format_exception(exc))]
    seen: BaseException | None = exc
    while seen is not None:
        out += [str(seen), repr(seen), repr(seen.args)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(out)


async def test_every_method_fails_as_unavailable_when_nothing_listens(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(30):
        async with store_of(redis_server, redis_timeout=1.0) as store:
            await store.ping()  # connected once: the pool holds a live connection
            await redis_server.astop()
            errors = await _each_fails(store, bound=1.0)
            assert {str(e) for e in errors.values()} == {"redis unreachable: Connection refused"}
            await redis_server.arestart(keep_data=False)
            await _all_work(store)


async def test_every_method_fails_within_the_timeout_while_redis_hangs(
    redis_server: RedisServer,
) -> None:
    """A hung server (SIGSTOP): each request fails within ``redis_timeout`` (the relay's read
    too: it blocks for at most half of it), and all work again once it answers."""
    timeout = 1.0
    with trio.fail_after(30):
        async with store_of(redis_server, redis_timeout=timeout) as store:
            await store.ping()
            redis_server.pause()
            try:
                errors = await _each_fails(store, bound=timeout + 0.5)
            finally:
                redis_server.resume()
            # Told by the error's type only: no address (shown by /readyz), no coredis text. A
            # request that needed a new connection gave up waiting for it (set-up cancelled).
            assert {str(e) for e in errors.values()} <= {
                "redis timed out",
                "redis unavailable: ConnectionError",
            }
            await _all_work(store)


async def test_a_request_on_a_hung_redis_waits_for_one_reply_only(
    redis_server: RedisServer,
) -> None:
    """On a connection that was set up before Redis hung, each request gives up after one
    reply timeout: the API set too (a MULTI/EXEC pipeline would wait for MULTI, then EXEC)."""
    timeout = 0.5
    with trio.fail_after(30):
        async with store_of(redis_server, redis_timeout=timeout) as store:
            await store.api_fixtures({K1: 0}, [])  # its connection is set up, and back in the pool
            await store.ping()
            redis_server.pause()
            try:
                for call in (CALLS["api_fixtures"], CALLS["ping"], CALLS["leases"]):
                    t0 = time.monotonic()
                    with pytest.raises(RedisUnavailable):
                        await call(store)
                    assert time.monotonic() - t0 < timeout + 0.5
            finally:
                redis_server.resume()
            await _all_work(store)


async def test_the_password_is_never_in_an_error(
    redis_factory: Callable[..., RedisServer],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "pw-7f3a9c1e-top-secret"
    server = redis_factory(password=secret)
    right = tmp_path / "right"
    right.write_text(secret + "\n")
    wrong = tmp_path / "wrong"
    wrong_secret = "pw-0b1d2e3f-also-secret"
    wrong.write_text(wrong_secret)
    said: list[str] = []
    with trio.fail_after(30):
        async with store_of(server, password_file=wrong, redis_timeout=1.0) as store:
            errors = await _each_fails(store, bound=1.0)
            assert {str(e) for e in errors.values()} == {"redis refused the credentials"}
            said += map(_everything_said, errors.values())
        async with store_of(server, password_file=right, redis_timeout=1.0) as store:
            await _all_work(store)  # the right password, read from its file, works
            await server.astop()
            said += map(_everything_said, (await _each_fails(store, bound=1.0)).values())
    # No password: refused too (the server needs one), as unavailable.
    await server.arestart(keep_data=False)
    async with store_of(server, redis_timeout=1.0) as store:
        with pytest.raises(RedisUnavailable, match="credentials") as info:
            await store.ping()
        said.append(_everything_said(info.value))
    text = "\n".join(said) + caplog.text
    assert secret not in text and wrong_secret not in text
    assert "pw-" not in text


# -- Redis through Sentinel ----------------------------------------------------------------


@pytest.mark.slow
async def test_through_sentinel_every_failover_is_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``sentinels`` + ``sentinel_master``: the store works on the primary the sentinels name.
    A hung sentinel costs only its share of ``redis_timeout``. A switchover (``SENTINEL
    FAILOVER``: the primary demoted while the pool holds connections to it) and a kill -9 of
    the primary are followed without reopening the store; meanwhile every method fails as
    RedisUnavailable within ``redis_timeout`` (+ slack), its reason (shown by ``/readyz``)
    naming no address; with every sentinel gone the reason says so. The servers need a
    password (read from its file): it appears in no error, traceback or log line."""
    require_redis()
    caplog.set_level(logging.DEBUG)
    secret = "pw-5e1f0a7b-sentinel-secret"
    password_file = tmp_path / "redis-password"
    password_file.write_text(secret + "\n")
    with SentinelGroup(password=secret) as group:
        await _through_sentinel(group, password_file, secret, caplog)
    assert secret not in caplog.text


async def _through_sentinel(
    group: SentinelGroup, password_file: Path, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    timeout = 1.0
    config = ClusterSection(
        sentinels=tuple(ListenAddress.parse(a) for a in group.addresses),
        sentinel_master=group.MASTER,
        redis_timeout=timeout,
        password_file=password_file,
    )
    chains: list[str] = []
    ports = {str(s.port) for s in [*group.servers, *group.sentinels]}
    said: list[str] = []

    async def works(store: RedisStore) -> bool:
        try:
            await _all_work(store)
        except RedisUnavailable as exc:
            said.append(str(exc))
            chains.append(_everything_said(exc))
            return False
        return True

    with trio.fail_after(60):
        async with open_store(config, password=config.read_password()) as store:
            # The first sentinel asked hangs: the others are asked in time.
            group.sentinels[0].pause()
            try:
                await _all_work(store)
            finally:
                group.sentinels[0].resume()
            first = group.primary()
            # A switchover: the old primary turns replica under the pool's connections.
            group.sentinels[0].call("SENTINEL", "FAILOVER", group.MASTER)
            second = await group.await_failover(first)

            async def demoted() -> bool:
                role = first.call("ROLE")
                return isinstance(role, list) and role[0] == b"slave"

            await eventually(demoted, 15)
            await eventually(lambda: works(store), 15)
            # A crash: the new primary dies; the sentinels promote the other one again.
            await second.akill()
            errors = await _each_fails(store, bound=timeout + 1.0)
            said += map(str, errors.values())
            chains += map(_everything_said, errors.values())
            assert await group.await_failover(second) is first
            await eventually(lambda: works(store), 15)
            assert [e.seq for e in await store.tail(K1, 0, 10)] == [1, 2]
            # No sentinel answers while the primary runs: its connections cut, every new one
            # fails (the reason says why). More such failures than the pool has slots: each
            # gives its slot back (coredis 6.9 loses it), so the store works again once the
            # sentinels are back.
            for sentinel in group.sentinels:
                await sentinel.akill()
            first.call("CLIENT", "KILL", "TYPE", "normal")
            errors = await _each_fails(store, bound=3 * timeout + 1.0)
            said += map(str, errors.values())
            chains += map(_everything_said, errors.values())
            reasons = {str(e) for e in errors.values()}
            assert "redis sentinels name no primary" in reasons, reasons
            for _ in range(80):
                with pytest.raises(RedisUnavailable, match="sentinels name no primary") as info:
                    await store.ping()
                said.append(str(info.value))
                chains.append(_everything_said(info.value))
            for sentinel in group.sentinels:
                await trio.to_thread.run_sync(sentinel.start)
            await eventually(lambda: works(store), 15)
    text = "\n".join(str(e) for e in said)
    assert not any(port in text for port in ports), text
    assert chains and not any(secret in chain for chain in chains)
    assert not any(f"127.0.0.1:{port}" in caplog.text for port in ports)
