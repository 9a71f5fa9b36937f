"""Which live instances have gone silent (gateway.cluster.Liveness): no I/O, times given."""

from __future__ import annotations

from gateway.cluster import BEAT_KEY, SILENT_ROUNDS, Liveness

TICK = 0.5


def test_an_instance_whose_beat_stops_is_silent_after_the_rounds_and_heard_again() -> None:
    live = Liveness("gw-a", TICK)
    limit = SILENT_ROUNDS * TICK
    live.observed({"gw-a": {BEAT_KEY: 1}, "gw-b": {BEAT_KEY: 7}}, 0.0)
    live.observed({"gw-a": {BEAT_KEY: 2}, "gw-b": {BEAT_KEY: 7}}, limit - 0.1)
    assert live.silent_for("gw-b", limit - 0.1) is None
    # The same beat for the whole limit: silent, with how long.
    live.observed({"gw-a": {BEAT_KEY: 3}, "gw-b": {BEAT_KEY: 7}}, limit + 0.2)
    assert live.silent_for("gw-b", limit + 0.2) == limit + 0.2
    assert live.silent_for("gw-a", limit + 0.2) is None  # never silent to itself
    # Heard again (its beat moved): not silent.
    live.observed({"gw-a": {BEAT_KEY: 4}, "gw-b": {BEAT_KEY: 8}}, limit + 0.5)
    assert live.silent_for("gw-b", limit + 0.5) is None


def test_an_instance_that_left_the_live_set_is_forgotten() -> None:
    live = Liveness("gw-a", TICK)
    live.observed({"gw-b": {BEAT_KEY: 1}}, 0.0)
    live.observed({}, 10.0)
    assert live.silent_for("gw-b", 10.0) is None
    # Listed again (a restart under the same name): heard from now, whatever its beat.
    live.observed({"gw-b": {BEAT_KEY: 1}}, 20.0)
    assert live.silent_for("gw-b", 20.0 + SILENT_ROUNDS * TICK - 0.1) is None
