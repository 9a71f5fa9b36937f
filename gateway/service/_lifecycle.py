"""The root nursery: signals, sd_notify, reload and drain around one :class:`Gateway`.

Everything the process runs lives under the nursery opened in :func:`serve`:

- SIGTERM / SIGINT: ``STOPPING=1``, :meth:`Gateway.drain` (bounded by ``drain_timeout``), then
  cancel everything; the process exits 0.
- SIGHUP: ``RELOADING=1``, re-read the config file and the subscriber token file (in a worker
  thread, like the first read: file I/O stays off the event loop); a config or token file with
  errors is refused (errors logged, the running config and tokens kept); otherwise added
  fixtures start, removed ones stop, unchanged ones stay connected and new subscribers
  authenticate with the new tokens. ``READY=1`` afterwards either way. Reloads run one at a
  time; SIGHUPs that arrive during one are coalesced by trio's signal receiver into one more
  reload after it (which reads the files as they are then). Each kind of reload line (done,
  refused, needs a restart) is logged at most once per ``RELOAD_LOG_INTERVAL``, the next one
  saying how many were suppressed: a SIGHUP storm cannot flood the journal.
- sd_notify: ``READY=1`` only after both listeners are bound; ``STATUS=`` kept current;
  ``WATCHDOG=1`` from a trio task, so only while the event loop is responsive. The notifier is
  closed on every way out of :func:`serve`: a clean stop, a failed start, a cancellation.
"""

from __future__ import annotations

import gc
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

import trio

from gateway.config import Config, ConfigError, SecretError, load_subscriber_tokens
from gateway.listen import ListenError
from gateway.recorder import Recorder
from gateway.service._gateway import Bound, Gateway
from gateway.service._logging import LogFormat, configure_logging, fields
from gateway.service._notify import Notifier
from gateway.service._preflight import load_checked, preflight, problem_line
from gateway.throttle import LogThrottle

log = logging.getLogger("gateway")

STATUS_INTERVAL: Final = 5.0
#: Seconds between two log lines of one kind of reload outcome (the rest are counted): short,
#: so that an operator's reloads a few seconds apart each get their line.
RELOAD_LOG_INTERVAL: Final = 1.0
TOKEN_RECHECK: Final = 1.0
_STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


async def serve(
    config: Config,
    *,
    reload: Callable[[], Config] | None = None,
    on_reload: Callable[[Config], None] | None = None,
    notifier: Notifier | None = None,
    freeze_gc: bool = False,
    reload_log_clock: Callable[[], float] = time.monotonic,
    task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a gateway until SIGTERM/SIGINT, then drain and return.

    *reload* returns a freshly loaded config (raising :class:`ConfigError`) and is called on
    SIGHUP, in a worker thread (it reads files); without it SIGHUP is logged and ignored.
    ``started(gateway)`` once ready. The notifier (given or made from the environment) is
    closed when this returns or raises.

    *freeze_gc* (the service process, not tests sharing a process): once started, move every
    object that exists - modules, routes, config - out of the cyclic garbage collector's sight
    (:func:`gc.freeze`). Its full collections then scan only what the running gateway makes;
    before, they scanned every imported module and were the paced benchmark's latency tail.

    *reload_log_clock*: the clock of the reload lines' throttle (injectable for tests).
    """
    notifier = notifier or Notifier.from_environ()
    reload_log = _ReloadLog(reload_log_clock)
    try:
        with trio.open_signal_receiver(*_STOP_SIGNALS, signal.SIGHUP) as signals:
            async with trio.open_nursery() as root:
                recorder = None
                if config.recorder.enabled:
                    # Opening checks every recording on disk: blocking work, off the loop.
                    recorder = await trio.to_thread.run_sync(Recorder, config.recorder)
                gateway = Gateway(config, recorder=recorder)
                await root.start(gateway.run)
                if freeze_gc:
                    gc.collect()
                    gc.freeze()
                await notifier.ready()
                await notifier.status(gateway.summary())
                root.start_soon(notifier.run_watchdog)
                root.start_soon(_report_status, gateway, notifier)
                task_status.started(gateway)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        await _reload(gateway, reload, on_reload, notifier, reload_log)
                        continue
                    log.info("%s: draining", signal.Signals(signum).name)
                    break
                await notifier.stopping()
                await gateway.drain()
                root.cancel_scope.cancel()
    finally:
        # Every way out (a clean stop, a listener that cannot bind, a cancellation) closes the
        # notify socket. aclose() never blocks; the shield keeps a pending cancellation from
        # raising at its checkpoint and replacing the exception already on its way out.
        with trio.CancelScope(shield=True):
            await notifier.aclose()
    log.info("stopped")


class _ReloadLog:
    """One throttle per kind of reload line, so a storm of refusals cannot hide a success."""

    def __init__(self, clock: Callable[[], float]) -> None:
        def throttle() -> LogThrottle:
            return LogThrottle(log, interval=RELOAD_LOG_INTERVAL, clock=clock)

        self.done = throttle()
        self.refused = throttle()
        self.restart = throttle()
        self.ignored = throttle()


async def _reload(
    gateway: Gateway,
    reload: Callable[[], Config] | None,
    on_reload: Callable[[Config], None] | None,
    notifier: Notifier,
    lines: _ReloadLog,
) -> None:
    if reload is None:
        lines.ignored.warning("SIGHUP: no config file to reload")
        return
    await notifier.reloading()
    try:
        new = await trio.to_thread.run_sync(reload)
        tokens = await trio.to_thread.run_sync(load_subscriber_tokens, new)
        changes = gateway.apply(new, tokens=tokens)
    except ConfigError as exc:
        lines.refused.log(
            logging.ERROR,
            "reload refused, keeping the running config: %s",
            "; ".join(exc.errors),
        )
    except Exception as exc:
        # Whatever reading the file raised, the service runs on: a reload never takes it down.
        # The type only: the text of an arbitrary exception could quote the file.
        lines.refused.log(
            logging.ERROR,
            "reload refused, keeping the running config: cannot read it (%s)",
            type(exc).__name__,
        )
    else:
        if on_reload is not None:
            on_reload(new)
        lines.done.log(
            logging.INFO,
            "reloaded: added %s, removed %s",
            changes["added"] or "nothing",
            changes["removed"] or "nothing",
            extra=fields(**changes),
        )
        if changes["needs_restart"] or changes["skipped"]:
            lines.restart.warning(
                "reload: changed sections %s and fixtures %s need a restart to take effect",
                changes["needs_restart"],
                changes["skipped"],
            )
    # READY=1 either way: the service runs on (with the old or the new config).
    await notifier.ready()
    await notifier.status(gateway.summary())


async def _report_status(gateway: Gateway, notifier: Notifier) -> None:
    while True:
        await trio.sleep(STATUS_INTERVAL)
        await notifier.status(gateway.summary())


_E = TypeVar("_E", bound=BaseException)


def _leaves(group: BaseExceptionGroup[_E]) -> list[_E]:
    """The errors of an exception group, nested groups (one per nursery) opened."""
    out: list[_E] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def run_from_config_path(path: Path, log_format: LogFormat, log_level: str | None) -> int:
    """``dde-gateway run --config PATH``: exit status 0 after a clean stop, 2 on a bad config
    (whatever :func:`~gateway.service._preflight.preflight` finds, one line each: the lines of
    ``check-config``), 1 with one
    error line when a listener cannot be opened (:class:`~gateway.listen.ListenError`: the
    address is in use, say).

    Logging is configured here, once the config is known: level from ``--log-level`` or the
    config (again on every reload), and the current upstream token as a redaction secret.
    """
    # The same checks, and lines, as `dde-gateway check-config` (gateway.service._preflight).
    checked = await trio.to_thread.run_sync(preflight, path)
    if checked.config is None or checked.errors:
        for line in checked.errors:
            log.error("%s", problem_line(path, "error", line))
        return 2
    config = checked.config
    warnings = checked.warnings
    current = [config]
    known: list[str] = []

    def read_token() -> list[str]:
        try:
            return [current[0].upstream.read_token().reveal()]
        except Exception:
            return []  # missing mid-rotation: the redactor keeps what it knew

    async def refresh_token() -> None:
        # The redactor asks on every log line, synchronously: it gets the value read here, in a
        # worker thread every TOKEN_RECHECK seconds, so no log call ever reads a file.
        while True:
            known[:] = await trio.to_thread.run_sync(read_token, abandon_on_cancel=True)
            await trio.sleep(TOKEN_RECHECK)

    def configure(cfg: Config) -> None:
        current[0] = cfg
        configure_logging(
            fmt=log_format, level=log_level or cfg.gateway.log_level, secrets=lambda: known
        )

    known[:] = await trio.to_thread.run_sync(read_token)
    configure(config)
    for warning in warnings:
        log.warning("%s", warning)
    # A file-size limit (LimitFSIZE=, ulimit -f) must make the recorder's write fail (EFBIG:
    # recording stops, reported), not kill the process with SIGXFSZ.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    status = 0
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(refresh_token)
            await serve(
                config, reload=lambda: load_checked(path), on_reload=configure, freeze_gc=True
            )
            nursery.cancel_scope.cancel()
    except* ListenError as group:
        # A listener that cannot bind (the port is taken): one line that says which and why,
        # not a traceback. systemd's Restart=on-failure tries again.
        for error in _leaves(group):
            log.error("%s", error)
        status = 1
    except* (ConfigError, SecretError) as group:
        # Found on opening what the config names after the checks (the recorder's dir swapped
        # for a symlink, a token file removed meanwhile): exit 2, as for a bad config file.
        for problem in _leaves(group):
            log.error("%s", problem)
        status = 2
    return status


__all__ = ["Bound", "Gateway", "run_from_config_path", "serve"]
