"""The window aggregate: what a run of readings comes to, and the one way two runs merge.

Every window is an `Aggregate` (`Window` adds what it is of and when), so the edge
emits them, the cloud stores them as readings rows, merges the two parts of a window
split by an agent restart, rolls them up into hours and days, and alert rules judge
them, all with the same fields and the same merge. Count, sums and `rejected` add, min
and max combine, `first` comes from the part whose readings began first and `last`
from the part that ended last: exact up to float rounding of the sums, in any
grouping (docs/architecture.md). `Merging` is that merge, done in place; SQL upserts
follow `MERGE_RULES`.
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
# How each field merges, for merges written in SQL; `Merging.add` is these rules in Python
# (tests/millrace/test_aggregate.py holds them equal).
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


class Merging:
    """An aggregate being merged part by part, in place: the one implementation of the merge.

    Each part comes with order keys for its first and its last reading (`first_at`,
    `last_at`: window starts in ms, or positions); `first` is taken from the part that
    began first and `last` from the part that ended last, and on a tie the part merged
    earlier keeps them. Mutable and slotted so rollups merge each stored window into its
    hour without an object per window; `merge_all` and `Aggregate.merge` use it too.
    """

    __slots__ = (*AGGREGATE_FIELDS, "first_at", "last_at", "parts")

    count: int
    sum: float
    min: float
    max: float
    first: float
    last: float
    sumsq: float
    rejected: int

    def __init__(self, part: Aggregate, first_at: int, last_at: int, *, parts: int = 1) -> None:
        self.count = part.count
        self.sum = part.sum
        self.min = part.min
        self.max = part.max
        self.first = part.first
        self.last = part.last
        self.sumsq = part.sumsq
        self.rejected = part.rejected
        self.first_at = first_at
        self.last_at = last_at
        self.parts = parts  # how many parts (windows) are in

    def add(self, part: Aggregate, first_at: int, last_at: int, *, parts: int = 1) -> None:
        """Merge `part` in."""
        self.parts += parts
        self.count += part.count
        self.sum += part.sum
        self.sumsq += part.sumsq
        self.rejected += part.rejected
        if part.min < self.min:
            self.min = part.min
        if part.max > self.max:
            self.max = part.max
        if first_at < self.first_at:
            self.first, self.first_at = part.first, first_at
        if last_at > self.last_at:
            self.last, self.last_at = part.last, last_at

    def result(self) -> Aggregate:
        """The merged aggregate."""
        return Aggregate(
            self.count, self.sum, self.min, self.max, self.first, self.last, self.sumsq,
            self.rejected,
        )  # fmt: skip


def merge_all(parts: Iterable[Aggregate]) -> Aggregate:
    """The aggregate of every part's readings; `parts` in the order they were taken."""
    it = iter(parts)
    merging = Merging(next(it), 0, 0)  # at least one part
    for at, part in enumerate(it, 1):
        merging.add(part, at, at)
    return merging.result()
