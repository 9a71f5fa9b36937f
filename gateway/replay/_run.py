"""Running one replay: frames from a source, paced, into an async ``send``.

:func:`run_replay` is the loop both endpoints use (the drop-in writes the frames verbatim, the
``/v1/stream`` op wraps them in ``replay_frame`` envelopes): the caller encodes and writes, this
module decides when. A replay never goes through a topic's fan-out nor a live subscription's
queue; it has its own byte budget and slow-consumer rule:

- the source is read one batch ahead of the pacing (so a disk read does not stall the pace),
  never more: the reader waits until the pacing takes the batch in hand;
- before each frame the replay looks at its :class:`ReplayBacklog`: the bytes it handed to
  ``send`` that the client has not taken yet. At or over the budget (``[replay] queue_bytes``)
  it waits for the client (``wait_below``), and so the reading stops too: a client that does
  not read holds two source batches plus its budget, never more;
- a client that takes nothing for ``stall_timeout`` seconds while the replay waits ends it
  with :attr:`EndReason.SLOW_CONSUMER` (counted); so does a ``send`` that does not return in
  that time;
- the pacer then goes on evenly: a client that was slow gets no burst of the backlog.

Stopping early is the caller's: cancel the task running :func:`run_replay` (its source is
closed on the way out). The counters (:class:`ReplayCounters`) are kept by the caller's
:class:`~gateway.replay.Replays`.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import attrs
import trio

from gateway.replay._counters import ReplayCounters
from gateway.replay._pacer import Pacer
from gateway.replay._source import ReplayFrame, ReplaySource, SourceLost


class EndReason(enum.StrEnum):
    """Why a replay ended (the ``reason`` of ``/v1/stream``'s ``replay_end``)."""

    END = "end"  # a non-looped replay reached the newest frame held
    STOPPED = "stopped"  # the client asked (``stop_replay``) or went away: the caller's
    SLOW_CONSUMER = "slow_consumer"
    SOURCE_LOST = "source_lost"


class ReplayBacklog(Protocol):
    """How much of a replay its client has not taken yet (the caller's transport)."""

    def unsent(self) -> int:
        """Bytes handed to ``send`` by this replay and not yet written to the socket."""
        ...

    async def wait_below(self, limit: int) -> None:
        """Return once :meth:`unsent` is below *limit* (or the transport is closing)."""
        ...


#: The caller's writer of one replay frame. It must not wait for the client to read (queue
#: the bytes and return): the budget and the slow-consumer rule are :func:`run_replay`'s.
SendFrame = Callable[[ReplayFrame], Awaitable[None]]
#: Told when a looped replay starts pass *n* (2, 3, ...) at the first frame again.
OnLoop = Callable[[int], Awaitable[None]]


@attrs.frozen
class ReplayLimits:
    """One replay's byte budget and how long it waits on a client that reads nothing."""

    budget_bytes: int
    stall_timeout: float


@attrs.frozen
class ReplayResult:
    """How a replay ended: *reason*, the seq of the last frame sent (0: none), frames sent,
    passes begun (a looped replay counts each start at the first frame), and for
    ``source_lost`` what was lost."""

    reason: EndReason
    last_seq: int
    frames: int
    passes: int
    detail: str = ""


async def run_replay(
    source: ReplaySource,
    pacer: Pacer,
    send: SendFrame,
    *,
    backlog: ReplayBacklog,
    limits: ReplayLimits,
    looped: bool = False,
    on_loop: OnLoop | None = None,
    counters: ReplayCounters | None = None,
) -> ReplayResult:
    """Send *source*'s frames to *send*, one every ``1 / pacer.rate`` s, until the end (not
    *looped*) or forever (*looped*: back to the first frame; *on_loop* is told the pass
    number right before that pass's first frame is sent).

    Returns how it ended (never :attr:`EndReason.STOPPED`: the caller cancels for that). The
    source is closed on return and on cancellation. A source that holds no frame at all ends
    at once with ``end``, looped or not.
    """
    frames_sent = 0
    last_seq = 0
    passes = 1
    new_pass = False

    def ended(reason: EndReason, detail: str = "") -> ReplayResult:
        if reason is EndReason.SLOW_CONSUMER and counters is not None:
            counters.slow_consumers += 1
        return ReplayResult(reason, last_seq, frames_sent, passes, detail)

    async def _pace(batch: list[ReplayFrame]) -> ReplayResult | None:
        """Send *batch* paced; a result when the replay ends (slow consumer)."""
        nonlocal frames_sent, last_seq, new_pass
        for frame in batch:
            if not await _within_budget(backlog, limits):
                return ended(EndReason.SLOW_CONSUMER)
            await trio.sleep(pacer.delay(trio.current_time()))
            if new_pass:
                new_pass = False
                if on_loop is not None:
                    await on_loop(passes)
            with trio.move_on_after(limits.stall_timeout) as scope:
                await send(frame)
            if scope.cancelled_caught:
                return ended(EndReason.SLOW_CONSUMER)
            pacer.sent(trio.current_time())
            frames_sent += 1
            last_seq = frame.seq
            if counters is not None:
                counters.frames += 1
        return None

    batches_in, batches = trio.open_memory_channel[_Item](0)
    result: ReplayResult | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_ahead, source, batches_in, looped)
            pacer.start(trio.current_time())
            async for item in batches:
                if item is _NEXT_PASS:
                    passes += 1
                    new_pass = True
                    continue
                if isinstance(item, _Ended):
                    result = ended(item.reason, item.detail)
                    break
                assert isinstance(item, list)
                result = await _pace(item)
                if result is not None:
                    break
            # (Set before the cancel: a checkpoint after it raises Cancelled, which the
            # nursery absorbs, and a return value would be lost with it.)
            nursery.cancel_scope.cancel()
    finally:
        batches.close()
        source.close()
    assert result is not None, "the reader ends with an _Ended item"
    return result


@attrs.frozen
class _Ended:
    reason: EndReason
    detail: str = ""


class _NextPass:
    """A looped replay went back to its first frame."""


_NEXT_PASS: Final = _NextPass()
_Item = list[ReplayFrame] | _Ended | _NextPass


async def _read_ahead(
    source: ReplaySource, out: trio.MemorySendChannel[_Item], looped: bool
) -> None:
    """Read the source one batch ahead of the pacing (the channel holds nothing: the batch
    in hand is all that waits while the client is behind), so a disk read does not stall the
    pace; then the end, or the next pass."""
    held_any = False
    async with out:
        while True:
            try:
                batch = await source.read()
            except SourceLost as exc:
                await out.send(_Ended(EndReason.SOURCE_LOST, str(exc)))
                return
            if not batch:
                if not looped or not held_any:
                    await out.send(_Ended(EndReason.END))
                    return
                source.rewind()
                await out.send(_NEXT_PASS)
                continue
            held_any = True
            await out.send(batch)


async def _within_budget(backlog: ReplayBacklog, limits: ReplayLimits) -> bool:
    """Wait until the client's backlog of this replay is below the budget; False when it
    took nothing for ``stall_timeout`` seconds."""
    budget = limits.budget_bytes
    if backlog.unsent() < budget:
        return True
    with trio.move_on_after(limits.stall_timeout):
        await backlog.wait_below(budget)
        return True
    return False
