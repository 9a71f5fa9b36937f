"""A redis-server of the test's own, for the cluster mode's tests.

:class:`RedisServer` starts ``redis-server`` (``$DDE_REDIS_SERVER``, else the one on PATH) in a
temporary directory of its own, listening on a unix socket there and on a free TCP port of
127.0.0.1 (gateways in other processes connect through :attr:`RedisServer.url`). Never the
system's service: Debian's package starts one on 6379, and the tests must not see its data.

- The TCP port: Redis cannot report a port the OS chose, so the kit picks a free one and starts
  the server on it; when the server exits because the port was taken meanwhile (its log says
  "Address already in use"), it tries another port - it never assumes the port was free.
- Ready means answering: the kit sends ``PING`` over the unix socket, then asks over TCP for
  ``INFO server`` and checks that the ``process_id`` there is the one it started. No sleep of a
  guessed length; a hard deadline (``start_timeout``, 10 s) on the whole start.
- ``persistence=True``: ``appendonly yes`` + ``appendfsync always``, so every acknowledged write
  survives :meth:`RedisServer.kill` and a restart. Otherwise no persistence at all
  (``save ''``, ``appendonly no``): a restart starts empty.
- :meth:`~RedisServer.stop` (SIGTERM, waits), :meth:`~RedisServer.kill` (SIGKILL),
  :meth:`~RedisServer.restart` on the same port (``keep_data=False`` deletes the data files
  first), :meth:`~RedisServer.pause` / :meth:`~RedisServer.resume` (SIGSTOP/SIGCONT: a server
  that accepts connections but answers nothing). The blocking ones have ``a``-prefixed async
  twins that run in a worker thread, so a gateway on the test's trio loop keeps running.
- ``DEBUG`` is enabled for local connections (``DEBUG SLEEP`` makes a slow server).
- ``replica_of=PORT``: a replica of the server on 127.0.0.1:PORT (``--replicaof``).
- :class:`SentinelServer`: ``redis-server --sentinel`` with a config file of its own (sentinel
  rewrites it); :class:`SentinelGroup` is a primary, a replica and three sentinels watching
  them with short timeouts (a kill -9 of the primary is failed over in about 1-3 s), and says
  which server is the primary now (:meth:`SentinelGroup.wait_failover` waits on the
  sentinels' answer, never on a guessed time).

:func:`redis_unavailable` says why no server can be started here; the ``redis_server`` fixture
(``tests/conftest.py``) then fails the test in CI (``CI=true``) and skips it elsewhere.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeAlias

import trio

from gateway.bench import (
    REDIS_ENV,
    RedisReplyError,
    Reply,
    free_port,
    redis_executable,
    resp_pipeline,
)

#: Longest unix socket path the kernel takes (sun_path is 108 bytes with its NUL).
_SUN_PATH_MAX: Final = 107

#: A reply of the raw client (gateway.bench's): simple and bulk strings are bytes, arrays lists.
RespValue: TypeAlias = Reply
#: An error reply (``-ERR ...``) of the raw client.
RedisError = RedisReplyError


class RedisStartError(RuntimeError):
    """The server did not start (or not in time); the message ends with its log."""


class _PortTaken(Exception):
    pass


def redis_unavailable() -> str | None:
    """Why no redis-server can be started here, or None."""
    named = os.environ.get(REDIS_ENV)
    if named and not os.access(named, os.X_OK):
        return f"{REDIS_ENV}={named} is not an executable file"
    if redis_executable() is None:
        return "no redis-server on PATH: apt-get install -y redis-server (.ci/test does it as root)"
    return None


def resp_call(
    address: Path | tuple[str, int],
    *commands: tuple[str | bytes | int, ...],
    password: str | None = None,
    timeout: float = 2.0,
) -> list[RespValue]:
    """Send *commands* on one new connection (unix socket path or (host, port)); their replies
    (:func:`gateway.bench.resp_pipeline`). An error reply raises :class:`RedisError`."""
    return resp_pipeline(address, list(commands), password=password, timeout=timeout)


def _short_tempdir() -> Path:
    """A new private directory whose unix socket path fits in sun_path."""
    base = Path(tempfile.gettempdir())
    if len(str(base)) > 60:
        base = Path("/tmp")
    return Path(tempfile.mkdtemp(prefix="dde-redis-", dir=base))


_LIVE: set[RedisServer] = set()


@atexit.register
def _kill_leftovers() -> None:
    """A test process that exits without teardown leaves no redis-server behind."""
    for server in list(_LIVE):
        server.close()


class RedisServer:
    """One redis-server process of this test, restartable on the same port."""

    def __init__(
        self,
        *,
        persistence: bool = False,
        password: str | None = None,
        executable: str | None = None,
        start_timeout: float = 10.0,
        port_attempts: int = 8,
        replica_of: int | None = None,
    ) -> None:
        if password is not None and not password.replace("-", "").isalnum():
            raise ValueError("test passwords are letters, digits and '-' (they go in URLs as is)")
        exe = executable or redis_executable()
        if exe is None:
            raise RedisStartError(redis_unavailable() or "no redis-server")
        self.executable = exe
        self.persistence = persistence
        self.password = password
        self.start_timeout = start_timeout
        self.port_attempts = port_attempts
        self.replica_of = replica_of
        self.directory = _short_tempdir()
        #: The server's working directory: its AOF / RDB files, nothing else.
        self.data_dir = self.directory / "data"
        self.data_dir.mkdir()
        self.unix_socket = self.directory / "redis.sock"
        assert len(str(self.unix_socket)) <= _SUN_PATH_MAX, self.unix_socket
        self.log_path = self.directory / "redis.log"
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        #: How many times a start found its port taken and tried another (for the kit's tests).
        self.port_retries = 0
        _LIVE.add(self)

    # -- addresses ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server was never started")
        return self._port

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:PORT/0``: what a gateway's config names."""
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """``unix://[:password@]/path/redis.sock?db=0`` (a client in this process may prefer it)."""
        auth = f":{self.password}@" if self.password is not None else ""
        return f"unix://{auth}{self.unix_socket}?db=0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def call(self, *args: str | bytes | int) -> RespValue:
        """One command over the unix socket, blocking (set-up and checks in tests)."""
        return resp_call(self.unix_socket, args, password=self.password)[0]

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> Self:
        """Start on a free port (another one if it was taken); returns once it answers."""
        if self.running:
            raise RuntimeError("already running")
        deadline = time.monotonic() + self.start_timeout
        for _ in range(self.port_attempts):
            port = free_port() if self._port is None else self._port
            try:
                self._launch(port, deadline)
            except _PortTaken:
                if self._port is not None:  # a restart must keep its port
                    raise RedisStartError(
                        f"port {port} was taken by another process while redis was down\n"
                        + self._log_tail()
                    ) from None
                self.port_retries += 1
                continue
            self._port = port
            return self
        raise RedisStartError(
            f"no free port after {self.port_attempts} attempts\n" + self._log_tail()
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (redis flushes its AOF and exits), and wait; SIGKILL if it does not exit."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            if self._paused:
                proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise RedisStartError(
                    f"redis did not exit within {timeout} s of SIGTERM (killed)"
                ) from None
        self._proc = None
        self._paused = False

    def kill(self) -> None:
        """SIGKILL, and reap: a crash, no chance to flush anything."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._proc = None
        self._paused = False

    def restart(self, *, keep_data: bool) -> None:
        """Stop (if running) and start again on the same port.

        ``keep_data=False`` deletes the data files in between: the server comes back empty.
        ``keep_data=True`` needs ``persistence=True`` (without it nothing is kept).
        """
        if keep_data and not self.persistence:
            raise ValueError("keep_data=True needs RedisServer(persistence=True)")
        self.stop()
        if not keep_data:
            shutil.rmtree(self.data_dir)
            self.data_dir.mkdir()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but nothing is answered."""
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError("not running")
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        if self._proc is not None and self._paused:
            self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    def close(self) -> None:
        """Kill the server (if running) and remove its directory."""
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)
        _LIVE.discard(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the same from a trio test, in a worker thread ---------------------------------------

    async def astop(self) -> None:
        await trio.to_thread.run_sync(self.stop)

    async def akill(self) -> None:
        await trio.to_thread.run_sync(self.kill)

    async def arestart(self, *, keep_data: bool) -> None:
        await trio.to_thread.run_sync(lambda: self.restart(keep_data=keep_data))

    # -- internals ---------------------------------------------------------------------------

    def _arguments(self, port: int) -> list[str]:
        args = [
            self.executable,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.unix_socket),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--logfile", "",  # stdout, which goes to redis.log
            "--save", "",
            "--enable-debug-command", "local",
        ]  # fmt: skip
        if self.persistence:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
            if self.password is not None:
                args += ["--masterauth", self.password]
        return args

    def _launch(self, port: int, deadline: float) -> None:
        self.unix_socket.unlink(missing_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(
                self._arguments(port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of the test run is the test's to handle
            )
        self._proc = proc
        try:
            self._wait_ready(proc, port, deadline, offset)
        except BaseException:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            self._proc = None
            raise

    def _wait_ready(
        self, proc: subprocess.Popen[bytes], port: int, deadline: float, offset: int
    ) -> None:
        last_error = "no answer yet"
        while True:
            if proc.poll() is not None:
                log = self.log_text()[offset:]
                if "Address already in use" in log:
                    raise _PortTaken
                raise RedisStartError(
                    f"redis-server exited with status {proc.returncode} while starting\n"
                    + self._log_tail()
                )
            try:
                if self._answers(proc.pid, port):
                    return
            except (OSError, RedisError) as exc:  # not listening yet, or LOADING the AOF
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise RedisStartError(
                    f"redis-server did not answer within {self.start_timeout} s "
                    f"(last: {last_error})\n" + self._log_tail()
                )
            time.sleep(0.01)  # poll: the server is started, the question is when it answers

    def _answers(self, pid: int, port: int) -> bool:
        if not self.unix_socket.exists():
            return False
        budget = 1.0
        if resp_call(self.unix_socket, ("PING",), password=self.password, timeout=budget) != [
            b"PONG"
        ]:
            return False
        # The TCP port is ours: the server there is the process we started.
        (info,) = resp_call(
            ("127.0.0.1", port), ("INFO", "server"), password=self.password, timeout=budget
        )
        assert isinstance(info, bytes), info
        fields = dict(line.split(":", 1) for line in info.decode().splitlines() if ":" in line)
        if fields.get("process_id") != str(pid):
            raise RedisStartError(
                f"127.0.0.1:{port} is answered by process {fields.get('process_id')}, not {pid}"
            )
        return True

    def _log_tail(self, lines: int = 20) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- {self.log_path} (last {len(tail)} lines)\n" + "\n".join(tail)


class SentinelServer(RedisServer):
    """``redis-server SENTINEL.CONF --sentinel`` watching *master* at 127.0.0.1:*primary_port*
    (quorum 2). Ready when it answers over TCP (a sentinel has no unix socket). *password*: the
    watched servers' (``sentinel auth-pass``); the sentinel itself asks for none."""

    def __init__(
        self,
        *,
        master: str,
        primary_port: int,
        down_after_ms: int = 400,
        failover_timeout_ms: int = 3000,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.master = master
        self.conf = self.directory / "sentinel.conf"
        auth = "" if self.password is None else f"sentinel auth-pass {master} {self.password}\n"
        self.conf.write_text(
            f"sentinel monitor {master} 127.0.0.1 {primary_port} 2\n"
            f"sentinel down-after-milliseconds {master} {down_after_ms}\n"
            f"sentinel failover-timeout {master} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {master} 1\n" + auth
        )

    def _arguments(self, port: int) -> list[str]:
        return [
            self.executable, str(self.conf), "--sentinel",
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip

    def call(self, *args: str | bytes | int) -> RespValue:
        return resp_call(("127.0.0.1", self.port), args)[0]

    def primary(self) -> int | None:
        """The port of the primary this sentinel names now (None: it knows none)."""
        reply = self.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master)
        if not isinstance(reply, list) or len(reply) != 2:
            return None
        port = reply[1]
        assert isinstance(port, bytes), reply
        return int(port)

    def _answers(self, pid: int, port: int) -> bool:
        (info,) = resp_call(("127.0.0.1", port), ("INFO", "server"), timeout=1.0)
        assert isinstance(info, bytes), info
        fields = dict(line.split(":", 1) for line in info.decode().splitlines() if ":" in line)
        if fields.get("process_id") != str(pid):
            raise RedisStartError(
                f"127.0.0.1:{port} is answered by process {fields.get('process_id')}, not {pid}"
            )
        return True


class SentinelGroup:
    """A primary, a replica of it and three sentinels (quorum 2) on free ports of 127.0.0.1
    (*password*: the primary's and the replica's);
    :meth:`close` kills them all. Start with :meth:`start` (or as a context manager): it
    returns once the replica is in sync and every sentinel knows the replica and the other
    two sentinels (so a failover can happen at once)."""

    MASTER: Final = "dde-test"

    def __init__(
        self, *, password: str | None = None, down_after_ms: int = 400, start_timeout: float = 30.0
    ) -> None:
        self.password = password
        self.start_timeout = start_timeout
        self.down_after_ms = down_after_ms
        self.servers: list[RedisServer] = []
        self.sentinels: list[SentinelServer] = []

    def start(self) -> Self:
        try:
            primary = self._add(RedisServer(password=self.password))
            self._add(RedisServer(password=self.password, replica_of=primary.port))
            for _ in range(3):
                sentinel = SentinelServer(
                    master=self.MASTER,
                    primary_port=primary.port,
                    down_after_ms=self.down_after_ms,
                    password=self.password,
                )
                self.sentinels.append(sentinel)
                sentinel.start()
            self._wait(self._ready, "the replica in sync and the sentinels knowing each other")
        except BaseException:
            self.close()
            raise
        return self

    def _add(self, server: RedisServer) -> RedisServer:
        self.servers.append(server)
        return server.start()

    @property
    def addresses(self) -> list[str]:
        """The sentinels as ``[cluster] sentinels`` lists them."""
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def primary(self) -> RedisServer:
        """The server the first sentinel that answers names as the primary."""
        for sentinel in self.sentinels:
            try:
                port = sentinel.primary()
            except OSError:
                continue
            for server in self.servers:
                if server.running and server.port == port:
                    return server
        raise RedisStartError("no sentinel names a running primary")

    def _ready(self) -> bool:
        replica = self.servers[1]
        info = replica.call("INFO", "replication")
        assert isinstance(info, bytes)
        if b"master_link_status:up" not in info:
            return False
        for sentinel in self.sentinels:
            (row,) = [sentinel.call("SENTINEL", "MASTER", self.MASTER)]
            assert isinstance(row, list)
            fields = dict(zip(row[::2], row[1::2], strict=True))
            if fields.get(b"num-slaves") != b"1" or fields.get(b"num-other-sentinels") != b"2":
                return False
        return True

    def cut_replication(self) -> RedisServer:
        """Writes to the primary stop reaching the replica from now on (what asynchronous
        replication loses when the primary dies): the primary's default user may no longer
        ``PSYNC``/``SYNC`` and the replica's link is closed, so its reconnects are refused.
        Keep the primary's death within a couple of seconds of this: the sentinels promote
        only a replica whose link has not been down for long. Returns the primary."""
        primary = self.primary()
        primary.call("ACL", "SETUSER", "default", "-psync", "-sync")
        primary.call("CLIENT", "KILL", "TYPE", "replica")
        return primary

    def wait_failover(self, old: RedisServer) -> RedisServer:
        """Wait until every live sentinel names a running server other than *old*; that one."""

        def done() -> bool:
            ports = {s.primary() for s in self.sentinels if s.running}
            return len(ports) == 1 and ports != {old.port} and None not in ports

        self._wait(done, "the sentinels' failover")
        return self.primary()

    async def await_failover(self, old: RedisServer) -> RedisServer:
        return await trio.to_thread.run_sync(lambda: self.wait_failover(old))

    def _wait(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not condition():
            if time.monotonic() > deadline:
                raise RedisStartError(f"no {what} within {self.start_timeout} s")
            time.sleep(0.02)  # poll the servers' own answer

    def close(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = [
    "REDIS_ENV",
    "RedisError",
    "RedisServer",
    "RedisStartError",
    "RespValue",
    "SentinelGroup",
    "SentinelServer",
    "free_port",
    "redis_executable",
    "redis_unavailable",
    "resp_call",
]
