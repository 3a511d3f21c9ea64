"""Pure rollup merging: the writer's spelled-out hourly merge is the contract's merge."""

from __future__ import annotations

import random
import struct

from millrace.cloud.rollups import HOUR_MS, Rollups, add_hourly, add_window
from millrace.wire import Aggregate, Window

START_MS = 1_764_000_000_000 - 1_764_000_000_000 % HOUR_MS
VALUES = (-0.0, 0.0, -1.5, 2.25, 1e15, -1e15, 5e-324, 3.0)


def _windows(rng: random.Random, n: int) -> list[tuple[int, int, Window]]:
    """Windows over three hours, many starts repeated (the parts of split windows)."""
    out = []
    for _ in range(n):
        period = rng.choice((1, 10, 60))
        start = START_MS + rng.randrange(0, 3 * HOUR_MS // 1000, period) * 1000
        agg = Aggregate.of([rng.choice(VALUES) for _ in range(rng.randint(1, 4))])
        window = Window(rng.choice(("a", "b")), start, period, *(getattr(agg, f) for f in (
            "count", "sum", "min", "max", "first", "last", "sumsq", "rejected")))  # fmt: skip
        out.append((rng.randint(1, 2), rng.randint(1, 2), window))
    return out


def _bits(rows: Rollups) -> dict[tuple[int, int, int, int], tuple[object, ...]]:
    """Every field of every row, floats as their bytes (so -0.0 differs from 0.0)."""
    names = ("count", "sum", "min", "max", "first", "last", "sumsq", "rejected")
    out = {}
    for key, row in rows.items():
        values = [getattr(row, n) for n in names]
        fields = [struct.pack(">d", v) if isinstance(v, float) else v for v in values]
        out[key] = (*fields, row.first_at, row.last_at, row.parts)
    return out


def test_add_hourly_merges_as_add_window_to_the_bit() -> None:
    rng = random.Random(18)
    windows = _windows(rng, 3000)
    hourly: Rollups = {}
    reference: Rollups = {}
    for device_id, metric_id, w in windows:
        add_hourly(hourly, device_id, metric_id, w)
        add_window(reference, device_id, metric_id, w, HOUR_MS)
    assert len(reference) == 2 * 2 * 3 * 3  # devices, metrics, periods, hours
    assert _bits(hourly) == _bits(reference)
