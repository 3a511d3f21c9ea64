"""Numeric readings into wall-clock aligned windows, closed a grace period after their end.

The host holds the open windows in memory, as an edge agent does; a window closes when the
host's clock passes its end plus `grace_ms` (room for messages in flight). A reading for a
window already closed opens a new part of it, which the ingest writer merges into the stored
part exactly (cloud/ingest/writer.py), so a late reading is never lost nor counted twice.
Non-finite values and magnitudes beyond what a rollup can square are counted as rejected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from millrace.cloud.ingest.classify import MAX_ABS_VALUE
from millrace.wire import Window

WindowKey = tuple[str, str, int, int]  # device, metric, period_s, start_ms


@dataclass(slots=True)
class _Open:
    count: int = 0
    total: float = 0.0
    low: float = math.inf
    high: float = -math.inf
    first: float = 0.0
    first_ts: int = 0
    last: float = 0.0
    last_ts: int = 0
    sumsq: float = 0.0
    rejected: int = 0

    def add(self, ts_ms: int, x: float) -> None:
        if not math.isfinite(x) or abs(x) > MAX_ABS_VALUE:
            self.rejected += 1
            return
        if self.count == 0 or ts_ms < self.first_ts:
            self.first, self.first_ts = x, ts_ms
        if self.count == 0 or ts_ms >= self.last_ts:
            self.last, self.last_ts = x, ts_ms
        self.count += 1
        self.total += x
        self.sumsq += x * x
        self.low = min(self.low, x)
        self.high = max(self.high, x)


DEFAULT_GRACE_MS: Final = 2000


class Windows:
    """Open windows of every Sparkplug device, one per (device, metric, period, start)."""

    def __init__(self, periods_s: tuple[int, ...], *, grace_ms: int = DEFAULT_GRACE_MS) -> None:
        self.periods_s = periods_s
        self.grace_ms = grace_ms
        self._open: dict[WindowKey, _Open] = {}

    def __len__(self) -> int:
        return len(self._open)

    def add(self, device: str, metric: str, ts_ms: int, x: float) -> None:
        """One reading into the window of each configured period."""
        for period in self.periods_s:
            start = ts_ms - ts_ms % (period * 1000)
            key = (device, metric, period, start)
            acc = self._open.get(key)
            if acc is None:
                acc = self._open[key] = _Open()
            acc.add(ts_ms, x)

    def close(self, now_ms: int | None = None) -> dict[str, list[Window]]:
        """Windows ended `grace_ms` before `now_ms` (all of them when None), per device.

        A window that saw only rejected values has no aggregate to store and is dropped.
        """
        due = [
            k for k in self._open if now_ms is None or k[3] + k[2] * 1000 + self.grace_ms <= now_ms
        ]
        out: dict[str, list[Window]] = {}
        for key in sorted(due):
            acc = self._open.pop(key)
            if acc.count == 0:
                continue
            device, metric, period, start = key
            out.setdefault(device, []).append(
                Window(
                    metric,
                    start,
                    period,
                    acc.count,
                    acc.total,
                    acc.low,
                    acc.high,
                    acc.first,
                    acc.last,
                    acc.sumsq,
                    acc.rejected,
                )
            )
        return out
