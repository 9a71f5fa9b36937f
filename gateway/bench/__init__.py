"""The fan-out benchmark: ``dde-gateway bench``.

Runs, as separate processes on loopback, a fast tracking-protocol feeder, the gateway exactly as
``dde-gateway run`` starts it (and, when ``websockets`` and ``tests/perf/peer.py`` are present, a
minimal ``websockets`` relay for comparison), and a load generator whose subscribers read raw
sockets. Prints a table of figures next to their targets; ``--json PATH`` writes them too.
See docs/performance.md.
"""

from gateway.bench._cli import add_arguments, run_from_args
from gateway.bench._scenario import PRESETS, SCENARIO_NAMES, Scenario

__all__ = ["PRESETS", "SCENARIO_NAMES", "Scenario", "add_arguments", "run_from_args"]
