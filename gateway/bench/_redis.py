"""A redis-server of the bench's own, for ``dde-gateway bench --cluster`` (never a system one).

:class:`BenchRedis` starts ``redis-server`` (``$DDE_REDIS_SERVER``, else the one on PATH) in a
directory of the run, without persistence, listening on a unix socket there (the harness's own
questions) and on a free TCP port of 127.0.0.1 (the gateways connect over TCP, as they would to
a Redis on another host). The same approach as the tests' kit (``tests/redis_kit.py``, which
uses this module's raw RESP client; the installed package cannot import the tests):

- Redis cannot report a port the OS chose, so a free port is picked and the server started on
  it; when it exits because the port was taken meanwhile ("Address already in use" in its log),
  another port is tried.
- Ready means answering: ``PING`` over the unix socket, then ``INFO server`` over TCP names the
  process started here.

Figures: the server's CPU time is read from ``/proc/<pid>/stat`` like the gateway's;
:meth:`BenchRedis.commandstats` reads ``INFO commandstats`` (calls and microseconds per command,
commands run inside scripts included).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Final

#: The environment variable naming the redis-server binary to use (else PATH).
REDIS_ENV: Final = "DDE_REDIS_SERVER"
START_TIMEOUT: Final = 10.0
PORT_ATTEMPTS: Final = 8

#: A reply: simple and bulk strings are bytes, arrays lists.
Reply = bytes | int | list["Reply"] | None


class RedisStartError(RuntimeError):
    """No redis-server here, or it did not start (the message ends with its log)."""


def redis_executable() -> str | None:
    """The redis-server to run: ``$DDE_REDIS_SERVER`` if set (and executable), else PATH."""
    named = os.environ.get(REDIS_ENV)
    if named:
        return named if os.access(named, os.X_OK) else None
    return shutil.which("redis-server")


class RedisReplyError(Exception):
    """Redis answered with an error reply (the message is Redis's)."""


def _encode(*args: str | bytes | int) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read_reply(reader: IO[bytes]) -> Reply:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed by redis")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RedisReplyError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = reader.read(size + 2)
        if len(data) != size + 2:
            raise ConnectionError("connection closed by redis")
        return data[:-2]
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise RedisReplyError(f"unexpected reply {line[:40]!r}")


def resp_pipeline(
    address: Path | tuple[str, int],
    commands: list[tuple[str | bytes | int, ...]],
    *,
    password: str | None = None,
    timeout: float = 2.0,
) -> list[Reply]:
    """*commands* on one new connection (unix socket path or (host, port)), sent together;
    their replies. A raw RESP client: enough to ask a server of our own whether it is up and
    what it did, with no client library. Blocking, *timeout* per socket operation; an error
    reply raises :class:`RedisReplyError`."""
    if password is not None:
        commands = [("AUTH", password), *commands]
    family = socket.AF_UNIX if isinstance(address, Path) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(address) if isinstance(address, Path) else address)
        sock.sendall(b"".join(_encode(*c) for c in commands))
        with sock.makefile("rb") as reader:
            replies = [_read_reply(reader) for _ in commands]
    return replies[1:] if password is not None else replies


def resp_call(address: Path | tuple[str, int], *args: str | bytes | int) -> Reply:
    """One command on a new connection (see :func:`resp_pipeline`)."""
    return resp_pipeline(address, [args])[0]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago (the caller must cope if it is not)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class BenchRedis:
    """One redis-server in *directory* (created; the caller removes it). Use as a context
    manager, or :meth:`start` and :meth:`stop`."""

    def __init__(self, directory: Path, executable: str | None = None) -> None:
        exe = executable or redis_executable()
        if exe is None:
            raise RedisStartError(
                f"no redis-server to run: install one (apt-get install redis-server) or name "
                f"it in ${REDIS_ENV}"
            )
        self.executable = exe
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        # sun_path holds 107 bytes: a temp dir with a long name gets a short socket elsewhere.
        self.unix_socket = directory / "redis.sock"
        if len(str(self.unix_socket)) > 100:
            raise RedisStartError(f"unix socket path too long: {self.unix_socket}")
        self.log_path = directory / "redis.log"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``, what the gateways' ``[cluster] redis_url`` names."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("redis-server is not running")
        return self._proc.pid

    def start(self) -> BenchRedis:
        deadline = time.monotonic() + START_TIMEOUT
        for _ in range(PORT_ATTEMPTS):
            port = free_port()
            if self._launch(port, deadline):
                self.port = port
                return self
        raise RedisStartError(f"redis-server found no free port in {PORT_ATTEMPTS} attempts")

    def _launch(self, port: int, deadline: float) -> bool:
        """Start on *port*; True once it answers, False when the port was taken."""
        self.unix_socket.unlink(missing_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        argv = [
            self.executable,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.unix_socket),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--logfile", "",
            "--save", "",
            "--appendonly", "no",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._proc = proc
        while True:
            if proc.poll() is not None:
                self._proc = None
                text = self.log_path.read_text(errors="replace")[offset:]
                if "Address already in use" in text:
                    return False
                raise RedisStartError(f"redis-server exited ({proc.returncode}): {text[-500:]}")
            try:
                if self._answers(proc.pid, port):
                    return True
            except (OSError, RedisStartError):
                pass  # not listening yet, or still loading
            if time.monotonic() > deadline:
                self.stop()
                raise RedisStartError(f"redis-server did not answer within {START_TIMEOUT:.0f} s")
            time.sleep(0.01)

    def _answers(self, pid: int, port: int) -> bool:
        if not self.unix_socket.exists() or resp_call(self.unix_socket, "PING") != b"PONG":
            return False
        info = resp_call(("127.0.0.1", port), "INFO", "server")
        fields = _info_fields(info)
        if fields.get("process_id") != str(pid):
            raise RedisStartError(f"127.0.0.1:{port} is another redis ({fields.get('process_id')})")
        return True

    def call(self, *args: str | bytes | int) -> Reply:
        """One command over the unix socket (blocking)."""
        return resp_call(self.unix_socket, *args)

    def pipeline(self, commands: list[tuple[str | bytes | int, ...]]) -> list[Reply]:
        """Several commands over the unix socket, sent together (blocking)."""
        return resp_pipeline(self.unix_socket, commands)

    def commandstats(self) -> dict[str, dict[str, float]]:
        """``INFO commandstats``: command (lower case) -> {"calls", "usec"}."""
        out: dict[str, dict[str, float]] = {}
        for name, value in _info_fields(self.call("INFO", "commandstats")).items():
            if not name.startswith("cmdstat_"):
                continue
            stats = dict(part.split("=", 1) for part in value.split(","))
            out[name[len("cmdstat_") :]] = {
                "calls": float(stats.get("calls", 0)),
                "usec": float(stats.get("usec", 0)),
            }
        return out

    def used_memory(self) -> int:
        return int(_info_fields(self.call("INFO", "memory")).get("used_memory", 0))

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()

    def __enter__(self) -> BenchRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _info_fields(info: Reply) -> dict[str, str]:
    if not isinstance(info, bytes):
        return {}
    return dict(
        line.split(":", 1) for line in info.decode(errors="replace").splitlines() if ":" in line
    )
