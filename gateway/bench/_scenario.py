"""Benchmark scenarios: the knobs of one run and the six named presets.

A :class:`Scenario` is plain data; :mod:`gateway.bench._run` turns it into processes. Each preset
carries the target it is checked against (see docs/performance.md); raw knobs given on the
command line override the preset's values.
"""

from __future__ import annotations

from typing import Final, Literal

import attrs

#: Highest niceness (the lowest priority) a process can ask for.
NICE_MAX: Final = 19

Fanout = Literal["all", "spread"]

DEFAULT_DURATION: Final = 10.0
DEFAULT_WARMUP: Final = 2.0
DEFAULT_FRAME_BYTES: Final = 3000
#: The gateway's ``backoff_initial`` in the generated config; target 4 adds 200 ms to it.
BENCH_BACKOFF_INITIAL: Final = 0.5
#: The gateway's ``[subscribers] queue_bytes`` in the generated config (its default).
BENCH_QUEUE_BYTES: Final = 4 * 1024 * 1024

SCENARIO_NAMES: Final = ("saturated", "paced", "stuck", "drop", "idle", "ingest")


@attrs.frozen
class Scenario:
    """One benchmark run.

    ``rate`` is frames per second per fixture (0 = as fast as the upstream socket takes them).
    ``fanout`` "all": every subscriber subscribes to every fixture; "spread": subscriber i takes
    fixture i mod F (one subscription each). ``stuck`` subscribers subscribe and then never read;
    ``idle`` subscribers connect and never subscribe. ``baseline`` runs the same scenario once
    more without stuck subscribers, for comparison. ``drop`` closes the upstream connections
    in the middle of the measured window and times the first fresh frame.
    """

    name: str = "custom"
    subscribers: int = attrs.field(default=10, validator=attrs.validators.ge(0))
    fixtures: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    rate: float = attrs.field(default=25.0, validator=attrs.validators.ge(0))
    frame_bytes: int = attrs.field(default=DEFAULT_FRAME_BYTES, validator=attrs.validators.ge(200))
    duration: float = attrs.field(default=DEFAULT_DURATION, validator=attrs.validators.gt(0))
    warmup: float = attrs.field(default=DEFAULT_WARMUP, validator=attrs.validators.ge(0))
    fanout: Fanout = "all"
    stuck: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    idle: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    drop: bool = False
    baseline: bool = False
    #: Run the gateway with ``[recorder] dir`` set to this directory (its cost: recorder.md).
    recorder_dir: str | None = None
    #: The gateway's ``[subscribers] write_delay`` in ms (0: every frame written at once).
    write_delay: float = attrs.field(
        default=0.0, validator=[attrs.validators.ge(0), attrs.validators.le(1000)]
    )
    #: The gateway's ``[subscribers] compression``; with "deflate" the load generator offers
    #: permessage-deflate (the peer's subscribers do not: it never compresses).
    compression: str = attrs.field(
        default="off", validator=attrs.validators.in_(("off", "deflate"))
    )
    #: The load generator's niceness (0-19). On a small machine the subscribers' process,
    #: woken by every write, preempts the server in the middle of its fan-outs; at a lower
    #: priority it waits for the server's turn to end (docs/performance.md, the paced tail).
    loadgen_nice: int = attrs.field(
        default=0, validator=[attrs.validators.ge(0), attrs.validators.le(NICE_MAX)]
    )

    #: Run the gateway as a member of a cluster (``[cluster]``) on a redis-server the bench
    #: starts for the run: every frame is also appended to Redis (docs/cluster.md).
    cluster: bool = False
    #: With ``cluster``: a second instance that owns nothing (it relays every fixture from
    #: Redis) and a second load generator with the same subscribers on it (phase "relay").
    relay: bool = False
    #: Gateway instances sharing the stream listener (``reuse_port``; the kernel spreads the
    #: subscribers), all in one cluster; the first owns every fixture, the others relay.
    instances: int = attrs.field(default=1, validator=[attrs.validators.ge(1)])

    def __attrs_post_init__(self) -> None:
        if (self.relay or self.instances > 1) and not self.cluster:
            raise ValueError("relay and instances > 1 need cluster")
        if self.relay and self.instances > 1:
            raise ValueError("relay takes one owner instance (instances = 1)")

    @property
    def offered_deliveries(self) -> float:
        """Deliveries per second the feeder's rate implies (0 when the rate is unlimited)."""
        if self.fanout == "spread":
            return self.rate * self.subscribers
        return self.rate * self.fixtures * self.subscribers


PRESETS: Final[dict[str, Scenario]] = {
    # Target 1: cost per delivery when the gateway is busy. The rate is high but finite so a
    # Python load generator on the same 2-core box keeps up (an unlimited feeder makes the
    # gateway outrun it and disconnect subscribers as slow).
    "saturated": Scenario(
        name="saturated", subscribers=100, fixtures=1, rate=400.0, frame_bytes=3000
    ),
    # Target 2: 20 fixtures x 25 Hz x 50 subscribers on every fixture = 25,000 deliveries/s.
    "paced": Scenario(name="paced", subscribers=50, fixtures=20, rate=25.0, frame_bytes=3000),
    # Target 3: one subscriber in ten (5 of 50) stops reading; compared with the same run
    # without the stuck ones.
    "stuck": Scenario(
        name="stuck",
        subscribers=45,
        fixtures=20,
        rate=25.0,
        frame_bytes=3000,
        stuck=5,
        baseline=True,
    ),
    # Target 4: the feeder drops every upstream connection mid-run.
    "drop": Scenario(
        name="drop", subscribers=10, fixtures=1, rate=25.0, frame_bytes=3000, drop=True
    ),
    # Target 5: memory per connected subscriber that subscribed to nothing.
    "idle": Scenario(name="idle", subscribers=0, fixtures=1, rate=1.0, frame_bytes=3000, idle=5000),
    # Target 6: 200 fixtures x 25 Hz in, one subscriber each.
    "ingest": Scenario(
        name="ingest", subscribers=200, fixtures=200, rate=25.0, frame_bytes=3000, fanout="spread"
    ),
}
