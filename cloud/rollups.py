"""Hourly and daily rollups, maintained incrementally inside the ingest transaction.

Windows are first merged in Python per (device, metric, period, hour), then one
statement merges those into both tables: the hourly rows as sent, the daily rows
grouped from the same input on the server. Count, sum, min, max and sum of
squares merge exactly (associatively), first/last keep the value with the
earliest/latest window start. This one code path runs on both TimescaleDB
editions (the Apache build has no continuous aggregates).

Times stay epoch milliseconds until the server turns them into timestamps (no
`datetime` per row on the committer thread). Rows are sent sorted
by key, so concurrent workers lock rollup rows in the same order and cannot
deadlock on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Final

import psycopg

from millrace.wire import Window

HOUR_SECONDS: Final = 3600
DAY_SECONDS: Final = 86_400
HOUR_MS: Final = HOUR_SECONDS * 1000
DAY_MS: Final = DAY_SECONDS * 1000

RollupKey = tuple[int, int, int, int]  # device_id, metric_id, period_s, bucket_ms


@dataclass(slots=True)
class Accumulator:
    """Running exact-merge aggregates of one rollup row."""

    windows: int
    count: int
    sum: float
    min: float
    max: float
    sumsq: float
    first: float
    first_ms: int
    last: float
    last_ms: int
    rejected: int

    @classmethod
    def of(cls, w: Window) -> Accumulator:
        return cls(
            1, w.count, w.sum, w.min, w.max, w.sumsq, w.first, w.start_ms, w.last, w.start_ms,
            w.rejected,
        )  # fmt: skip

    def add(self, w: Window) -> None:
        self.windows += 1
        self.count += w.count
        self.sum += w.sum
        self.sumsq += w.sumsq
        self.rejected += w.rejected
        if w.min < self.min:
            self.min = w.min
        if w.max > self.max:
            self.max = w.max
        if w.start_ms < self.first_ms:
            self.first, self.first_ms = w.first, w.start_ms
        if w.start_ms > self.last_ms:
            self.last, self.last_ms = w.last, w.start_ms

    def merge(self, other: Accumulator) -> None:
        self.windows += other.windows
        self.count += other.count
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.rejected += other.rejected
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        if other.first_ms < self.first_ms:
            self.first, self.first_ms = other.first, other.first_ms
        if other.last_ms > self.last_ms:
            self.last, self.last_ms = other.last, other.last_ms


def aggregate(
    windows: Iterable[tuple[int, int, Window]], *, bucket_s: int
) -> dict[RollupKey, Accumulator]:
    """Merge (device_id, metric_id, window) triples into rollup rows of `bucket_s`."""
    bucket_ms = bucket_s * 1000
    rows: dict[RollupKey, Accumulator] = {}
    for device_id, metric_id, w in windows:
        key = (device_id, metric_id, w.period_s, w.start_ms - w.start_ms % bucket_ms)
        acc = rows.get(key)
        if acc is None:
            rows[key] = Accumulator.of(w)
        else:
            acc.add(w)
    return rows


def rebucket(rows: dict[RollupKey, Accumulator], *, bucket_s: int) -> dict[RollupKey, Accumulator]:
    """Merge finer rollup rows (e.g. hourly) into coarser buckets (e.g. daily), in Python.

    The writer leaves this to the server (see `write_rollups`); this is the same merge,
    for tests and tools.
    """
    bucket_ms = bucket_s * 1000
    out: dict[RollupKey, Accumulator] = {}
    for (device_id, metric_id, period_s, start_ms), acc in rows.items():
        key = (device_id, metric_id, period_s, start_ms - start_ms % bucket_ms)
        into = out.get(key)
        if into is None:
            out[key] = replace(acc)
        else:
            into.merge(acc)
    return out


def add_hourly(
    rows: dict[RollupKey, Accumulator], device_id: int, metric_id: int, w: Window
) -> None:
    """Merge one window into hourly rows (the writer calls this inside its COPY loop).

    `Accumulator.add` inlined: this runs once per stored window on the committer thread.
    """
    start = w.start_ms
    key = (device_id, metric_id, w.period_s, start - start % HOUR_MS)
    acc = rows.get(key)
    if acc is None:
        rows[key] = Accumulator(
            1, w.count, w.sum, w.min, w.max, w.sumsq, w.first, start, w.last, start, w.rejected
        )
        return
    acc.windows += 1
    acc.count += w.count
    acc.sum += w.sum
    acc.sumsq += w.sumsq
    acc.rejected += w.rejected
    if w.min < acc.min:
        acc.min = w.min
    if w.max > acc.max:
        acc.max = w.max
    if start < acc.first_ms:
        acc.first, acc.first_ms = w.first, start
    elif start > acc.last_ms:  # first_ms <= last_ms, so at most one of the two
        acc.last, acc.last_ms = w.last, start


# Epoch milliseconds become timestamps on the server: bigint * interval '1 ms' goes through
# float8, which holds every millisecond count below 2**53 (year 287,396) exactly.
_MS: Final = "timestamptz 'epoch' + {col} * interval '1 millisecond'"
_MERGE_SET: Final = """
    windows = r.windows + excluded.windows,
    count = r.count + excluded.count,
    sum = r.sum + excluded.sum,
    min = least(r.min, excluded.min),
    max = greatest(r.max, excluded.max),
    sumsq = r.sumsq + excluded.sumsq,
    first = CASE WHEN excluded.first_ts < r.first_ts THEN excluded.first ELSE r.first END,
    first_ts = least(r.first_ts, excluded.first_ts),
    last = CASE WHEN excluded.last_ts > r.last_ts THEN excluded.last ELSE r.last END,
    last_ts = greatest(r.last_ts, excluded.last_ts),
    rejected = r.rejected + excluded.rejected"""
_COLUMNS: Final = """device_id, metric_id, period_s, bucket, windows, count, sum, min, max, sumsq,
    first, first_ts, last, last_ts, rejected"""

# One statement, one round trip: `src` is the hourly rows as sent (sorted by key); the
# hourly upsert stores them as they are and the daily one groups them by UTC day. Within a
# day the hourly rows' first/last times are distinct (each lies inside its own hour), so
# ordering by them picks the same value as merging in Python would.
_UPSERT_BOTH: Final = f"""
WITH src AS (
    SELECT * FROM unnest(
        %b::int4[], %b::int4[], %b::int4[], %b::int8[], %b::int4[], %b::int8[],
        %b::float8[], %b::float8[], %b::float8[], %b::float8[],
        %b::float8[], %b::int8[], %b::float8[], %b::int8[], %b::int8[])
        AS s(device_id, metric_id, period_s, bucket_ms, windows, count, sum, min, max, sumsq,
             first, first_ms, last, last_ms, rejected)
), hourly AS (
    INSERT INTO rollup_hourly AS r ({_COLUMNS})
    SELECT device_id, metric_id, period_s, {_MS.format(col="bucket_ms")}, windows, count,
           sum, min, max, sumsq, first, {_MS.format(col="first_ms")}, last,
           {_MS.format(col="last_ms")}, rejected
      FROM src
    ON CONFLICT (device_id, metric_id, period_s, bucket) DO UPDATE SET {_MERGE_SET}
)
INSERT INTO rollup_daily AS r ({_COLUMNS})
SELECT device_id, metric_id, period_s, {_MS.format(col="day_ms")}, sum(windows)::int4,
       sum(count)::int8, sum(sum), min(min), max(max), sum(sumsq),
       (array_agg(first ORDER BY first_ms))[1], {_MS.format(col="min(first_ms)")},
       (array_agg(last ORDER BY last_ms DESC))[1], {_MS.format(col="max(last_ms)")},
       sum(rejected)::int8
  FROM (SELECT *, bucket_ms - bucket_ms %% {DAY_MS} AS day_ms FROM src) AS d
 GROUP BY device_id, metric_id, period_s, day_ms
 ORDER BY device_id, metric_id, period_s, day_ms
ON CONFLICT (device_id, metric_id, period_s, bucket) DO UPDATE SET {_MERGE_SET}
"""


def write_rollups(cur: psycopg.Cursor[Any], hourly: dict[RollupKey, Accumulator]) -> int:
    """Merge hourly rows (see `add_hourly`) into both rollup tables; returns rows touched."""
    if not hourly:
        return 0
    keys = sorted(hourly)
    accs = [hourly[k] for k in keys]
    columns: list[list[Any]] = [list(c) for c in zip(*keys, strict=True)]
    columns += [
        [a.windows for a in accs],
        [a.count for a in accs],
        [a.sum for a in accs],
        [a.min for a in accs],
        [a.max for a in accs],
        [a.sumsq for a in accs],
        [a.first for a in accs],
        [a.first_ms for a in accs],
        [a.last for a in accs],
        [a.last_ms for a in accs],
        [a.rejected for a in accs],
    ]
    cur.execute(_UPSERT_BOTH, columns)
    return len(hourly) + max(cur.rowcount, 0)  # rowcount: the daily rows
