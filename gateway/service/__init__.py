"""Running the gateway: the root nursery, signals, sd_notify, reload, drain, logging, demo."""

from gateway.service._clusterrec import ClusterRecording, RecordingArchive
from gateway.service._demo import DEMO_ACTIONS, DEMO_TRACKING, demo_config, run_demo
from gateway.service._fixtures import FixtureBook
from gateway.service._gateway import Bound, Gateway, RecordedTopic
from gateway.service._journald import writes_to_journal
from gateway.service._lifecycle import RELOAD_LOG_INTERVAL, run_from_config_path, serve
from gateway.service._logging import (
    GatewayLogHandler,
    LogFormat,
    SecretRedactor,
    configure_logging,
)
from gateway.service._notify import Notifier, encode_fields
from gateway.service._preflight import (
    Preflight,
    check_config,
    load_checked,
    preflight,
    problem_line,
    recorder_dir_problem,
)
from gateway.service._slowsteps import SlowStepLog, instruments_from_env

__all__ = [
    "DEMO_ACTIONS",
    "DEMO_TRACKING",
    "RELOAD_LOG_INTERVAL",
    "Bound",
    "ClusterRecording",
    "FixtureBook",
    "Gateway",
    "GatewayLogHandler",
    "LogFormat",
    "Notifier",
    "Preflight",
    "RecordedTopic",
    "RecordingArchive",
    "SecretRedactor",
    "SlowStepLog",
    "check_config",
    "configure_logging",
    "demo_config",
    "encode_fields",
    "instruments_from_env",
    "load_checked",
    "preflight",
    "problem_line",
    "recorder_dir_problem",
    "run_demo",
    "run_from_config_path",
    "serve",
    "writes_to_journal",
]
