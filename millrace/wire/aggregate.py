"""The window aggregate: what a run of readings comes to, and the one way two runs merge.

Every window is an `Aggregate` (`Window` adds what it is of and when), so the edge
emits them, the cloud stores them as readings rows, rollups merge them into hours and
days, and alert rules judge them, all with the same fields and the same merge.
Count, sums and `rejected` add, min and max combine, `first` comes from the part whose
readings were taken first and `last` from the part taken last: merging is exact up
to float rounding of the sums, in any grouping, as long as the parts keep their order
(docs/architecture.md, docs/guarantees.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Final, Literal


@dataclass(frozen=True, slots=True)
class Aggregate:
    """Exact-merge statistics of valid readings, plus how many readings were rejected."""

    count: int
    sum: float
    min: float
    max: float
    first: float
    last: float
    sumsq: float
    rejected: int

    @classmethod
    def of(cls, values: Iterable[float], *, rejected: int = 0) -> Aggregate:
        """The aggregate of `values` in order, with the edge's float operations exactly."""
        it = iter(values)
        first = next(it)  # an aggregate holds at least one reading
        count, total, low, high, last, squares = 1, first, first, first, first, first * first
        for value in it:
            count += 1
            total += value
            if value < low:
                low = value
            if value > high:
                high = value
            last = value
            squares += value * value
        return cls(count, total, low, high, first, last, squares, rejected)

    def merge(self, later: Aggregate) -> Aggregate:
        """This run's readings followed by `later`'s."""
        return merge_all((self, later))


# Field order is the order of the wire row and of the readings table after its key.
AGGREGATE_FIELDS: Final = tuple(f.name for f in fields(Aggregate))

MergeRule = Literal["add", "least", "greatest", "earlier", "later"]
# How each field merges, for code that merges elsewhere (SQL upserts); `merge_all` is
# the same rules in Python.
MERGE_RULES: Final[Mapping[str, MergeRule]] = MappingProxyType(
    {
        "count": "add",
        "sum": "add",
        "min": "least",
        "max": "greatest",
        "first": "earlier",
        "last": "later",
        "sumsq": "add",
        "rejected": "add",
    }
)
if tuple(MERGE_RULES) != AGGREGATE_FIELDS:
    raise RuntimeError("millrace.wire.aggregate: MERGE_RULES must name every field in order")


def merge_all(parts: Iterable[Aggregate]) -> Aggregate:
    """The aggregate of every part's readings; `parts` in the order they were taken.

    One loop and one result however many parts: rollups merge a bucket's windows here.
    """
    it = iter(parts)
    head = next(it)  # at least one part
    count, total, low, high = head.count, head.sum, head.min, head.max
    squares, rejected, tail = head.sumsq, head.rejected, head
    for part in it:
        count += part.count
        total += part.sum
        squares += part.sumsq
        rejected += part.rejected
        if part.min < low:
            low = part.min
        if part.max > high:
            high = part.max
        tail = part
    return Aggregate(count, total, low, high, head.first, tail.last, squares, rejected)
