"""serve() and run_from_config_path() in process: the notifier is closed on every way out, and
config files are read in a worker thread (at start and on SIGHUP).

Signals are raised in this process only while serve() holds its signal receiver (after
``started``), so they reach trio and never the default handlers. Real sockets on 127.0.0.1 port
0, real clock, each test under ``trio.fail_after``; nothing follows an upstream fixture.
"""

from __future__ import annotations

import functools
import itertools
import signal
import socket
import threading
from pathlib import Path

import pytest
import trio

from gateway.config import Config, load_config
from gateway.service import Notifier, Preflight, run_from_config_path, serve
from tests.kit import gateway_config, wait_until

GUARD = 30.0


class RecordingNotifier(Notifier):
    """A disabled notifier that counts :meth:`aclose` calls."""

    def __init__(self) -> None:
        super().__init__(None)
        self.closes = 0

    async def aclose(self) -> None:
        self.closes += 1
        await super().aclose()


def _config(tmp_path: Path, **sections: dict[str, object]) -> Config:
    token = tmp_path / "token"
    token.write_text("t")
    return gateway_config(1, token, [], **sections)  # nothing followed: no upstream needed


def _flatten(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _flatten(sub)]
    return [exc]


async def test_notifier_closed_after_a_clean_stop(tmp_path: Path) -> None:
    notifier = RecordingNotifier()
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve, _config(tmp_path), notifier=notifier))
            signal.raise_signal(signal.SIGTERM)  # serve() drains and returns
    assert notifier.closes == 1


async def test_notifier_closed_when_serve_is_cancelled(tmp_path: Path) -> None:
    notifier = RecordingNotifier()
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve, _config(tmp_path), notifier=notifier))
            nursery.cancel_scope.cancel()
    assert notifier.closes == 1


async def test_notifier_closed_when_the_start_fails(tmp_path: Path) -> None:
    # The stream port is taken: the data plane cannot bind and serve() raises.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _config(tmp_path, gateway={"stream_listen": f"127.0.0.1:{port}"})
        notifier = RecordingNotifier()
        with trio.fail_after(GUARD), pytest.raises(BaseException) as info:
            await serve(config, notifier=notifier)
    assert any(isinstance(e, OSError) for e in _flatten(info.value)), info.value
    assert notifier.closes == 1


async def test_sighup_reload_reads_in_a_worker_thread(tmp_path: Path) -> None:
    config = _config(tmp_path)
    readers: list[int] = []

    def reload() -> Config:
        readers.append(threading.get_ident())
        return config

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(serve, config, reload=reload, notifier=RecordingNotifier())
            )
            signal.raise_signal(signal.SIGHUP)
            await wait_until(lambda: bool(readers))
            nursery.cancel_scope.cancel()
    assert readers != [threading.get_ident()]
    assert len(readers) == 1


async def test_config_file_read_at_start_in_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readers: list[int] = []

    def preflight(path: Path) -> Preflight:
        readers.append(threading.get_ident())
        return Preflight(None, [f"{path.name}: broken on purpose"], [])

    monkeypatch.setattr("gateway.service._lifecycle.preflight", preflight)
    with trio.fail_after(GUARD):
        status = await run_from_config_path(tmp_path / "gateway.toml", "text", None)
    assert status == 2
    assert len(readers) == 1
    assert readers != [threading.get_ident()]


@pytest.mark.parametrize("nesting", [5000])
async def test_sighup_with_a_hostile_file_is_refused_and_the_service_runs_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, nesting: int
) -> None:
    """A config nested ~5,000 deep once crashed the service on SIGHUP (RecursionError escaped).

    The real file path (load_config) and a reload that raises something unexpected: both are
    refused with the running config kept, and the gateway keeps answering.
    """
    config = _config(tmp_path)
    path = tmp_path / "gateway.toml"
    path.write_text("a = " + "[" * nesting + "]" * nesting + "\n")
    calls: list[str] = []

    def reload() -> Config:
        calls.append("load")
        if len(calls) == 1:
            return load_config(path)
        raise RecursionError("maximum recursion depth exceeded")

    notifier = RecordingNotifier()
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            gw = await nursery.start(
                functools.partial(
                    serve,
                    config,
                    reload=reload,
                    notifier=notifier,
                    # A throttle interval passes between two lines: both refusals are logged.
                    reload_log_clock=functools.partial(next, itertools.count(0.0, 60.0)),
                )
            )
            for expected in (1, 2):
                signal.raise_signal(signal.SIGHUP)
                await wait_until(lambda n=expected: caplog.text.count("reload refused") == n)
            assert "nested too deeply" in caplog.text
            assert "cannot read it (RecursionError)" in caplog.text
            assert gw.config is config and gw.is_ready()
            nursery.cancel_scope.cancel()
