"""A faithful stand-in for the IMG Arena DDE live WebSocket endpoints.

Serves both feed kinds on one port: a path with ``/fixtures/{id}/`` in it is a fastpath
connection for that fixture, any other path is a tracking connection. The data is synthetic and
deterministic (a pure function of fixture id, seed and index) or a JSONL recording; faults can be
switched per fixture while it runs. Used by the gateway's tests, by ``dde-gateway simulate`` and
``demo``, and by users in their own tests::

    sim = Simulator(tokens={"t"}, rate_hz=200, heartbeat_interval=0.5)
    sim.add_fixture("fx1")
    port = await nursery.start(sim.serve, "127.0.0.1", 0)
    sim.faults("fx1").drop_after_frames = 100
"""

from gateway.simulator._cli import add_arguments, build_simulator, parse_fault, run_from_args
from gateway.simulator._fastpath import Action, ActionScript
from gateway.simulator._faults import FAULT_NAMES, Attempt, Faults, Outcome
from gateway.simulator._fixture import (
    DEFAULT_SILENCE_TIMEOUT,
    DEFAULT_STATUS_CHECK_INTERVAL,
    FixtureKind,
    ScorerState,
    SimFixture,
    load_recording,
)
from gateway.simulator._server import (
    ACCEPT_MEDIA_TYPE,
    DEFAULT_ACTION_INTERVAL,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_RATE_HZ,
    ReplaySeen,
    Simulator,
)
from gateway.simulator._tracking import DEFAULT_KICKOFF_UT_MS, TrackingMatch

__all__ = [
    "ACCEPT_MEDIA_TYPE",
    "DEFAULT_ACTION_INTERVAL",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_KICKOFF_UT_MS",
    "DEFAULT_RATE_HZ",
    "DEFAULT_SILENCE_TIMEOUT",
    "DEFAULT_STATUS_CHECK_INTERVAL",
    "FAULT_NAMES",
    "Action",
    "ActionScript",
    "Attempt",
    "Faults",
    "FixtureKind",
    "Outcome",
    "ReplaySeen",
    "ScorerState",
    "SimFixture",
    "Simulator",
    "TrackingMatch",
    "add_arguments",
    "build_simulator",
    "load_recording",
    "parse_fault",
    "run_from_args",
]
