"""The cluster's Redis: key names, the scripts, and the one boundary where coredis errors end.

:class:`RedisStore` is a thin async wrapper: each method is one request (a script or a
command) and returns plain Python values. Every failure of Redis itself (refused, reset,
timed out, loading, read-only, authentication) is raised as :class:`RedisUnavailable` with a
message written here from the error's type and Redis's own text (a password is never part of
either); nothing else of coredis escapes. Commands are not retried here: the callers (lease
rounds, the appender, the relay) each have their own retry rhythm, and a failure must show
quickly (within ``redis_timeout``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Final

import anyio
import attrs
import coredis
import coredis.exceptions
from coredis.commands.constants import CommandName
from coredis.connection import TCPLocation
from coredis.pool import SentinelConnectionPool
from coredis.retry import NoRetryPolicy

from gateway.cluster import _scripts
from gateway.config import ClusterSection, Secret

log = logging.getLogger("gateway.cluster")

#: Entries one relay read asks for at most, per stream.
READ_COUNT: Final = 1000


class ClusterError(Exception):
    """Base of the cluster's errors."""


class RedisUnavailable(ClusterError):
    """Redis did not answer (or answered that it cannot serve): the cluster is degraded."""


@attrs.frozen
class Keys:
    """The Redis key names of one cluster (``key_prefix``). A fixture's *key* is
    ``feed/fixture`` (a fixture id never contains ``/``)."""

    prefix: str

    def lease(self, key: str) -> str:
        return f"{self.prefix}:lease:{key}"

    def stream(self, key: str) -> str:
        return f"{self.prefix}:stream:{key}"

    def meta(self, key: str) -> str:
        return f"{self.prefix}:meta:{key}"

    @property
    def instances(self) -> str:
        return f"{self.prefix}:instances"

    @property
    def infos(self) -> str:
        return f"{self.prefix}:instance-info"

    @property
    def connect(self) -> str:
        return f"{self.prefix}:connect"

    @property
    def api(self) -> str:
        """The fixtures followed through the HTTP API, cluster-wide: key -> backfill."""
        return f"{self.prefix}:api"

    def demand(self, feed: str) -> str:
        return f"{self.prefix}:demand:{feed}"

    def handover(self, key: str) -> str:
        """A planned handover of *key* under way (gateway/cluster/_handover.py)."""
        return f"{self.prefix}:handover:{key}"


@attrs.frozen
class Takeover:
    """Where a new owner goes on: the stream's epoch and last seq, and the last vendor
    position with its receive time (None where the stream does not say)."""

    epoch: str | None
    seq: int
    position: int | None
    received_at: float | None


@attrs.frozen
class Meta:
    """What the owner writes beside a fixture's stream (epoch, its upstream state) and the
    seqs of the stream's first and last entries (0: none)."""

    epoch: str | None
    state: str | None
    detail: str | None
    owner: str | None
    first_seq: int = 0
    last_seq: int = 0


@attrs.frozen
class Entry:
    """One frame read from a stream."""

    seq: int
    position: int | None
    received_at: float
    data: bytes


@attrs.frozen
class Behind:
    """An append's reply for a fixture whose stream ends below what Redis had confirmed to
    this owner: nothing of it was written; *seq* is the stream's last seq (0: none)."""

    seq: int


@attrs.frozen
class AppendGroup:
    """One fixture's frames for an append: ``(seq, position, received_at, text)`` each.
    *expect*: the last seq Redis confirmed to this owner (0: none); a stream ending below it
    gets :class:`Behind`."""

    key: str
    epoch: str
    frames: Sequence[tuple[int, int | None, float, bytes]]
    status: tuple[str, str] | None = None
    expect: int = 0


#: What a released lease holds until it expires or is taken (free; see _scripts.RELEASE).
RELEASED: Final = "-"


def _holder(value: Any) -> str | None:
    text = _text(value)
    return None if text == RELEASED else text


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _unavailable(exc: BaseException) -> RedisUnavailable:
    """The failure, told from its type and errno-level text only (no address, no password:
    the reason is shown by the unauthenticated ``/readyz``)."""
    if isinstance(exc, coredis.exceptions.AuthenticationError):
        return RedisUnavailable("redis refused the credentials")
    # Before the cause chain: their texts name the primary's address.
    if isinstance(exc, coredis.exceptions.PrimaryNotFoundError):
        return RedisUnavailable("redis sentinels name no primary")
    if isinstance(exc, coredis.exceptions.StalePrimaryError):
        return RedisUnavailable("redis sentinels named a replica as the primary")
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and (cause.errno or cause.strerror):
            # The errno's own text: anyio's messages name the address.
            text = os.strerror(cause.errno) if cause.errno else cause.strerror
            return RedisUnavailable(f"redis unreachable: {text}")
        if isinstance(cause, TimeoutError):
            return RedisUnavailable("redis timed out")
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, coredis.exceptions.BusyLoadingError):
        return RedisUnavailable("redis is loading its data")
    if isinstance(exc, coredis.exceptions.ReadOnlyError):
        return RedisUnavailable("redis is read-only (a replica)")
    if isinstance(exc, coredis.exceptions.ConnectionError) and "lost" in str(exc).lower():
        return RedisUnavailable("redis connection lost")
    return RedisUnavailable(f"redis unavailable: {type(exc).__name__}")


def _refused(exc: BaseException) -> RedisUnavailable:
    """Redis refused to run a request (out of memory, MISCONF, BUSY, ...): it cannot serve now,
    as when it is not there; told by its error code only."""
    # Redis's error code (its first word, e.g. OOM, MISCONF, BUSY, NOSCRIPT): never a value.
    code = str(exc).split(" ", 1)[0].strip()
    code = code if code.isalpha() and code.isupper() else type(exc).__name__
    return RedisUnavailable(f"redis refused the request: {code}")


#: What counts as "Redis is not there" (everything else is a bug and propagates).
_DOWN: Final = (
    coredis.exceptions.ConnectionError,
    coredis.exceptions.AuthenticationError,
    coredis.exceptions.ReadOnlyError,
    coredis.exceptions.BusyLoadingError,
    # No primary known to the sentinels, or the one named is not a primary (any more).
    coredis.exceptions.SentinelError,
    TimeoutError,
    OSError,
    # A connection whose background task ended (Redis went away mid-request, or shutdown).
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    anyio.EndOfStream,
)


@contextmanager
def _boundary() -> Iterator[None]:
    """Where coredis's errors end: Redis not there (:data:`_DOWN`) or refusing to serve
    (an error reply) leaves as :class:`RedisUnavailable`; anything else is a bug and goes on."""
    try:
        yield
    except _DOWN as exc:
        raise _unavailable(exc) from None
    except coredis.exceptions.ResponseError as exc:
        raise _refused(exc) from None


class RedisStore:
    """One Redis connection pool and the cluster's requests on it. Open with :func:`open_store`."""

    def __init__(self, client: coredis.Redis[bytes], config: ClusterSection) -> None:
        self._client = client
        self.keys = Keys(config.key_prefix)
        self._maxlen = config.stream_maxlen
        #: Stream names (encoded) by fixture key and back, for the relay's reads.
        self._stream_names: dict[str, bytes] = {}
        self._stream_keys: dict[bytes, str] = {}
        self._ttl_ms = int(config.lease_ttl * 1000)
        self._timeout = config.redis_timeout
        self._leases = client.register_script(_scripts.LEASES)
        self._release = client.register_script(_scripts.RELEASE)
        self._append = client.register_script(_scripts.APPEND)
        self._takeover = client.register_script(_scripts.TAKEOVER)
        self._metas = client.register_script(_scripts.METAS)
        self._heartbeat = client.register_script(_scripts.HEARTBEAT)
        self._leave = client.register_script(_scripts.LEAVE)
        self._connect = client.register_script(_scripts.CONNECT)
        self._demand = client.register_script(_scripts.DEMAND)
        self._offer = client.register_script(_scripts.OFFER)
        self._swap = client.register_script(_scripts.SWAP)
        self._transfer = client.register_script(_scripts.TRANSFER)
        self._handovers = client.register_script(_scripts.HANDOVERS)

    async def _call(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        with _boundary():
            return await script(keys=list(keys), args=list(args))

    async def ping(self) -> None:
        with _boundary():
            await self._client.ping()

    async def heartbeat(self, instance: str, ttl: float, info: str) -> dict[str, str]:
        """Renew *instance*'s heartbeat; the live instances and their info strings."""
        k = self.keys
        rows = await self._call(
            self._heartbeat, [k.instances, k.infos], [instance, int(ttl * 1000), info]
        )
        return {_text(name) or "": _text(value) or "" for name, value in rows}

    async def leave(self, instance: str) -> None:
        k = self.keys
        await self._call(self._leave, [k.instances, k.infos], [instance])

    async def leases(
        self, token: str, ttl: float, modes: Mapping[str, str]
    ) -> dict[str, str | None]:
        """One lease round: *modes* maps keys to ``a``/``r``/``-`` (see the script); returns
        each key's holder token afterwards."""
        if not modes:
            return {}
        keys = list(modes)
        out = await self._call(
            self._leases,
            [self.keys.lease(key) for key in keys],
            [token, int(ttl * 1000), *(modes[key] for key in keys)],
        )
        return {key: _holder(holder) for key, holder in zip(keys, out, strict=True)}

    async def release(self, token: str, keys: Iterable[str]) -> int:
        names = [self.keys.lease(key) for key in keys]
        if not names:
            return 0
        return int(await self._call(self._release, names, [token, self._ttl_ms]))

    async def append(
        self, token: str, instance: str, groups: Sequence[AppendGroup]
    ) -> list[int | str | Behind]:
        """Append each group's frames if its lease is *token*'s; per group the last seq written
        (0: none), ``"fenced"``, ``"epoch"`` or :class:`Behind` (see :data:`_scripts.APPEND`)."""
        keys: list[str] = []
        args: list[Any] = [token, self._maxlen, instance, self._ttl_ms]
        for g in groups:
            keys += [self.keys.lease(g.key), self.keys.stream(g.key), self.keys.meta(g.key)]
            state, detail = g.status if g.status is not None else ("", "")
            args += [g.epoch, state, detail, g.expect, len(g.frames)]
            for seq, position, received_at, data in g.frames:
                args += [seq, "" if position is None else position, repr(received_at), data]
        out = await self._call(self._append, keys, args)
        return [r if isinstance(r, int) else _append_result(_text(r) or "") for r in out]

    async def takeover(self, key: str) -> Takeover:
        k = self.keys
        epoch, seq, p, t, *_ = await self._call(self._takeover, [k.meta(key), k.stream(key)], [])
        return Takeover(
            epoch=_text(epoch),
            seq=int(_text(seq) or 0),
            position=None if p is None else int(_text(p) or 0),
            received_at=None if t is None else float(_text(t) or 0),
        )

    async def metas(self, keys: Sequence[str]) -> dict[str, Meta]:
        if not keys:
            return {}
        names = [name for key in keys for name in (self.keys.meta(key), self.keys.stream(key))]
        rows = await self._call(self._metas, names, [])
        out: dict[str, Meta] = {}
        for key, row in zip(keys, rows, strict=True):
            epoch, state, detail, owner, first, last = (_text(v) for v in row)
            out[key] = Meta(epoch, state, detail, owner, int(first or 0), int(last or 0))
        return out

    async def demand(self, feed: str, fixtures: Iterable[str], ttl: float) -> set[str]:
        """Refresh this instance's on-demand *fixtures* of *feed*; all of the cluster's."""
        out = await self._call(self._demand, [self.keys.demand(feed)], [int(ttl * 1000), *fixtures])
        return {_text(name) or "" for name in out}

    async def api_fixtures(self, add: Mapping[str, int], remove: Iterable[str]) -> dict[str, int]:
        """Apply this instance's API changes (key -> backfill; keys removed) to the cluster's
        set, then return the whole set."""
        with _boundary():
            async with self._client.pipeline(transaction=False) as pipe:
                if add:
                    pipe.hset(self.keys.api, {k: str(v) for k, v in add.items()})
                removed = list(remove)
                if removed:
                    pipe.hdel(self.keys.api, removed)
                result = pipe.hgetall(self.keys.api)
            mapping = await result
        return {_text(k) or "": int(_text(v) or 0) for k, v in mapping.items()}

    async def retain(self, keys: Sequence[str], seconds: float) -> None:
        """Keep each key's stream and meta for *seconds* more (their owner renews this every
        round: once nobody owns a fixture, its keys expire)."""
        if not keys:
            return
        ms = int(seconds * 1000)
        with _boundary():
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.pexpire(self.keys.stream(key), ms)
                    pipe.pexpire(self.keys.meta(key), ms)

    async def reserve_connect(self, rate: float) -> float:
        """Reserve the next cluster-wide connect slot; seconds to wait for it."""
        ms = await self._call(self._connect, [self.keys.connect], [f"{1000.0 / rate:.3f}"])
        return max(0.0, float(_text(ms) or 0) / 1000.0)

    async def read(
        self, after: Mapping[str, int], *, block: float, count: int = READ_COUNT
    ) -> list[tuple[str, list[Entry]]]:
        """Entries after the given seq of each key's stream, waiting up to *block* seconds for
        the first; ``[]`` when none came. The block is at most half of ``redis_timeout``,
        which bounds every reply, this one's too.

        The relay's hot path (one call per read of every relayed stream): the request is
        built from cached stream names and goes out as a plain ``XREAD`` (coredis's ``xread``
        wraps every name in a key object and every entry of the reply in an ordered dict),
        and the reply is parsed here (:func:`_row_entry`)."""
        if not after:
            return []
        block = min(block, self._timeout / 2)
        names = self._stream_names
        args: list[Any] = [b"COUNT", count, b"BLOCK", max(1, int(block * 1000)), b"STREAMS"]
        ids: list[bytes] = []
        for key, seq in after.items():
            name = names.get(key)
            if name is None:
                name = names[key] = self.keys.stream(key).encode()
                self._stream_keys[name] = key
            args.append(name)
            ids.append(b"%d-0" % seq)
        args += ids
        with _boundary():
            reply = await self._client.create_request(CommandName.XREAD, *args, callback=_raw)
        if not reply:
            return []
        cut = len(self.keys.stream(""))
        out: list[tuple[str, list[Entry]]] = []
        for name, rows in reply.items():
            fixture = self._stream_keys.get(name)
            if fixture is None:
                fixture = (_text(name) or "")[cut:]
            out.append((fixture, [_row_entry(row) for row in rows]))
        return out

    async def offer(
        self, token: str, offers: Mapping[str, str], seconds: float
    ) -> dict[str, str | None]:
        """Write each ``key -> offer value`` whose lease *token* holds, for *seconds* (an
        answer already there is kept); each key's handover value now."""
        if not offers:
            return {}
        keys = list(offers)
        names: list[str] = []
        for key in keys:
            names += [self.keys.lease(key), self.keys.handover(key)]
        out = await self._call(
            self._offer, names, [token, int(seconds * 1000), *(offers[key] for key in keys)]
        )
        return {key: _text(value) for key, value in zip(keys, out, strict=True)}

    async def swap_handover(self, keys: Iterable[str], old: str, new: str | None) -> int:
        """Each handover key of *keys* holding *old* gets *new* (None: deleted); how many."""
        names = [self.keys.handover(key) for key in keys]
        if not names:
            return 0
        args = [old, new or "", "-" if new is None else "="]
        return int(await self._call(self._swap, names, args))

    async def transfer(self, token: str, key: str, successor: str) -> bool:
        """Hand *key*'s lease from *token* to *successor* (a token), if the successor said it
        is in step; True if it did."""
        k = self.keys
        args = [token, successor, self._ttl_ms]
        return bool(await self._call(self._transfer, [k.lease(key), k.handover(key)], args))

    async def handovers(self, keys: Sequence[str]) -> dict[str, str | None]:
        """The handover value of each key (None: no handover under way)."""
        if not keys:
            return {}
        out = await self._call(self._handovers, [self.keys.handover(key) for key in keys], [])
        return {key: _text(value) for key, value in zip(keys, out, strict=True)}

    async def tail(self, key: str, after: int, count: int) -> list[Entry]:
        """Up to *count* entries after seq *after* (no waiting)."""
        with _boundary():
            entries = await self._client.xrange(
                self.keys.stream(key), start=f"({after}-0", end="+", count=count
            )
        return [_entry(e) for e in entries]

    async def first_seq(self, key: str) -> int:
        """The oldest seq the stream still holds (0: none)."""
        with _boundary():
            entries = await self._client.xrange(self.keys.stream(key), count=1)
        return _entry(entries[0]).seq if entries else 0


def _append_result(text: str) -> str | Behind:
    word, _, seq = text.partition(":")
    return Behind(int(seq)) if word == "behind" else text


def _raw(reply: Any) -> Any:
    """A request's reply as the RESP3 parser gives it (no coredis transformation)."""
    return reply


#: The fields of an entry, in the order the APPEND script writes them.
_FIELDS: Final = (b"p", b"t", b"d")


def _row_entry(row: Any) -> Entry:
    """One entry of a raw ``XREAD`` reply: ``[id, [field, value, ...]]``."""
    ident, flat = row[0], row[1]
    if len(flat) == 6 and (flat[0], flat[2], flat[4]) == _FIELDS:
        p, t, d = flat[1], flat[3], flat[5]
    else:  # written otherwise (by hand, another version): by name
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        p, t, d = fields.get(b"p", b""), fields.get(b"t", b"0"), fields.get(b"d", b"")
    return Entry(
        seq=int(ident.partition(b"-")[0]),
        position=int(p) if p else None,
        received_at=float(t or 0),
        data=d,
    )


def _entry(e: Any) -> Entry:
    ident = _text(e.identifier) or "0-0"
    fields = e.field_values
    p = fields.get(b"p", b"")
    return Entry(
        seq=int(ident.split("-", 1)[0]),
        position=int(p) if p else None,
        received_at=float(fields.get(b"t", b"0") or 0),
        data=fields.get(b"d", b""),
    )


class _SlotKeeping:
    """coredis's pool, with a leak fixed: a connection discarded while leased (a blocking
    ``XREAD`` or a pipeline cancelled, timed out, or cut by a Redis restart) gives its slot
    back. In coredis 6.9 the slot is lost instead, and after ``max_connections`` such events
    every command waits for a slot that never comes (tests/test_cluster_store.py shows both).
    """

    _available_connections: Any

    def release(self, connection: Any) -> None:
        super().release(connection)  # type: ignore[misc]
        if not connection.usable:
            self._available_connections.put_nowait(None)


class _SlotKeepingPool(_SlotKeeping, coredis.ConnectionPool[Any]):
    """A plain Redis's pool (``redis_url``), and each sentinel's."""


class _SentinelPool(_SlotKeeping, SentinelConnectionPool):
    """The pool of the primary the sentinels name: every new connection asks them where the
    primary is (and checks its ``ROLE``), so connections made after a failover go to the
    promoted replica.

    One more leak of coredis 6.9 fixed here: a connection that could not be made (no
    primary known, the one named is a replica now, or the wait for it ran out) gives its
    slot back too. (A primary demoted by the sentinels closes its clients' connections
    itself: the next ones ask the sentinels again.)
    """

    async def _construct_connection(self) -> Any:
        try:
            return await super()._construct_connection()
        except BaseException:
            self._available_connections.put_nowait(None)
            raise


def _connection_args(config: ClusterSection, password: Secret | None) -> dict[str, Any]:
    """What every data connection gets: every wait bounded by ``redis_timeout``."""
    timeout = config.redis_timeout
    return {
        "decode_responses": False,
        "username": config.username,
        "password": None if password is None else password.reveal(),
        "connect_timeout": timeout,
        "stream_timeout": timeout,
    }


@asynccontextmanager
async def open_store(
    config: ClusterSection, *, password: Secret | None = None
) -> AsyncIterator[RedisStore]:
    """A :class:`RedisStore` for the body; its connections close on exit.

    *password*: read beforehand (``gateway.config.load_cluster_password``). No connection is
    made yet (the first request connects, and fails as :class:`RedisUnavailable` if Redis is
    not there: the gateway starts degraded rather than not at all).

    Redis is ``redis_url``, or the primary the ``sentinels`` name for ``sentinel_master``
    (asked again for every new connection: after a failover the next connections go to the
    promoted replica; the sentinels are asked without a password, in turn, each for at most
    ``redis_timeout / (len(sentinels) + 1)``).

    Every wait is bounded by ``redis_timeout``: connecting (asking the sentinels included),
    each reply, and waiting for a free connection; coredis's own retries are off (each caller
    has its rhythm).
    """
    timeout = config.redis_timeout
    args = _connection_args(config, password)
    if config.redis_url is not None:
        pool = _SlotKeepingPool.from_url(config.redis_url, timeout=timeout, **args)
        client: coredis.Redis[bytes] = coredis.Redis(
            connection_pool=pool, retry_policy=NoRetryPolicy(), verify_version=False
        )
        async with client:
            yield RedisStore(client, config)
        return
    assert config.sentinel_master is not None  # the config requires it with sentinels
    # The sentinels are asked one after the other within the connection's redis_timeout: a
    # hung one may take only its share, so the others are still asked in time.
    ask = timeout / (len(config.sentinels) + 1)
    sentinel: coredis.Sentinel[bytes] = coredis.Sentinel(
        [TCPLocation(a.host, a.port) for a in config.sentinels],
        sentinel_kwargs={
            "connect_timeout": ask,
            "stream_timeout": ask,
            "pool_timeout": ask,
            "connection_pool_cls": _SlotKeepingPool,
        },
        retry_policy=NoRetryPolicy(),
        **args,
    )
    async with sentinel:
        client = sentinel.primary_for(
            config.sentinel_master, connection_pool_class=_SentinelPool, timeout=timeout
        )
        client.verify_version = False  # as for redis_url (primary_for has no such argument)
        async with client:
            yield RedisStore(client, config)


# coredis logs every failed connection set-up as an ERROR with a traceback; the cluster
# reports Redis failures itself (one throttled line, the degraded state and counters).
logging.getLogger("coredis").setLevel(logging.CRITICAL)
