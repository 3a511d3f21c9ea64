"""Hourly and daily rollups, maintained incrementally inside the ingest transaction.

The writer collects each transaction's windows per (device, metric, period, hour);
`write_rollups` merges every hour's windows in time order with the contract's merge
(`millrace.wire.merge_all`), then one statement merges those rows into both tables:
the hourly rows as sent, the daily rows grouped from the same input on the server. The
server merges with the same rules (`MERGE_RULES`), first/last by their times, so rows
merge exactly in any grouping. This one code path runs on both TimescaleDB editions
(the Apache build has no continuous aggregates).

Times stay epoch milliseconds until the server turns them into timestamps (no
`datetime` per row on the committer thread). Rows are sent sorted
by key, so concurrent workers lock rollup rows in the same order and cannot
deadlock on them.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from millrace.wire import Aggregate, Window, merge_all
from millrace.wire.aggregate import MERGE_RULES

HOUR_SECONDS: Final = 3600
DAY_SECONDS: Final = 86_400
HOUR_MS: Final = HOUR_SECONDS * 1000
DAY_MS: Final = DAY_SECONDS * 1000

RollupKey = tuple[int, int, int, int]  # device_id, metric_id, period_s, bucket_ms
# A transaction's windows per hourly key, in the order they were stored.
Hourly = dict[RollupKey, list[Window]]

_START_MS: Final = operator.attrgetter("start_ms")


@dataclass(frozen=True, slots=True)
class Rollup:
    """One rollup row: the merge of `windows` windows, and when its first and last began."""

    aggregate: Aggregate
    windows: int
    first_ms: int
    last_ms: int


def rollup(windows: Iterable[Window]) -> Rollup:
    """Merge one bucket's windows in time order (windows that start together keep theirs)."""
    ordered = sorted(windows, key=_START_MS)
    return Rollup(merge_all(ordered), len(ordered), ordered[0].start_ms, ordered[-1].start_ms)


def add_hourly(rows: Hourly, device_id: int, metric_id: int, w: Window) -> None:
    """File one window under its hourly key (the writer calls this inside its COPY loop).

    Only a list append per window: the merge runs once per hour row, in `write_rollups`.
    """
    start = w.start_ms
    key = (device_id, metric_id, w.period_s, start - start % HOUR_MS)
    windows = rows.get(key)
    if windows is None:
        rows[key] = [w]
    else:
        windows.append(w)


def aggregate(
    windows: Iterable[tuple[int, int, Window]], *, bucket_s: int
) -> dict[RollupKey, Rollup]:
    """Rollup rows of `bucket_s` from (device_id, metric_id, window) triples."""
    bucket_ms = bucket_s * 1000
    groups: dict[RollupKey, list[Window]] = {}
    for device_id, metric_id, w in windows:
        key = (device_id, metric_id, w.period_s, w.start_ms - w.start_ms % bucket_ms)
        groups.setdefault(key, []).append(w)
    return {key: rollup(group) for key, group in groups.items()}


def rebucket(rows: dict[RollupKey, Rollup], *, bucket_s: int) -> dict[RollupKey, Rollup]:
    """Merge finer rollup rows (e.g. hourly) into coarser buckets (e.g. daily), in Python.

    The writer leaves this to the server (see `write_rollups`); this is the same merge,
    for tests and tools.
    """
    bucket_ms = bucket_s * 1000
    groups: dict[RollupKey, list[Rollup]] = {}
    for (device_id, metric_id, period_s, start_ms), row in sorted(rows.items()):
        key = (device_id, metric_id, period_s, start_ms - start_ms % bucket_ms)
        groups.setdefault(key, []).append(row)
    return {
        key: Rollup(
            merge_all(r.aggregate for r in group),
            sum(r.windows for r in group),
            group[0].first_ms,
            group[-1].last_ms,
        )
        for key, group in groups.items()
    }


# Epoch milliseconds become timestamps on the server: bigint * interval '1 ms' goes through
# float8, which holds every millisecond count below 2**53 (year 287,396) exactly.
_MS: Final = "timestamptz 'epoch' + {col} * interval '1 millisecond'"


def _merge_set() -> str:
    """ON CONFLICT assignments: the contract's merge rules, first/last by their times."""
    by_rule = {
        "add": "{c} = r.{c} + excluded.{c}",
        "least": "{c} = least(r.{c}, excluded.{c})",
        "greatest": "{c} = greatest(r.{c}, excluded.{c})",
        "earlier": "{c} = CASE WHEN excluded.{c}_ts < r.{c}_ts THEN excluded.{c} ELSE r.{c} END,"
        " {c}_ts = least(r.{c}_ts, excluded.{c}_ts)",
        "later": "{c} = CASE WHEN excluded.{c}_ts > r.{c}_ts THEN excluded.{c} ELSE r.{c} END,"
        " {c}_ts = greatest(r.{c}_ts, excluded.{c}_ts)",
    }
    sets = ["windows = r.windows + excluded.windows"]
    sets += [by_rule[rule].format(c=column) for column, rule in MERGE_RULES.items()]
    return ",\n    ".join(sets)


_MERGE_SET: Final = _merge_set()
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


def write_rollups(cur: psycopg.Cursor[Any], hourly: Hourly) -> int:
    """Merge each hour's windows (`add_hourly`) into both rollup tables; returns rows touched."""
    if not hourly:
        return 0
    keys = sorted(hourly)
    rows = [rollup(hourly[k]) for k in keys]
    aggs = [r.aggregate for r in rows]
    columns: list[list[Any]] = [list(c) for c in zip(*keys, strict=True)]
    columns += [
        [r.windows for r in rows],
        [a.count for a in aggs],
        [a.sum for a in aggs],
        [a.min for a in aggs],
        [a.max for a in aggs],
        [a.sumsq for a in aggs],
        [a.first for a in aggs],
        [r.first_ms for r in rows],
        [a.last for a in aggs],
        [r.last_ms for r in rows],
        [a.rejected for a in aggs],
    ]
    cur.execute(_UPSERT_BOTH, columns)
    return len(hourly) + max(cur.rowcount, 0)  # rowcount: the daily rows
