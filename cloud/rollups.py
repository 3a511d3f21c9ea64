"""Hourly and daily rollups, maintained incrementally in two stages.

The ingest transaction merges its windows in Python per (device, metric, period, hour)
with the contract's merge (`millrace.wire.aggregate.Merging`, first/last by window
start) and COPYs those partials into `rollup_pending` (`copy_pending`): exactly once
with the readings, and no upsert on the committer's path. The drain
(cloud/ingest/rollup_drain.py) takes partials, merges them per key (`merge_partials`)
and `write_rollups` merges those into both tables in one statement: the hourly rows as
sent, the daily rows grouped from the same input on the server, with the same rules
(`MERGE_RULES`). Rows merge exactly in any grouping, so this one code path runs on both
TimescaleDB editions (the Apache build has no continuous aggregates).

`first` and `last` are ordered by window start. Two parts of one window (split by an
agent restart, `store_readings`) tie on it; the part stored later ended later, so it
gives `last` (and the earlier one keeps `first`), as in the merged readings row: the
rollups equal a recomputation from the readings (tests/cloud/test_rollup_exactly_once.py).
Partials of two commits tie the same way; `rollup_pending.id` says which was stored later.

Times stay epoch milliseconds until the server turns them into timestamps (no
`datetime` per row on the committer thread). Rows are sent sorted
by key, so concurrent workers lock rollup rows in the same order and cannot
deadlock on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import psycopg

from millrace.wire import Aggregate, Window
from millrace.wire.aggregate import MERGE_RULES, Merging

HOUR_SECONDS: Final = 3600
DAY_SECONDS: Final = 86_400
HOUR_MS: Final = HOUR_SECONDS * 1000
DAY_MS: Final = DAY_SECONDS * 1000

RollupKey = tuple[int, int, int, int]  # device_id, metric_id, period_s, bucket_ms


class RollupRow(Merging):
    """A rollup row: its windows merged (`parts`), `first_at`/`last_at` the first and last
    start. On a `last` tie (two parts of one split window, see the module doc) the part
    merged later gives `last`, as the SQL upserts' "later" rule (>=) does."""

    __slots__ = ()

    def add(self, part: Aggregate, first_at: int, last_at: int, *, parts: int = 1) -> None:
        """`Merging.add`, the later part winning a tie on `last`."""
        super().add(part, first_at, last_at, parts=parts)
        if last_at == self.last_at:
            self.last = part.last


Rollups = dict[RollupKey, RollupRow]


def add_window(rows: Rollups, device_id: int, metric_id: int, w: Window, bucket_ms: int) -> None:
    """Merge one window into its rollup row of `bucket_ms`."""
    start = w.start_ms
    key = (device_id, metric_id, w.period_s, start - start % bucket_ms)
    row = rows.get(key)
    if row is None:
        rows[key] = RollupRow(w, start, start)
    else:
        row.add(w, start, start)


def add_hourly(rows: Rollups, device_id: int, metric_id: int, w: Window) -> None:
    """Merge one window into its hourly row (the writer calls this inside its COPY loop).

    `add_window` for hours with `RollupRow.add` spelled out: it runs once per stored window,
    and the calls cost a seventh of it (tests/cloud/test_rollup_units.py holds them equal).
    """
    start = w.start_ms
    key = (device_id, metric_id, w.period_s, start - start % HOUR_MS)
    row = rows.get(key)
    if row is None:
        rows[key] = RollupRow(w, start, start)
        return
    row.parts += 1
    row.count += w.count
    row.sum += w.sum
    row.sumsq += w.sumsq
    row.rejected += w.rejected
    if w.min < row.min:
        row.min = w.min
    if w.max > row.max:
        row.max = w.max
    if start < row.first_at:
        row.first, row.first_at = w.first, start
    if start >= row.last_at:  # on a tie, the later part of a split window (module doc)
        row.last, row.last_at = w.last, start


def aggregate(windows: Iterable[tuple[int, int, Window]], *, bucket_s: int) -> Rollups:
    """Rollup rows of `bucket_s` from (device_id, metric_id, window) triples."""
    rows: Rollups = {}
    for device_id, metric_id, w in windows:
        add_window(rows, device_id, metric_id, w, bucket_s * 1000)
    return rows


def rebucket(rows: Rollups, *, bucket_s: int) -> Rollups:
    """Merge finer rollup rows (e.g. hourly) into coarser buckets (e.g. daily), in Python.

    The writer leaves this to the server (see `write_rollups`); this is the same merge,
    for tests and tools.
    """
    bucket_ms = bucket_s * 1000
    out: Rollups = {}
    for (device_id, metric_id, period_s, start_ms), row in rows.items():
        key = (device_id, metric_id, period_s, start_ms - start_ms % bucket_ms)
        part, into = row.result(), out.get(key)
        if into is None:
            out[key] = RollupRow(part, row.first_at, row.last_at, parts=row.parts)
        else:
            into.add(part, row.first_at, row.last_at, parts=row.parts)
    return out


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
        "later": "{c} = CASE WHEN excluded.{c}_ts >= r.{c}_ts THEN excluded.{c} ELSE r.{c} END,"
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


def write_rollups(cur: psycopg.Cursor[Any], hourly: Rollups) -> int:
    """Merge hourly rows (see `add_hourly`) into both rollup tables; returns rows touched."""
    if not hourly:
        return 0
    keys = sorted(hourly)
    rows = [hourly[k] for k in keys]
    columns: list[list[Any]] = [list(c) for c in zip(*keys, strict=True)]
    columns += [
        [r.parts for r in rows],
        [r.count for r in rows],
        [r.sum for r in rows],
        [r.min for r in rows],
        [r.max for r in rows],
        [r.sumsq for r in rows],
        [r.first for r in rows],
        [r.first_at for r in rows],
        [r.last for r in rows],
        [r.last_at for r in rows],
        [r.rejected for r in rows],
    ]
    cur.execute(_UPSERT_BOTH, columns)
    return len(hourly) + max(cur.rowcount, 0)  # rowcount: the daily rows


# rollup_pending's columns as the writer COPYs them (id and committed_at: the server's).
PENDING_COLUMNS: Final = (
    "device_id", "metric_id", "period_s", "bucket_ms", "windows", "count", "sum", "min",
    "max", "sumsq", "first", "first_ms", "last", "last_ms", "rejected",
)  # fmt: skip
PENDING_TYPES: Final = (
    "int4", "int4", "int4", "int8", "int4", "int8", "float8", "float8",
    "float8", "float8", "float8", "int8", "float8", "int8", "int8",
)  # fmt: skip


def copy_pending(cur: psycopg.Cursor[Any], hourly: Rollups) -> int:
    """COPY hourly partials into `rollup_pending` (the ingest transaction's rollup step).

    No conflict to check: every commit adds rows, the drain merges them. Returns rows.
    """
    if not hourly:
        return 0
    statement = f"COPY rollup_pending ({', '.join(PENDING_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
    with cur.copy(statement) as copy:
        copy.set_types(list(PENDING_TYPES))
        for key, r in hourly.items():
            row = (
                *key, r.parts, r.count, r.sum, r.min, r.max, r.sumsq, r.first, r.first_at,
                r.last, r.last_at, r.rejected,
            )  # fmt: skip
            copy.write_row(row)
    return len(hourly)


def merge_partials(rows: Iterable[tuple[Any, ...]]) -> Rollups:
    """Merge `rollup_pending` rows (id first, then `PENDING_COLUMNS`) into one row per key.

    Merged in id order, so on a `last` tie (two parts of one split window) the partial
    stored later gives `last`, as `add_window` does within one commit.
    """
    out: Rollups = {}
    for row in sorted(rows):
        (_, device_id, metric_id, period_s, bucket_ms, windows, count, total, low, high,
         sumsq, first, first_ms, last, last_ms, rejected) = row  # fmt: skip
        part = Aggregate(count, total, low, high, first, last, sumsq, rejected)
        key = (device_id, metric_id, period_s, bucket_ms)
        into = out.get(key)
        if into is None:
            out[key] = RollupRow(part, first_ms, last_ms, parts=windows)
        else:
            into.add(part, first_ms, last_ms, parts=windows)
    return out
