"""Hourly and daily rollups, maintained incrementally inside the ingest transaction.

Windows are first merged in Python per (device, metric, period, bucket), then
one INSERT ... ON CONFLICT DO UPDATE merges those into the table: count, sum,
min, max and sum of squares merge exactly (associatively), first/last keep the
value with the earliest/latest window start. This one code path runs on both
TimescaleDB editions (the Apache build has no continuous aggregates).

Rows are sent sorted by key, so concurrent workers lock rollup rows in the
same order and cannot deadlock on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg
from psycopg import sql

from millrace.wire import Window

HOUR_SECONDS: Final = 3600
DAY_SECONDS: Final = 86_400
HOUR_MS: Final = HOUR_SECONDS * 1000
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

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
    """Merge finer rollup rows (e.g. hourly) into coarser buckets (e.g. daily)."""
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


def _ts(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


_UPSERT: Final = """
INSERT INTO {table} AS r (
    device_id, metric_id, period_s, bucket, windows, count, sum, min, max, sumsq,
    first, first_ts, last, last_ts, rejected)
SELECT * FROM unnest(
    %b::int4[], %b::int4[], %b::int4[], %b::timestamptz[], %b::int4[], %b::int8[],
    %b::float8[], %b::float8[], %b::float8[], %b::float8[],
    %b::float8[], %b::timestamptz[], %b::float8[], %b::timestamptz[], %b::int8[])
ON CONFLICT (device_id, metric_id, period_s, bucket) DO UPDATE SET
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
    rejected = r.rejected + excluded.rejected
"""


def upsert(cur: psycopg.Cursor[Any], table: str, rows: dict[RollupKey, Accumulator]) -> None:
    """Merge pre-aggregated rows into `table` with one statement."""
    if not rows:
        return
    keys = sorted(rows)
    accs = [rows[k] for k in keys]
    columns: list[list[object]] = [
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        [_ts(k[3]) for k in keys],
        [a.windows for a in accs],
        [a.count for a in accs],
        [a.sum for a in accs],
        [a.min for a in accs],
        [a.max for a in accs],
        [a.sumsq for a in accs],
        [a.first for a in accs],
        [_ts(a.first_ms) for a in accs],
        [a.last for a in accs],
        [_ts(a.last_ms) for a in accs],
        [a.rejected for a in accs],
    ]
    cur.execute(sql.SQL(_UPSERT).format(table=sql.Identifier(table)), columns)


def add_hourly(
    rows: dict[RollupKey, Accumulator], device_id: int, metric_id: int, w: Window
) -> None:
    """Merge one window into hourly rows (the writer calls this inside its COPY loop)."""
    key = (device_id, metric_id, w.period_s, w.start_ms - w.start_ms % HOUR_MS)
    acc = rows.get(key)
    if acc is None:
        rows[key] = Accumulator.of(w)
    else:
        acc.add(w)


def write_rollups(cur: psycopg.Cursor[Any], hourly: dict[RollupKey, Accumulator]) -> int:
    """Merge hourly rows (see `aggregate`) into both rollup tables; returns rows touched."""
    daily = rebucket(hourly, bucket_s=DAY_SECONDS)
    upsert(cur, "rollup_hourly", hourly)
    upsert(cur, "rollup_daily", daily)
    return len(hourly) + len(daily)
