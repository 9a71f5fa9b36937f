"""DDE gateway: one supervised upstream connection per fixture, fanned out to many subscribers.

The data path, in the order a frame travels it::

    gateway.simulator   a faithful stand-in for the vendor (tests, demo, users' own tests)
    gateway.upstream    one supervised task per (feed, fixture): connect, resume, watchdog
    gateway.hub         one topic per (feed, fixture): seq, epoch, history, subscribers
    gateway.dataplane   the subscriber WebSocket: pre-encoded frames written to every subscriber
    gateway.controlplane  the HTTP API (hypercorn + Starlette): status, fixtures, metrics

``gateway.config`` loads and checks the TOML configuration, ``gateway.service`` owns the root
nursery (signals, sd_notify, reload, drain) and ``gateway.cli`` is the ``dde-gateway`` command.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dde-gateway")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
