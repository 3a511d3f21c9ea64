"""Packing: windows past an age move from `readings` into `readings_packed`, an hour a row.

On the Apache edition of TimescaleDB there is no native compression, and a stored
window costs about 190 bytes in `readings`. `pack_windows` moves every complete UTC
hour older than the age, per (device, metric, period), into one row of arrays that
TOAST compresses (cloud/schema/packed.py): under 30 bytes a window. Where the
Timescale License edition runs, `storage_at_rest` says native compression does this
job instead and packing is not run.

Each chunk of hours is one transaction of three statements: move the hot rows into
a session temp table, take out the packed rows of the hours they belong to (late
windows for an hour packed before), and write each hour back as one merged row. A
run that dies anywhere leaves both tables as they were before that chunk; chunks
committed before stay packed, and the next run goes on from there. A window arriving
late for a packed hour is stored in `readings` by the ingest as usual; readers union
both forms (dashboards/queries.py), and the next run merges it into its hour's row
with the contract's merge rules, so it is counted once in either state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import psycopg
from psycopg import sql
from sqlalchemy.dialects import postgresql

from millrace.cloud.schema.core import readings
from millrace.wire.aggregate import AGGREGATE_FIELDS, MERGE_RULES

logger = logging.getLogger(__name__)

DEFAULT_PACK_AFTER_DAYS: Final = 1.0
# One hour of the whole plant per transaction: bounded work lost if a run dies.
DEFAULT_HOURS_PER_TRANSACTION: Final = 1
HOUR: Final = timedelta(hours=1)
# Moving rows takes no lock ingest waits on; this only bounds a wait behind a DDL.
LOCK_TIMEOUT: Final = "5s"

StorageForm = Literal["pack", "native_compression"]

_KEY: Final = ("ts", "device_id", "metric_id", "period_s")
_COLUMNS: Final = (*_KEY, *AGGREGATE_FIELDS)
_PG_TYPES: Final = {
    f: readings.c[f].type.compile(dialect=postgresql.dialect()) for f in AGGREGATE_FIELDS
}


def storage_at_rest(license_name: str) -> StorageForm:
    """How old windows shrink on this edition: TimescaleDB's own compression where licensed."""
    return "native_compression" if license_name == "timescale" else "pack"


@dataclass(frozen=True, slots=True)
class PackReport:
    """What one run moved: windows taken from `readings`, hour rows written, transactions."""

    windows: int = 0
    hours: int = 0
    transactions: int = 0


def _merge(field: str) -> str:
    """One field of a window merged over its parts (0 = the packed part, stored first)."""
    rule = MERGE_RULES[field]
    if rule == "add":
        return f"sum({field})::{_PG_TYPES[field]}"
    if rule == "least":
        return f"min({field})"
    if rule == "greatest":
        return f"max({field})"
    order = "part" if rule == "earlier" else "part DESC"
    return f"(array_agg({field} ORDER BY {order}))[1]"


_COLUMN_LIST: Final = ", ".join(_COLUMNS)
_PARTS_CREATE: Final = f"""
CREATE TEMP TABLE IF NOT EXISTS packing_parts ON COMMIT DELETE ROWS AS
SELECT 0::smallint AS part, {_COLUMN_LIST} FROM readings WITH NO DATA
"""
# Rows a window start not on its period grid (never written by the ingest) stay hot:
# a slot could not say where they start.
_MOVE_HOT: Final = f"""
WITH moved AS (
    DELETE FROM readings
    WHERE ts >= %(start)s AND ts < %(end)s
      AND mod(3600, period_s) = 0 AND mod(extract(epoch FROM ts), period_s) = 0
    RETURNING {_COLUMN_LIST}
)
INSERT INTO packing_parts SELECT 1, {_COLUMN_LIST} FROM moved
"""
_UNPACK_TOUCHED: Final = f"""
WITH touched AS (
    DELETE FROM readings_packed p
    USING (SELECT DISTINCT device_id, metric_id, period_s, time_bucket('1 hour', ts) AS hour
           FROM packing_parts) k
    WHERE p.device_id = k.device_id AND p.metric_id = k.metric_id
      AND p.period_s = k.period_s AND p.hour = k.hour
    RETURNING p.*
)
INSERT INTO packing_parts
SELECT 0, t.hour + make_interval(secs => coalesce(w.slot, w.i - 1) * t.period_s),
       t.device_id, t.metric_id, t.period_s, {", ".join(f"w.{f}" for f in AGGREGATE_FIELDS)}
FROM touched t,
     unnest(t.slots, {", ".join(f"t.{f}" for f in AGGREGATE_FIELDS)})
         WITH ORDINALITY AS w(slot, {", ".join(AGGREGATE_FIELDS)}, i)
"""
_SLOT: Final = "(extract(epoch FROM ts - time_bucket('1 hour', ts)) / period_s)::smallint"
_WRITE_PACKED: Final = f"""
INSERT INTO readings_packed
    (hour, device_id, metric_id, period_s, windows, slots, {", ".join(AGGREGATE_FIELDS)})
SELECT time_bucket('1 hour', ts), device_id, metric_id, period_s, count(*),
       CASE WHEN count(*) = 3600 / period_s THEN NULL
            ELSE array_agg({_SLOT} ORDER BY ts) END,
       {", ".join(f"array_agg({f} ORDER BY ts)" for f in AGGREGATE_FIELDS)}
FROM (SELECT {", ".join(_KEY)}, {", ".join(f"{_merge(f)} AS {f}" for f in AGGREGATE_FIELDS)}
      FROM packing_parts GROUP BY {", ".join(_KEY)}) AS windows
GROUP BY 1, device_id, metric_id, period_s
"""
_HOT_HOURS: Final = (
    "SELECT DISTINCT time_bucket('1 hour', ts) AS hour FROM readings WHERE ts < %s ORDER BY 1"
)


def _floor_hour(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _chunks(hours: list[datetime], size: int) -> list[tuple[datetime, datetime]]:
    """Ranges [first, last + 1 h) of up to `size` consecutive hot hours."""
    return [
        (hours[i], hours[min(i + size, len(hours)) - 1] + HOUR) for i in range(0, len(hours), size)
    ]


def pack_chunk(
    conn: psycopg.Connection[Any], start: datetime, end: datetime, *, lock_timeout: str
) -> tuple[int, int]:
    """Pack the hot windows in [start, end) in one transaction: (windows moved, hour rows)."""
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(lock_timeout)))
        conn.execute(_PARTS_CREATE)
        moved = conn.execute(_MOVE_HOT, {"start": start, "end": end}).rowcount
        if moved == 0:
            return 0, 0
        conn.execute(_UNPACK_TOUCHED)
        written = conn.execute(_WRITE_PACKED).rowcount
    return moved, written


def pack_windows(
    conn: psycopg.Connection[Any],
    *,
    older_than: datetime,
    hours_per_transaction: int = DEFAULT_HOURS_PER_TRANSACTION,
    lock_timeout: str = LOCK_TIMEOUT,
    should_stop: Callable[[], bool] = lambda: False,
) -> PackReport:
    """Pack every complete UTC hour before `older_than`, oldest first, a chunk per transaction.

    `should_stop` is asked between chunks, so a stopping worker leaves after the
    current one. Hours already packed are only touched again when late windows came.
    """
    if hours_per_transaction < 1:
        raise ValueError("hours_per_transaction must be >= 1")
    cutoff = _floor_hour(older_than)
    hours = [row[0] for row in conn.execute(_HOT_HOURS, (cutoff,)).fetchall()]
    windows = written = transactions = 0
    for start, end in _chunks(hours, hours_per_transaction):
        if should_stop():
            break
        moved, rows = pack_chunk(conn, start, end, lock_timeout=lock_timeout)
        windows, written, transactions = windows + moved, written + rows, transactions + 1
    if windows:
        logger.info("packing: %s windows into %s hour rows before %s", windows, written, cutoff)
    return PackReport(windows, written, transactions)
