"""``dde-gateway demo``: the simulator and a gateway following it, on an embedded config.

Both run in one process under one root nursery; Ctrl-C (SIGINT) drains the gateway and stops
the simulator. Ports are options so the demo can run beside another instance.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from typing import Any, Final

import trio

from gateway.config import Config, structure_config
from gateway.service._gateway import Gateway
from gateway.service._lifecycle import serve
from gateway.simulator import Simulator

log = logging.getLogger("gateway.demo")

DEMO_TRACKING: Final = (
    "5501b26a-1c44-4c3b-9ff5-9322084d41f9",
    "08456e52-9cf7-48cc-913c-f45ec0a1b2c3",
)
DEMO_ACTIONS: Final = ("2ed1cba1-7c3e-4b5e-9a51-0d1f1c2b3a4d",)
DEMO_TOKEN_ENV: Final = "DDE_DEMO_TOKEN"


def demo_config(stream_port: int, http_port: int, simulator_port: int) -> Config:
    """The embedded demo config (the same shape as config/demo.toml)."""
    sim = f"ws://127.0.0.1:{simulator_port}"
    data: dict[str, Any] = {
        "gateway": {
            "stream_listen": f"127.0.0.1:{stream_port}",
            "http_listen": f"127.0.0.1:{http_port}",
        },
        "upstream": {"token_env": DEMO_TOKEN_ENV, "backoff_max": 5.0},
        "feeds": {
            "tracking": {"kind": "tracking", "url": f"{sim}/ws/soccer/tracking/low_latency"},
            "actions": {
                "kind": "fastpath",
                "url": f"{sim}/soccer/fixtures/{{fixture}}/actions",
                "on_demand": True,
            },
        },
        "fixtures": [{"feed": "tracking", "id": fx} for fx in DEMO_TRACKING]
        + [{"feed": "actions", "id": fx} for fx in DEMO_ACTIONS],
    }
    return structure_config(data)


def _self_command() -> str:
    """How this program was started, so the banner's commands work as printed."""
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0 if argv0.endswith("dde-gateway") else f"{sys.executable} -m gateway"


def banner(gateway: Gateway, simulator_port: int) -> str:
    assert gateway.bound is not None
    stream, http = gateway.bound.stream, gateway.bound.http
    fx = DEMO_TRACKING[0]
    sub = f'{{"op":"subscribe","feed":"tracking","fixture":"{fx}","backfill":5}}'
    return "\n".join(
        [
            "",
            "DDE gateway demo is running (Ctrl-C stops it).",
            f"  simulator (vendor stand-in): ws://127.0.0.1:{simulator_port}",
            f"  subscriber WebSocket:        ws://{stream}/v1/stream",
            f"  vendor drop-in (tracking):   ws://{stream}/ws/soccer/tracking/low_latency",
            f"  HTTP API:                    http://{http}/v1/status",
            f"  dashboard (a browser):       http://{http}/",
            "",
            "Try:",
            f"  curl -s http://{http}/v1/fixtures",
            f"  curl -s http://{http}/v1/fixtures/tracking/{fx}/latest | head -c 300; echo",
            f"  {_self_command()} watch --url ws://{stream}/v1/stream tracking/{fx}",
            f"  # or any WebSocket client on ws://{stream}/v1/stream, sending:",
            f"  {sub}",
            "",
        ]
    )


async def run_demo(stream_port: int, http_port: int, simulator_port: int) -> int:
    token = secrets.token_urlsafe(16)
    os.environ[DEMO_TOKEN_ENV] = token
    simulator = Simulator(tokens={token})
    for fx in DEMO_TRACKING:
        simulator.add_fixture(fx, kind="tracking")
    for fx in DEMO_ACTIONS:
        simulator.add_fixture(fx, kind="fastpath")
    async with trio.open_nursery() as nursery:

        async def gateway_then_stop(*, task_status: trio.TaskStatus[Gateway]) -> None:
            # serve() returns after SIGINT/SIGTERM and a drain; then stop the simulator too.
            await serve(config, task_status=task_status)
            nursery.cancel_scope.cancel()

        # The simulator first: with port 0 its bound port goes into the gateway's config.
        simulator_port = await nursery.start(simulator.serve, "127.0.0.1", simulator_port)
        config = demo_config(stream_port, http_port, simulator_port)
        gateway: Gateway = await nursery.start(gateway_then_stop)
        print(banner(gateway, simulator_port), file=sys.stdout, flush=True)
    return 0
