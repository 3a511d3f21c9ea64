"""Packing: windows past an age move from `readings` into `readings_packed`, an hour a row.

On the Apache edition of TimescaleDB there is no native compression, and a stored
window costs about 190 bytes in `readings`. `pack_windows` moves every `readings`
chunk whose whole time range is older than the age into rows of arrays, one per
(device, metric, period, UTC hour), that TOAST compresses (cloud/schema/packed.py):
under 30 bytes a window. Where the Timescale License edition runs,
`storage_at_rest` says native compression does this job instead and packing is not run.

The work is per chunk so that a run reads each stored window once: chunks to pack
are found in TimescaleDB's catalog (non-empty by file size, no data read), and each
is one transaction: lock the chunk against writers (readers go on), read it whole
into a session temp table, take out the packed rows of the hours it touches (late
windows for an hour packed before), write each hour back as one merged row, and
TRUNCATE the chunk (no row-by-row DELETE, no dead tuples). A run that dies anywhere
leaves both tables as they were before that chunk; chunks committed before stay
packed. A window arriving late for a packed hour is stored in its (emptied) chunk by
the ingest as usual; readers union both forms (dashboards/queries.py), and the next
run merges it into its hour's row with the contract's merge rules, reading only the
late windows, so it is counted once in either state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

import psycopg
from psycopg import sql
from sqlalchemy.dialects import postgresql

from millrace.cloud.schema.core import readings
from millrace.wire.aggregate import AGGREGATE_FIELDS, MERGE_RULES

logger = logging.getLogger(__name__)

DEFAULT_PACK_AFTER_DAYS: Final = 1.0
# Packing a chunk holds off the ingest's late writes to that chunk only; this bounds our
# wait behind a writer (the chunk is skipped and retried next run) or a DDL.
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
    """What one run did: windows taken from `readings`, hour rows written, chunks emptied
    (one transaction each), and chunks left for the next run (busy or holding odd rows)."""

    windows: int = 0
    hours: int = 0
    chunks: int = 0
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk of `readings`: its table and time range."""

    schema: str
    name: str
    start: datetime
    end: datetime


class _OffGrid(Exception):
    """The chunk holds windows whose start is off its period's grid: it cannot be packed."""


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
# Chunks wholly before the cutoff with a non-empty file: catalog and file sizes only.
# An emptied (truncated) chunk has no file pages; a late window gives it some again.
_CHUNKS: Final = """
SELECT k.chunk_schema, k.chunk_name, k.range_start, k.range_end
FROM timescaledb_information.chunks k
JOIN pg_namespace n ON n.nspname = k.chunk_schema
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = k.chunk_name
WHERE k.hypertable_schema = current_schema() AND k.hypertable_name = 'readings'
  AND k.range_end <= %s AND pg_relation_size(c.oid) > 0
ORDER BY k.range_start
"""
_PARTS_CREATE: Final = f"""
CREATE TEMP TABLE IF NOT EXISTS packing_parts ON COMMIT DELETE ROWS AS
SELECT 0::smallint AS part, {_COLUMN_LIST} FROM readings WITH NO DATA
"""
# The one read of the chunk's windows.
_READ_CHUNK: Final = f"INSERT INTO packing_parts SELECT 1, {_COLUMN_LIST} FROM {{}}"
# A window start off its period's grid (the wire refuses them, so only a hand-made row)
# has no slot in an hour row.
_OFF_GRID: Final = """
SELECT count(*) FROM packing_parts
WHERE mod(3600, period_s) <> 0 OR mod(extract(epoch FROM ts), period_s) <> 0
"""
# The packed rows of the chunk's hours, bounded to them so no other day's chunk is read.
_UNPACK_TOUCHED: Final = f"""
WITH touched AS (
    DELETE FROM readings_packed p
    USING (SELECT DISTINCT device_id, metric_id, period_s, time_bucket('1 hour', ts) AS hour
           FROM packing_parts) k
    WHERE p.device_id = k.device_id AND p.metric_id = k.metric_id
      AND p.period_s = k.period_s AND p.hour = k.hour
      AND p.hour >= %(first_hour)s AND p.hour < %(end)s
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


def _floor_hour(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def chunks_to_pack(conn: psycopg.Connection[Any], older_than: datetime) -> list[Chunk]:
    """`readings` chunks wholly before `older_than` that hold rows, oldest first."""
    return [Chunk(*row) for row in conn.execute(_CHUNKS, (older_than,)).fetchall()]


def pack_chunk(
    conn: psycopg.Connection[Any], chunk: Chunk, *, lock_timeout: str = LOCK_TIMEOUT
) -> tuple[int, int]:
    """Pack one chunk in one transaction: (windows moved, hour rows written).

    EXCLUSIVE mode lets readers of the chunk go on while holding off writers, so no
    window committed after the read is truncated with the rest.
    """
    table = sql.Identifier(chunk.schema, chunk.name)
    bounds = {"first_hour": _floor_hour(chunk.start), "end": chunk.end}
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(lock_timeout)))
        conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(table))
        conn.execute(_PARTS_CREATE)
        moved = conn.execute(sql.SQL(_READ_CHUNK).format(table)).rowcount
        written = 0
        if moved:
            row = conn.execute(_OFF_GRID).fetchone()
            if row and row[0]:
                raise _OffGrid(f"{row[0]} windows")
            conn.execute(_UNPACK_TOUCHED, bounds)
            written = conn.execute(_WRITE_PACKED).rowcount
        conn.execute(sql.SQL("TRUNCATE {}").format(table))
    return moved, written


def pack_windows(
    conn: psycopg.Connection[Any],
    *,
    older_than: datetime,
    lock_timeout: str = LOCK_TIMEOUT,
    should_stop: Callable[[], bool] = lambda: False,
) -> PackReport:
    """Pack every `readings` chunk wholly before `older_than`, oldest first, one per transaction.

    `should_stop` is asked between chunks, so a stopping worker leaves after the
    current one. A chunk busy past `lock_timeout` is skipped and retried next run.
    """
    windows = written = packed = skipped = 0
    for chunk in chunks_to_pack(conn, older_than):
        if should_stop():
            break
        try:
            moved, rows = pack_chunk(conn, chunk, lock_timeout=lock_timeout)
        except psycopg.errors.LockNotAvailable:
            logger.warning("packing: chunk %s is busy (lock timeout), retried next run", chunk.name)
            skipped += 1
            continue
        except _OffGrid as exc:
            logger.warning(
                "packing: chunk %s left hot: %s start off their period's grid (not written by"
                " the ingest); delete or correct them",
                chunk.name,
                exc,
            )
            skipped += 1
            continue
        windows, written, packed = windows + moved, written + rows, packed + 1
    if windows:
        logger.info("packing: %s windows into %s hour rows before %s", windows, written, older_than)
    return PackReport(windows, written, packed, skipped)
