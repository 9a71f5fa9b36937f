"""The fan-out benchmark: ``dde-gateway bench``.

Runs, as separate processes on loopback, a fast tracking-protocol feeder, the gateway exactly as
``dde-gateway run`` starts it (and, when ``websockets`` is installed - the ``bench`` extra - a
minimal ``websockets`` relay for comparison, :mod:`gateway.bench._peer`), and a load generator
whose subscribers read raw sockets. Prints a table of figures next to their targets; ``--json
PATH`` writes them too. ``--floor fanout|ingest`` instead runs one of two in-process
micro-benchmarks of the floors the targets are judged against. See docs/performance.md.
"""

from gateway.bench._cli import add_arguments, run_from_args, scenarios_from_args
from gateway.bench._loadgen import percentile
from gateway.bench._procstat import machine_ticks, steal_percent
from gateway.bench._redis import (
    REDIS_ENV,
    RedisReplyError,
    Reply,
    free_port,
    redis_executable,
    resp_pipeline,
)
from gateway.bench._report import CLUSTER_ROWS, ROWS, evaluate, format_table
from gateway.bench._rollfigures import INSTANCES as ROLLING_INSTANCES
from gateway.bench._rollfigures import ROOM as ROLLING_ROOM
from gateway.bench._rollfigures import drain_timeout as rolling_drain_timeout
from gateway.bench._rollfigures import owners as rolling_owners
from gateway.bench._rollfigures import stall_figures as rolling_stalls
from gateway.bench._rollfigures import table as rolling_table
from gateway.bench._rollfigures import unsettled as rolling_unsettled
from gateway.bench._run import (
    PEER_MISSING,
    PEER_SCRIPT,
    BenchError,
    gateway_config_text,
    peer_available,
    run_bench,
)
from gateway.bench._scenario import PRESETS, SCENARIO_NAMES, Scenario
from gateway.bench._wsframe import (
    ProtocolError,
    accept_key,
    check_server_handshake,
    client_handshake,
    encode_frame,
    parse_frames,
    server_handshake,
    unmask,
)

__all__ = [
    "CLUSTER_ROWS",
    "PEER_MISSING",
    "PEER_SCRIPT",
    "PRESETS",
    "REDIS_ENV",
    "ROLLING_INSTANCES",
    "ROLLING_ROOM",
    "ROWS",
    "SCENARIO_NAMES",
    "BenchError",
    "ProtocolError",
    "RedisReplyError",
    "Reply",
    "Scenario",
    "accept_key",
    "add_arguments",
    "check_server_handshake",
    "client_handshake",
    "encode_frame",
    "evaluate",
    "format_table",
    "free_port",
    "gateway_config_text",
    "machine_ticks",
    "parse_frames",
    "peer_available",
    "percentile",
    "redis_executable",
    "resp_pipeline",
    "rolling_drain_timeout",
    "rolling_owners",
    "rolling_stalls",
    "rolling_table",
    "rolling_unsettled",
    "run_bench",
    "run_from_args",
    "scenarios_from_args",
    "server_handshake",
    "steal_percent",
    "unmask",
]
