"""The fan-out benchmark: ``dde-gateway bench``.

Runs, as separate processes on loopback, a fast tracking-protocol feeder, the gateway exactly as
``dde-gateway run`` starts it (and, when ``websockets`` is installed - the ``bench`` extra - a
minimal ``websockets`` relay for comparison, :mod:`gateway.bench._peer`), and a load generator
whose subscribers read raw sockets. Prints a table of figures next to their targets; ``--json
PATH`` writes them too. ``--floor fanout|ingest`` instead runs one of two in-process
micro-benchmarks of the floors the targets are judged against. See docs/performance.md.
"""

from gateway.bench._cli import add_arguments, run_from_args
from gateway.bench._scenario import PRESETS, SCENARIO_NAMES, Scenario

__all__ = ["PRESETS", "SCENARIO_NAMES", "Scenario", "add_arguments", "run_from_args"]
