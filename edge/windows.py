"""Tumbling windows aligned to wall-clock multiples of their period (pure, no I/O).

Each numeric signal is a slot; each period is a lane. A reading updates the
open window of its slot in every lane with plain float arithmetic in arrival
order, so the result equals a straightforward loop over the same readings
exactly. A window closes `grace_ms` after its end; a reading for a window that
has already closed is late and counted, never aggregated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from millrace.errors import WireError
from millrace.wire import Window
from millrace.wire.aggregate import AGGREGATE_FIELDS

log = logging.getLogger(__name__)

_FOREVER_MS = 2**62


class _Acc:
    """A window being filled: the `Aggregate` fields, updated in place reading by reading.

    `WindowAggregator.add` is `Aggregate.of` unrolled (tests/edge/test_windows.py holds
    them equal); it stays in place because it runs once per reading per period.
    """

    __slots__ = ("start", *AGGREGATE_FIELDS)

    def __init__(self, start: int) -> None:
        self.start = start
        self.count = 0
        self.sum = 0.0
        self.min = 0.0
        self.max = 0.0
        self.first = 0.0
        self.last = 0.0
        self.sumsq = 0.0
        self.rejected = 0


@dataclass(frozen=True, slots=True)
class Closed:
    """What one close produced: windows, and rejected readings no window carries.

    `late` is how many valid readings came too late for their window; they are
    part of `orphan_rejected`.
    """

    windows: tuple[Window, ...]
    orphan_rejected: int
    late: int = 0


class _Lane:
    """All open windows of one period."""

    __slots__ = ("closed_end_ms", "current", "main", "older", "period_ms", "period_s")

    def __init__(self, period_s: int, slots: int, *, main: bool = False) -> None:
        self.period_s = period_s
        # Rejected readings outside any window are counted once, on the main lane.
        self.main = main
        self.period_ms = period_s * 1000
        # Windows ending at or before this have been emitted; readings for them are late.
        self.closed_end_ms = -_FOREVER_MS
        self.current: list[_Acc | None] = [None] * slots
        # Open windows other than `current` (e.g. the previous one during its grace).
        self.older: dict[tuple[int, int], _Acc] = {}

    def acc_for(self, slot: int, start: int) -> _Acc | None:
        """The window for (slot, start), created if needed; None when it is already closed."""
        if start + self.period_ms <= self.closed_end_ms:
            return None
        current = self.current[slot]
        if current is not None:
            if current.start == start:
                return current
            if current.start > start:
                acc = self.older.get((slot, start))
                if acc is None:
                    acc = self.older[(slot, start)] = _Acc(start)
                return acc
            self.older[(slot, current.start)] = current
        acc = self.older.pop((slot, start), None) or _Acc(start)
        self.current[slot] = acc
        return acc

    def take_due(self, end_limit_ms: int) -> list[tuple[int, _Acc]]:
        """Remove and return every open window whose end is <= end_limit_ms."""
        due: list[tuple[int, _Acc]] = []
        for slot, acc in enumerate(self.current):
            if acc is not None and acc.start + self.period_ms <= end_limit_ms:
                due.append((slot, acc))
                self.current[slot] = None
        for key in [k for k, a in self.older.items() if a.start + self.period_ms <= end_limit_ms]:
            due.append((key[0], self.older.pop(key)))
        ends = [acc.start + self.period_ms for _, acc in due]
        limit = end_limit_ms if end_limit_ms < _FOREVER_MS else max(ends, default=-_FOREVER_MS)
        self.closed_end_ms = max(self.closed_end_ms, limit)
        return due

    def open_count(self) -> int:
        return sum(acc is not None for acc in self.current) + len(self.older)


class WindowAggregator:
    """Aggregates numeric readings of `metrics` into windows of every period."""

    def __init__(self, metrics: Sequence[str], periods_s: Sequence[int], *, grace_ms: int) -> None:
        if not periods_s:
            raise ValueError("at least one period is needed")
        self.metrics = tuple(metrics)
        self.grace_ms = grace_ms
        self._lanes = [
            _Lane(p, len(self.metrics), main=i == 0) for i, p in enumerate(dict.fromkeys(periods_s))
        ]
        self._retired: list[_Lane] = []
        self.late = 0
        self.late_rejected = 0

    @property
    def periods_s(self) -> tuple[int, ...]:
        return tuple(lane.period_s for lane in self._lanes)

    def add(self, slot: int, ts_ms: int, value: float) -> None:
        """Aggregate one valid reading of `slot` taken at `ts_ms`."""
        main = True
        for lane in self._lanes:
            acc = lane.current[slot]
            start = ts_ms - ts_ms % lane.period_ms
            if acc is None or acc.start != start:
                acc = lane.acc_for(slot, start)
                if acc is None:
                    if main:
                        self.late += 1
                    main = False
                    continue
            main = False
            if acc.count:
                acc.count += 1
                acc.sum += value
                if value < acc.min:
                    acc.min = value
                if value > acc.max:
                    acc.max = value
                acc.last = value
                acc.sumsq += value * value
            else:
                acc.count = 1
                acc.sum = value
                acc.min = acc.max = acc.first = acc.last = value
                acc.sumsq = value * value

    def reject(self, slot: int, ts_ms: int) -> None:
        """Count a rejected reading (invalid, NaN, failed read) in its windows."""
        main = True
        for lane in self._lanes:
            acc = lane.acc_for(slot, ts_ms - ts_ms % lane.period_ms)
            if acc is None:
                if main:
                    self.late_rejected += 1
            else:
                acc.rejected += 1
            main = False

    def set_periods(self, periods_s: Sequence[int]) -> None:
        """Switch periods; windows already open under a dropped period still close normally."""
        old = {lane.period_s: lane for lane in self._lanes}
        lanes = []
        for period in dict.fromkeys(periods_s):
            lane = old.pop(period) if period in old else _Lane(period, len(self.metrics))
            lanes.append(lane)
        self._retired.extend(lane for lane in old.values() if lane.open_count())
        for lane in lanes:
            lane.main = False
        lanes[0].main = True
        self._lanes = lanes

    def next_close_ms(self) -> int | None:
        """Wall-clock time when the next open window becomes due, if any is open."""
        due: list[int] = []
        for lane in (*self._lanes, *self._retired):
            starts = [a.start for a in lane.current if a is not None]
            starts.extend(a.start for a in lane.older.values())
            if starts:
                due.append(min(starts) + lane.period_ms + self.grace_ms)
        return min(due) if due else None

    def close_due(self, now_ms: int) -> Closed:
        """Emit every window whose end + grace has passed at `now_ms`."""
        return self._close(now_ms - self.grace_ms)

    def close_all(self) -> Closed:
        """Emit every open window now (shutdown, or an explicit flush)."""
        return self._close(_FOREVER_MS)

    def _close(self, end_limit_ms: int) -> Closed:
        windows: list[Window] = []
        orphans = 0
        for lane in (*self._lanes, *self._retired):
            for slot, acc in lane.take_due(end_limit_ms):
                if not acc.count:
                    if lane.main:
                        orphans += acc.rejected
                    continue
                try:
                    windows.append(
                        Window(
                            self.metrics[slot],
                            acc.start,
                            lane.period_s,
                            acc.count,
                            acc.sum,
                            acc.min,
                            acc.max,
                            acc.first,
                            acc.last,
                            acc.sumsq,
                            acc.rejected,
                        )
                    )
                except WireError as exc:
                    log.warning("dropping window of %s: %s", self.metrics[slot], exc)
                    if lane.main:
                        orphans += acc.count + acc.rejected
        self._retired = [lane for lane in self._retired if lane.open_count()]
        late, self.late = self.late, 0
        late_rejected, self.late_rejected = self.late_rejected, 0
        windows.sort(key=lambda w: (w.start_ms, w.period_s, w.metric))
        return Closed(tuple(windows), orphans + late + late_rejected, late)
