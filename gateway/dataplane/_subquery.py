"""``GET /v1/subscribers`` queries: filter (feed, fixture, endpoint, slow), sort, page.

A query runs over every connected subscriber, so it yields to the event loop every
:data:`QUERY_STEP` subscribers (the fan-out keeps running while an operator lists 10 000),
keeps only the page it needs (a heap when the page is small) and builds views for that
page only.

Paging: ``after`` is the id of the last item of the previous page; sorted by a number, the next
page's link also gives ``after_value``, that item's value then (without it, the item's value
now is used, and a cursor whose subscriber is gone is :class:`CursorGone`). An item whose sort
value changed between two pages may be missed or seen again; ``id`` order is stable.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from typing import Final, Generic, NamedTuple, Protocol, TypeVar

import attrs
import trio

#: Subscribers examined between two checkpoints.
QUERY_STEP: Final = 100
#: ``sort=``: ``id`` and the numbers a subscriber can be ranked by; ``-`` before one = largest
#: first.
SORT_KEYS: Final = ("id", "queued_bytes", "frames_dropped", "frames_sent", "connected_at")
#: A subscriber is ``slow`` while at least this share of its ``queue_bytes`` budget is unsent.
SLOW_QUEUE_SHARE: Final = 0.25

_T = TypeVar("_T")
_R = TypeVar("_R", bound="Ranked")


def subscriber_order(ident: str) -> tuple[int, str]:
    """The order of subscriber ids in ``GET /v1/subscribers`` and its ``after`` cursor: shorter
    first, then by text, so the registry's decimal ids sort as numbers."""
    return len(ident), ident


def is_slow(queued_bytes: int, budget: int) -> bool:
    """Whether a subscriber is falling behind now (see :data:`SLOW_QUEUE_SHARE`)."""
    return budget > 0 and queued_bytes >= budget * SLOW_QUEUE_SHARE


class Ranked(Protocol):
    """What a query sorts by: a connection or a view (the names of ``SORT_KEYS``)."""

    @property
    def id(self) -> str: ...
    @property
    def queued_bytes(self) -> int: ...
    @property
    def frames_dropped(self) -> int: ...
    @property
    def frames_sent(self) -> int: ...
    @property
    def connected_at(self) -> float: ...


class Facts(NamedTuple):
    """What a query filters and sorts one subscriber by."""

    id: str
    endpoint: str
    subscriptions: Sequence[str]  # "feed/fixture"
    queued_bytes: int
    frames_dropped: int
    frames_sent: int
    connected_at: float
    slow: bool


@attrs.frozen
class SubscriberQuery:
    """Filters (None: any), the order and the page. Validated by :meth:`check`."""

    feed: str | None = None
    fixture: str | None = None
    endpoint: str | None = None
    slow: bool | None = None
    sort: str = "id"
    descending: bool = False
    after: str | None = None
    after_value: float | None = None
    limit: int | None = None

    def check(self) -> None:
        """Raise ValueError (with the query parameter's name) for a bad sort or cursor."""
        if self.sort not in SORT_KEYS:
            raise ValueError(f"query.sort: one of {', '.join(SORT_KEYS)} (- first: descending)")
        if self.after_value is not None and not math.isfinite(self.after_value):
            raise ValueError("query.after_value: must be a finite number")

    def matches(self, facts: Facts) -> bool:
        if self.endpoint is not None and facts.endpoint != self.endpoint:
            return False
        if self.slow is not None and facts.slow != self.slow:
            return False
        if self.feed is None and self.fixture is None:
            return True
        for name in facts.subscriptions:
            feed, _, fixture = name.partition("/")
            if (self.feed is None or feed == self.feed) and (
                self.fixture is None or fixture == self.fixture
            ):
                return True
        return False

    @property
    def filtered(self) -> bool:
        return any(f is not None for f in (self.feed, self.fixture, self.endpoint, self.slow))

    def key(self, item: Ranked) -> tuple[float, int, str]:
        """Where *item* sorts (smallest first)."""
        ident: str = item.id
        if self.sort == "id":
            return (0.0, len(ident), ident)
        value = float(getattr(item, self.sort))
        return (-value if self.descending else value, len(ident), ident)

    def next_page(self, item: Ranked) -> dict[str, str]:
        """The cursor parameters that continue after *item*."""
        if self.sort == "id":
            return {"after": item.id}
        return {"after": item.id, "after_value": repr(float(getattr(item, self.sort)))}

    def _cursor(self, located: Ranked | None) -> tuple[float, int, str] | None:
        if self.after is None:
            return None
        order = subscriber_order(self.after)
        if self.sort == "id":
            return (0.0, *order)
        if self.after_value is not None:
            value = self.after_value
        elif located is not None:
            value = float(getattr(located, self.sort))
        else:
            raise CursorGone(self.after)
        return (-value if self.descending else value, *order)


class CursorGone(LookupError):
    """``after`` names a subscriber that has left, and no ``after_value`` says where it was."""

    def __str__(self) -> str:
        return f"subscriber {self.args[0]!r} (query.after) has left: give query.after_value too"


class Page(NamedTuple, Generic[_T]):
    items: list[_T]
    #: Subscribers matching the filters, on every page.
    total: int
    #: The cursor parameters of the next page, None on the last.
    next_page: dict[str, str] | None


async def run_query(
    items: Sequence[_R], facts_of: Callable[[_R], Facts], query: SubscriberQuery
) -> Page[_R]:
    """The page of *items* that *query* selects, yielding every :data:`QUERY_STEP` items.
    *facts_of* is called only when the query filters. Raises :class:`CursorGone` (see the
    module)."""
    matching: list[tuple[tuple[float, int, str], int]] = []
    located: _R | None = None
    filtered = query.filtered
    for start in range(0, len(items), QUERY_STEP):
        if start:
            await trio.lowlevel.checkpoint()
        for index in range(start, min(start + QUERY_STEP, len(items))):
            item = items[index]
            if item.id == query.after:
                located = item
            if not filtered or query.matches(facts_of(item)):
                matching.append((query.key(item), index))
    await trio.lowlevel.checkpoint()
    cursor = query._cursor(located)
    after = matching if cursor is None else [m for m in matching if m[0] > cursor]
    want = len(after) if query.limit is None else query.limit + 1
    # A small page of many: a heap; else a sort (C-fast, cheaper than a heap of most of them).
    chosen = heapq.nsmallest(want, after) if want * 8 < len(after) else sorted(after)[:want]
    more = query.limit is not None and len(chosen) > query.limit
    chosen = chosen[: query.limit] if query.limit is not None else chosen
    next_page = query.next_page(items[chosen[-1][1]]) if more and chosen else None
    return Page([items[index] for _, index in chosen], len(matching), next_page)
