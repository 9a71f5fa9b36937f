"""A drop-in replay the gateway cannot serve itself, passed through to the vendor.

When the gateway does not hold a fixture from its start (no recorder and the history evicted,
or it joined late), the client's Replay Fixture Request goes to the vendor on a **dedicated**
upstream connection, for that client only: through the global ``ConnectLimiter`` (it counts
against the vendor connect rate like any attempt; in a cluster the limiter reserves its slot in
Redis), in its backlog queue, behind every configured fixture and reconnect; with the gateway's
own token; capped by ``[replay] max_replays`` (the caller takes the slot). Everything the
vendor then sends is relayed verbatim except its heartbeats (the drop-in sends its own; a
vendor message other than a data frame is scrubbed of the gateway's token first); nothing of it
reaches a topic, and nothing of a topic reaches it. The connection is closed when the client
goes (the caller cancels), with the connector's bounded close. The client's request is rebuilt
from the fields the gateway checked (fixture id, backfill, replay), never forwarded as sent.

The budget and slow-consumer rule are those of :func:`~gateway.replay.run_replay`: the vendor
connection is not read while the client is behind.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable

import attrs
import orjson
import trio

from gateway.config import FeedConfig, Secret, SecretError, UpstreamSection
from gateway.replay._counters import ReplayCounters
from gateway.replay._run import ReplayBacklog, ReplayLimits
from gateway.upstream import (
    ConnectLimiter,
    Connector,
    Kind,
    TokenReader,
    UpstreamClosed,
    UpstreamRejected,
    UpstreamUnavailable,
    classify_tracking,
    read_token_off_loop,
)

log = logging.getLogger("gateway.replay")

#: Vendor answers to a fixture request that mean it was not accepted.
_REFUSALS = frozenset({Kind.NOT_FOUND, Kind.ERROR, Kind.AUTH_ERROR})


class PassThroughError(Exception):
    """The vendor connection could not be set up; the message is for the client (it never
    holds the token)."""


class PassThroughEnd(enum.StrEnum):
    #: The vendor answered the request with an error or "not found" before any frame (relayed):
    #: the request was not accepted, the client may send another on its connection.
    REFUSED = "refused"
    VENDOR_CLOSED = "vendor_closed"
    SLOW_CONSUMER = "slow_consumer"
    STALLED = "stalled"  # the vendor sent nothing for ``stall_timeout``


@attrs.frozen
class ReplayRequest:
    """A checked Replay Fixture Request (what is sent to the vendor).

    Its range is the vendor's backfill range: ``backfill`` n > 0 replays the n newest frames;
    anything else (absent, null, -1, 0) the whole feed from its first frame.
    """

    fixture: str
    backfill: int | None
    packets_per_second: int
    looped: bool

    @property
    def newest(self) -> int | None:
        """n when the replay covers the n newest frames; None: from the first frame."""
        n = self.backfill
        return n if n is not None and n > 0 else None

    def text(self) -> str:
        return orjson.dumps(
            {
                "fixtureId": self.fixture,
                "backfill": -1 if self.newest is None else self.newest,
                "replay": {
                    "enabled": True,
                    "packetsPerSecond": self.packets_per_second,
                    "looped": self.looped,
                },
            }
        ).decode()


class VendorLink:
    """What a pass-through needs of the upstream side: the supervisor's connector (None while
    it is not running), its connect limiter, the current ``[upstream]`` section and the token
    reader."""

    def __init__(
        self,
        *,
        limiter: ConnectLimiter,
        connector: Callable[[], Connector | None],
        upstream: Callable[[], UpstreamSection],
        read_token: TokenReader = read_token_off_loop,
    ) -> None:
        self.limiter = limiter
        self._connector = connector
        self._upstream = upstream
        self._read_token = read_token
        #: Vendor connections opened for replays (they count against the connect rate).
        self.connects = 0

    async def pass_through(
        self,
        feed: FeedConfig,
        request: ReplayRequest,
        send: Callable[[str], Awaitable[None]],
        *,
        backlog: ReplayBacklog,
        limits: ReplayLimits,
        counters: ReplayCounters | None = None,
    ) -> PassThroughEnd:
        """Open the vendor connection, ask for the replay, relay until it ends.

        Raises :class:`PassThroughError` before anything is relayed when the vendor cannot be
        reached or refuses the gateway's token. Cancel to end it (the client went).
        """
        connect = self._connector()
        if connect is None:
            raise PassThroughError("the gateway is not connected to the vendor")
        up = self._upstream()
        try:
            token = await self._read_token(up)
        except SecretError:
            raise PassThroughError("the gateway's vendor token is unavailable") from None
        # In the limiter's backlog: a replay never delays a followed fixture's (re)connect.
        await self.limiter.acquire(backlog=True)
        self.connects += 1
        try:
            async with connect(feed.url, headers=[], connect_timeout=up.handshake_timeout) as vc:
                auth = orjson.dumps({"authToken": token.reveal()}).decode()
                await vc.send_message(auth)
                with trio.move_on_after(up.handshake_timeout) as waited:
                    while True:
                        kind = classify_tracking(await vc.get_message()).kind
                        if kind is Kind.ACCEPTED:
                            break
                        if kind is Kind.AUTH_ERROR:
                            raise PassThroughError("the vendor refused the gateway's token")
                if waited.cancelled_caught:
                    raise PassThroughError("the vendor did not answer in time")
                await vc.send_message(request.text())
                return await _relay(
                    vc.get_message,
                    send,
                    token=token,
                    backlog=backlog,
                    limits=limits,
                    up=up,
                    counters=counters,
                )
        except UpstreamClosed:
            return PassThroughEnd.VENDOR_CLOSED
        except (UpstreamRejected, UpstreamUnavailable) as exc:
            log.info("a replay's vendor connection failed: %s", exc)
            raise PassThroughError("the vendor could not be reached") from None


async def _relay(
    receive: Callable[[], Awaitable[str | bytes]],
    send: Callable[[str], Awaitable[None]],
    *,
    token: Secret,
    backlog: ReplayBacklog,
    limits: ReplayLimits,
    up: UpstreamSection,
    counters: ReplayCounters | None,
) -> PassThroughEnd:
    budget = limits.budget_bytes
    streaming = False
    while True:
        if backlog.unsent() >= budget:
            with trio.move_on_after(limits.stall_timeout):
                await backlog.wait_below(budget)
            if backlog.unsent() >= budget:
                if counters is not None:
                    counters.slow_consumers += 1
                return PassThroughEnd.SLOW_CONSUMER
        raw: str | bytes | None = None
        with trio.move_on_after(up.stall_timeout):
            raw = await receive()
        if raw is None:
            return PassThroughEnd.STALLED
        kind = classify_tracking(raw).kind
        if kind is Kind.HEARTBEAT:
            continue
        text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
        if kind is not Kind.DATA:
            text = token.scrub(text)  # a vendor message may echo the token: never relayed
        await send(text)
        if kind is Kind.DATA:
            streaming = True
        elif not streaming and kind in _REFUSALS:
            return PassThroughEnd.REFUSED
        if counters is not None and kind is Kind.DATA:
            counters.frames += 1
