"""The auth gate: after the vendor refused the token, one fixture probes it for all the others.

A refused token is a fact about the token, not about one fixture. When each refused fixture
retried on its own with a doubling wait, a token that flapped a few times a minute left every
fixture waiting up to ``unauthorized_retry`` (60 s) after the vendor accepted it again - seconds
without data suspend betting markets. The gate replaces that:

* a refused fixture waits at the gate (:meth:`AuthGate.refused`);
* exactly one waiter, the *prober*, returns every ``probe_interval`` seconds (a steady interval,
  no doubling) to try the token again; it keeps the role across its attempt, so however many
  fixtures are refused, one probe is under way at a time;
* any accepted auth (the probe's or any other fixture's: tracking ``Authorisation accepted``,
  or a fixture going live; :meth:`AuthGate.accepted`) and a token rotation
  (:meth:`AuthGate.release`) release every waiter at once; they still take their turn at the
  connect limiter, which paces the burst;
* a prober that leaves (its attempt ended otherwise, it was removed, stopped or crashed:
  :meth:`AuthGate.leave`) hands the role to another waiter, which probes one interval later;
* every waiter also returns after ``give_up_after`` seconds (``unauthorized_retry``) on its
  own: a vendor that refuses one fixture, not the token, is still retried.

No I/O: the gate only waits on the trio clock and events, so it is exact under
:class:`trio.testing.MockClock`. One gate per token (the supervisor holds one: one upstream
token per gateway).

Example::

    gate = AuthGate()
    await gate.refused(runner, probe_interval=2.0, give_up_after=60.0)  # then attempt again
    gate.accepted()                                       # the vendor accepted an auth
"""

from __future__ import annotations

import trio


class AuthGate:
    """Where refused fixtures wait; see the module docstring. Cancellation-safe: a waiter
    cancelled at the gate leaves it (and gives up the prober role if it held it)."""

    def __init__(self) -> None:
        self._prober: object | None = None
        self._waiting = 0
        # Set (and replaced) when every waiter must look again: a release or a free role.
        self._changed = trio.Event()
        # Set (and replaced) on an accepted auth or a token rotation: the waiters go.
        self._released = trio.Event()
        #: Probes sent (prober turns that ended on the interval, not on a release).
        self.probes = 0

    @property
    def prober(self) -> object | None:
        """The fixture that probes the token now (None when nobody waits)."""
        return self._prober

    @property
    def waiting(self) -> int:
        """Fixtures waiting at the gate now (the prober, while it waits, included)."""
        return self._waiting

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def release(self) -> None:
        """Every waiter attempts now (the token was rotated, or the vendor accepted it)."""
        self._prober = None
        self._released.set()
        self._released = trio.Event()
        self._wake()

    def accepted(self) -> None:
        """An auth was accepted (a fixture went live): release the waiters, if any."""
        if self._waiting or self._prober is not None:
            self.release()

    def leave(self, who: object) -> None:
        """*who* no longer waits or probes (its attempt ended otherwise, or it stopped)."""
        if self._prober is who:
            self._prober = None
            self._wake()

    async def refused(self, who: object, *, probe_interval: float, give_up_after: float) -> None:
        """Wait after *who*'s auth was refused; return when it should attempt again.

        The prober returns after ``min(probe_interval, give_up_after)`` and keeps the role
        until it calls :meth:`leave`, is refused again or a release comes. Any other waiter
        returns on a release, after *give_up_after*, or takes the role when it is free.
        """
        released = self._released
        now = trio.current_time()
        give_up_at = now + give_up_after
        probe_at = now + min(probe_interval, give_up_after)
        self._waiting += 1
        try:
            while not released.is_set():
                if self._prober is None:
                    self._prober = who
                    probe_at = trio.current_time() + min(probe_interval, give_up_after)
                if self._prober is who:
                    with trio.move_on_at(probe_at):
                        await released.wait()
                    if not released.is_set():
                        self.probes += 1
                    return
                if trio.current_time() >= give_up_at:
                    return
                changed = self._changed
                with trio.move_on_at(give_up_at):
                    await changed.wait()
        except BaseException:
            self.leave(who)
            raise
        finally:
            self._waiting -= 1
