"""The window aggregate: one merge, exact in any grouping, the same rules as the SQL upserts."""

from __future__ import annotations

import math
import operator

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from millrace.wire import Aggregate, Batch, Window, encode_batch, merge_all
from millrace.wire.aggregate import AGGREGATE_FIELDS, MERGE_RULES, Merging
from millrace.wire.batch import WINDOW_FIELDS

values = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
runs = st.lists(st.lists(values, min_size=1, max_size=8), min_size=1, max_size=8)


def parts_of(run_values: list[list[float]]) -> list[Aggregate]:
    return [Aggregate.of(v, rejected=len(v) % 3) for v in run_values]


def assert_same(a: Aggregate, b: Aggregate) -> None:
    """Equal, but sums only to rounding: float addition is not associative."""
    assert (a.count, a.min, a.max, a.first, a.last, a.rejected) == (
        b.count,
        b.min,
        b.max,
        b.first,
        b.last,
        b.rejected,
    )
    assert math.isclose(a.sum, b.sum, rel_tol=1e-9, abs_tol=1e-6)
    assert math.isclose(a.sumsq, b.sumsq, rel_tol=1e-9, abs_tol=1e-6)


@given(runs)
def test_merging_runs_equals_the_aggregate_of_all_their_readings(run_values: list) -> None:
    everything = [v for run in run_values for v in run]
    merged = merge_all(parts_of(run_values))
    assert_same(merged, Aggregate.of(everything, rejected=merged.rejected))
    assert merged.rejected == sum(len(v) % 3 for v in run_values)


@given(runs, st.data())
def test_the_merge_is_the_same_in_any_grouping(run_values: list, data: st.DataObject) -> None:
    parts = parts_of(run_values)
    cut = data.draw(st.integers(1, len(parts)))
    grouped = merge_all([merge_all(parts[:cut]), *parts[cut:]])
    assert_same(grouped, merge_all(parts))
    left = parts[0]
    for part in parts[1:]:
        left = left.merge(part)
    assert left == merge_all(parts)  # the binary merge is the same loop


_PYTHON_RULES = {
    "add": operator.add,
    "least": min,
    "greatest": max,
    "earlier": lambda a, _b: a,
    "later": lambda _a, b: b,
}


@given(st.lists(values, min_size=1, max_size=8), st.lists(values, min_size=1, max_size=8))
def test_merge_rules_say_what_merge_does(a_values: list[float], b_values: list[float]) -> None:
    """MERGE_RULES drive the SQL upserts: they must be the Python merge, field by field."""
    a, b = Aggregate.of(a_values, rejected=2), Aggregate.of(b_values, rejected=5)
    by_rules = Aggregate(
        *(_PYTHON_RULES[MERGE_RULES[f]](getattr(a, f), getattr(b, f)) for f in AGGREGATE_FIELDS)
    )
    assert a.merge(b) == by_rules


def test_merging_by_time_takes_first_and_last_from_the_ends_and_ties_keep_the_earlier() -> None:
    a, b, c = Aggregate.of([1.0, 2.0]), Aggregate.of([3.0, 4.0]), Aggregate.of([5.0, 6.0])
    merging = Merging(b, 20, 20)
    merging.add(c, 30, 30)
    merging.add(a, 10, 10)  # late, but it began first
    assert (merging.first, merging.last, merging.parts) == (1.0, 6.0, 3)
    assert (merging.first_at, merging.last_at) == (10, 30)
    merging.add(Aggregate.of([9.0]), 30, 30)  # a tie: the part merged earlier keeps `last`
    assert merging.last == 6.0 and merging.result().count == 7


def test_a_window_is_an_aggregate_and_travels_in_its_field_order() -> None:
    w = Window("temp", 1_700_000_000_000, 10, 2, 3.0, 1.0, 2.0, 1.0, 2.0, 5.0, 4)
    assert isinstance(w, Aggregate)
    assert w.merge(w) == Aggregate(4, 6.0, 1.0, 2.0, 1.0, 2.0, 10.0, 8)
    assert ("metric", "start_ms", "period_s", *AGGREGATE_FIELDS) == WINDOW_FIELDS
    batch = Batch("dev-a", "ab" * 16, 1, 1_700_000_010_000, windows=(w,))
    (row,) = msgpack.unpackb(encode_batch(batch), raw=False)["w"]
    assert row == [getattr(w, name) for name in WINDOW_FIELDS]
    assert repr(w).startswith("Window(metric='temp', start_ms=1700000000000, period_s=10, count=2")
