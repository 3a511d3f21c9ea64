"""Windows: exact aggregates (property-tested against a plain loop), alignment, grace, late."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from millrace.edge.windows import WindowAggregator
from millrace.wire import Aggregate, Window, merge_all

BASE_MS = 1_699_999_980_000  # a multiple of 60 s (and so of 1, 5, 10 s)
METRICS = ("a", "b", "c")


@dataclass
class Ref:
    count: int = 0
    total: float = 0.0
    low: float = 0.0
    high: float = 0.0
    first: float = 0.0
    last: float = 0.0
    squares: float = 0.0
    rejected: int = 0
    values: list[float] = field(default_factory=list)


def reference(
    readings: list[tuple[int, int, float | None]], periods: tuple[int, ...]
) -> tuple[dict[tuple[str, int, int], Ref], int]:
    """The straightforward computation: group by (metric, period, start), loop in order."""
    groups: dict[tuple[str, int, int], Ref] = defaultdict(Ref)
    for slot, ts, value in readings:
        for period in periods:
            start = ts - ts % (period * 1000)
            ref = groups[(METRICS[slot], start, period)]
            if value is None:
                ref.rejected += 1
                continue
            ref.values.append(value)
    for ref in groups.values():
        for v in ref.values:
            ref.total = ref.total + v
            ref.squares = ref.squares + v * v
        if ref.values:
            ref.count = len(ref.values)
            ref.low, ref.high = min(ref.values), max(ref.values)
            ref.first, ref.last = ref.values[0], ref.values[-1]
    orphans = sum(r.rejected for k, r in groups.items() if not r.count and k[2] == periods[0])
    return {k: r for k, r in groups.items() if r.count}, orphans


def as_dict(windows: list[Window]) -> dict[tuple[str, int, int], Window]:
    result = {(w.metric, w.start_ms, w.period_s): w for w in windows}
    assert len(result) == len(windows), "a window was emitted twice"
    return result


def assert_matches(windows: list[Window], expected: dict[tuple[str, int, int], Ref]) -> None:
    got = as_dict(windows)
    assert set(got) == set(expected)
    for key, ref in expected.items():
        w = got[key]
        assert (w.count, w.rejected) == (ref.count, ref.rejected)
        # Exact equality on purpose: same readings, same order, same float operations.
        assert (w.sum, w.sumsq) == (ref.total, ref.squares)
        assert (w.min, w.max, w.first, w.last) == (ref.low, ref.high, ref.first, ref.last)
        # ... and the contract's own aggregate of those readings, exactly.
        assert merge_all([w]) == Aggregate.of(ref.values, rejected=ref.rejected)


reading = st.tuples(
    st.integers(0, len(METRICS) - 1),
    st.integers(0, 95_000),
    st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False)),
)
periods_strategy = st.sampled_from([(1,), (5,), (10,), (1, 5), (10, 60), (7, 3)])


@settings(max_examples=200, deadline=None)
@given(st.lists(reading, max_size=300), periods_strategy)
def test_close_all_matches_the_straightforward_computation(
    raw: list[tuple[int, int, float | None]], periods: tuple[int, ...]
) -> None:
    readings = [(slot, BASE_MS + offset, value) for slot, offset, value in raw]
    agg = WindowAggregator(METRICS, periods, grace_ms=500)
    for slot, ts, value in readings:
        if value is None:
            agg.reject(slot, ts)
        else:
            agg.add(slot, ts, value)
    closed = agg.close_all()
    expected, orphans = reference(readings, periods)
    assert_matches(list(closed.windows), expected)
    assert closed.orphan_rejected == orphans
    assert closed.late == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(reading, max_size=300), periods_strategy, st.integers(0, 3000))
def test_closing_as_time_passes_emits_each_window_once_and_exactly(
    raw: list[tuple[int, int, float | None]], periods: tuple[int, ...], grace_ms: int
) -> None:
    grace_ms = min(grace_ms, min(periods) * 1000 - 1)
    readings = sorted(((s, BASE_MS + o, v) for s, o, v in raw), key=lambda r: r[1])
    agg = WindowAggregator(METRICS, periods, grace_ms=grace_ms)
    windows: list[Window] = []
    orphans = 0
    for slot, ts, value in readings:
        # Wall time never runs behind the readings it has seen.
        closed = agg.close_due(ts)
        windows.extend(closed.windows)
        orphans += closed.orphan_rejected
        if value is None:
            agg.reject(slot, ts)
        else:
            agg.add(slot, ts, value)
    closed = agg.close_all()
    windows.extend(closed.windows)
    orphans += closed.orphan_rejected
    expected, expected_orphans = reference(readings, periods)
    assert_matches(windows, expected)
    assert orphans == expected_orphans


def test_windows_are_aligned_to_wall_clock_multiples() -> None:
    agg = WindowAggregator(["m"], [10, 60], grace_ms=0)
    agg.add(0, BASE_MS + 61_234, 1.0)
    windows = agg.close_all().windows
    starts = {(w.period_s, w.start_ms) for w in windows}
    assert starts == {(10, BASE_MS + 60_000), (60, BASE_MS + 60_000)}
    assert all(w.start_ms % (w.period_s * 1000) == 0 for w in windows)


def test_a_window_waits_for_its_grace_then_closes() -> None:
    agg = WindowAggregator(["m"], [10], grace_ms=2000)
    agg.add(0, BASE_MS + 9_999, 1.0)
    assert agg.next_close_ms() == BASE_MS + 12_000
    assert agg.close_due(BASE_MS + 11_999).windows == ()
    agg.add(0, BASE_MS + 9_500, 3.0)  # late-ish but within grace: still counted
    (window,) = agg.close_due(BASE_MS + 12_000).windows
    assert (window.count, window.sum, window.last) == (2, 4.0, 3.0)


def test_readings_after_close_are_late_and_counted_once() -> None:
    agg = WindowAggregator(["m"], [10, 60], grace_ms=1000)
    agg.add(0, BASE_MS + 1_000, 1.0)
    agg.add(0, BASE_MS + 15_000, 2.0)
    first = agg.close_due(BASE_MS + 11_000)
    assert [w.start_ms - BASE_MS for w in first.windows] == [0]
    agg.add(0, BASE_MS + 5_000, 9.0)  # its 10 s window is closed; the 60 s one is still open
    agg.reject(0, BASE_MS + 6_000)
    late = agg.close_due(BASE_MS + 21_000)
    assert late.late == 1
    assert late.orphan_rejected == 2  # the late valid reading and the late rejected one
    rest = {(w.period_s, w.start_ms - BASE_MS): w for w in agg.close_all().windows}
    assert rest[(60, 0)].count == 3 and rest[(60, 0)].rejected == 1


def test_a_window_of_only_rejected_readings_is_not_emitted_but_counted() -> None:
    agg = WindowAggregator(["m"], [1], grace_ms=0)
    agg.reject(0, BASE_MS + 100)
    agg.reject(0, BASE_MS + 200)
    closed = agg.close_all()
    assert closed.windows == ()
    assert closed.orphan_rejected == 2


def test_after_close_all_the_same_window_is_never_emitted_again() -> None:
    agg = WindowAggregator(["m"], [10], grace_ms=0)
    agg.add(0, BASE_MS + 1_000, 1.0)
    assert len(agg.close_all().windows) == 1
    agg.add(0, BASE_MS + 2_000, 1.0)
    again = agg.close_all()
    assert again.windows == () and again.late == 1


def test_changing_the_period_keeps_open_windows_of_the_old_one() -> None:
    agg = WindowAggregator(["m"], [10], grace_ms=0)
    agg.add(0, BASE_MS + 1_000, 1.0)
    agg.set_periods([5])
    agg.add(0, BASE_MS + 2_000, 2.0)
    assert agg.periods_s == (5,)
    assert agg.next_close_ms() == BASE_MS + 5_000
    windows = {
        (w.period_s, w.start_ms - BASE_MS): w.count for w in agg.close_due(BASE_MS + 10_000).windows
    }
    assert windows == {(10, 0): 1, (5, 0): 1}
