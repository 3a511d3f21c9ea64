"""Packing: windows past an age move from `readings` into `readings_packed`, an hour a row.

On the Apache edition of TimescaleDB there is no native compression, and a stored
window costs about 190 bytes in `readings`. `pack_windows` moves every `readings`
chunk whose whole time range is older than the age into rows of arrays, one per
(device, metric, period, UTC hour), that TOAST compresses (cloud/schema/packed.py):
under 30 bytes a window. Where the Timescale License edition runs,
`storage_at_rest` says native compression does this job instead and packing is not run.

The work is per chunk so that a run reads each stored window once: chunks to pack
are found in TimescaleDB's catalog (non-empty by file size, no data read), and each
is one REPEATABLE READ transaction that takes no lock holding off the ingest: one
statement deletes the chunk's rows of its snapshot and returns them into a session
temp table (the one read of the chunk), then the packed rows of the hours it touches
are taken out (late windows for an hour packed before), and each hour is written back
as one merged row. Readers see the hot rows or the packed ones, never both nor neither.

Late writes during a pack: a window the ingest stores in the chunk after the snapshot is
not in it, so it stays hot for the next run. A window of the snapshot the ingest merges
into (the rest of a window an agent closed early) fails the DELETE with a serialization
failure, or a lock wait past `lock_timeout`: the chunk is rolled back, skipped and
retried next run. Only a rest of a window whose first part the DELETE has already taken
waits, for the pack's commit, as it waited for the whole pack before.

After the commit `VACUUM` reclaims the dead rows, truncating an emptied chunk to no
pages, so the next run does not select it (one more read of the chunk; it needs the
chunk's owner before PostgreSQL 17). Where the packing role may not, autovacuum does
it, and until then the statistics' zero live rows keep the chunk unselected. A run that
dies anywhere leaves both tables as they were before that chunk; chunks committed
before stay packed. Readers union both forms (dashboards/queries.py), and the next run
merges late windows into their hour's row with the contract's merge rules, reading only
the late windows, so each is counted once in either state.
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
# Packing takes no lock that holds writers off, but its DELETE waits for a row an
# ingest is merging into, and for a packed row another session holds: this bounds the
# wait (the chunk is skipped and retried next run).
LOCK_TIMEOUT: Final = "5s"
# Releasing an emptied chunk's index pages takes its ACCESS EXCLUSIVE lock for a size
# check and a TRUNCATE: readers and writers queue behind our wait, so it is short.
RELEASE_LOCK_TIMEOUT: Final = "200ms"

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
    """One chunk of `readings`: its table, time range and whether this role may VACUUM it."""

    schema: str
    name: str
    start: datetime
    end: datetime
    owned: bool = False


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
# Chunks wholly before the cutoff with a non-empty file: catalog, file sizes and
# statistics only. VACUUM leaves an emptied chunk no pages; a late window gives it some
# again. Until a vacuum has run (the packing role may not own the chunk), the counts of
# live and dead rows tell an emptied chunk: the DELETE's commit and any late window's
# commit update them (the next run is an hour later; a reset leaves 0 dead rows, so the
# chunk is read once more, which is only a cost).
_CHUNKS: Final = """
SELECT k.chunk_schema, k.chunk_name, k.range_start, k.range_end,
       pg_has_role(c.relowner, 'USAGE')
FROM timescaledb_information.chunks k
JOIN pg_namespace n ON n.nspname = k.chunk_schema
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = k.chunk_name
WHERE k.hypertable_schema = current_schema() AND k.hypertable_name = 'readings'
  AND k.range_end <= %s AND pg_relation_size(c.oid) > 0
  AND NOT (pg_stat_get_live_tuples(c.oid) = 0 AND pg_stat_get_dead_tuples(c.oid) > 0)
ORDER BY k.range_start
"""
# Chunks VACUUM left no heap pages that still hold index pages past each index's
# metapage: a btree never gives its pages back, TRUNCATE does.
_EMPTIED: Final = """
SELECT k.chunk_schema, k.chunk_name
FROM timescaledb_information.chunks k
JOIN pg_namespace n ON n.nspname = k.chunk_schema
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = k.chunk_name
WHERE k.hypertable_schema = current_schema() AND k.hypertable_name = 'readings'
  AND k.range_end <= %s AND pg_relation_size(c.oid) = 0
  AND pg_indexes_size(c.oid) > current_setting('block_size')::int
      * (SELECT count(*) FROM pg_index i WHERE i.indrelid = c.oid)
ORDER BY k.range_start
"""
_PARTS_CREATE: Final = f"""
CREATE TEMP TABLE IF NOT EXISTS packing_parts ON COMMIT DELETE ROWS AS
SELECT 0::smallint AS part, {_COLUMN_LIST} FROM readings WITH NO DATA
"""
# The one read of the chunk's windows: those of the transaction's snapshot, taken out.
_MOVE_CHUNK: Final = f"""
WITH moved AS (DELETE FROM {{}} RETURNING {_COLUMN_LIST})
INSERT INTO packing_parts SELECT 1, {_COLUMN_LIST} FROM moved
"""
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
    """Pack one chunk in one transaction, then VACUUM it: (windows moved, hour rows written).

    REPEATABLE READ: the DELETE takes exactly the rows of the snapshot, so a window the
    ingest stores meanwhile stays for the next run, and one it merges into meanwhile
    raises SerializationFailure (the caller skips the chunk). `conn` is in autocommit.
    """
    table = sql.Identifier(chunk.schema, chunk.name)
    bounds = {"first_hour": _floor_hour(chunk.start), "end": chunk.end}
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(lock_timeout)))
        conn.execute(_PARTS_CREATE)
        moved = conn.execute(sql.SQL(_MOVE_CHUNK).format(table)).rowcount
        written = 0
        if moved:
            row = conn.execute(_OFF_GRID).fetchone()
            if row and row[0]:
                raise _OffGrid(f"{row[0]} windows")
            conn.execute(_UNPACK_TOUCHED, bounds)
            written = conn.execute(_WRITE_PACKED).rowcount
    # This commit's row counts go to the statistics now, before VACUUM sets them (they
    # would be added after, and a late window's live row lost in the clamp at 0), and
    # before the next run selects chunks by them.
    conn.execute("SELECT pg_stat_force_next_flush()")
    if chunk.owned:
        # Blocks no writer or reader; cuts an all-dead chunk to no pages (the next run
        # skips it by file size) and gives a chunk a late window landed in room again.
        conn.execute(sql.SQL("VACUUM {}").format(table))
    return moved, written


def release_emptied(conn: psycopg.Connection[Any], older_than: datetime) -> int:
    """TRUNCATE chunks before `older_than` that hold index pages and no row: chunks released.

    A chunk with no heap page holds no row, committed or not (an insert extends the file
    first, under a lock ours waits for), so under ACCESS EXCLUSIVE its TRUNCATE loses
    nothing and no snapshot can miss a row; a busy chunk waits for the next run.
    """
    released = 0
    for schema, name in conn.execute(_EMPTIED, (older_than,)).fetchall():
        table = sql.Identifier(schema, name)
        try:
            with conn.transaction():
                conn.execute(
                    sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(RELEASE_LOCK_TIMEOUT))
                )
                conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table))
                row = conn.execute("SELECT pg_relation_size(%s::regclass)", (f"{schema}.{name}",))
                if row.fetchone() == (0,):
                    conn.execute(sql.SQL("TRUNCATE {}").format(table))
                    released += 1
        except psycopg.errors.LockNotAvailable:
            logger.info("packing: emptied chunk %s busy, its index released next run", name)
    return released


def pack_windows(
    conn: psycopg.Connection[Any],
    *,
    older_than: datetime,
    lock_timeout: str = LOCK_TIMEOUT,
    should_stop: Callable[[], bool] = lambda: False,
) -> PackReport:
    """Pack every `readings` chunk wholly before `older_than`, oldest first, one per transaction.

    `should_stop` is asked between chunks, so a stopping worker leaves after the
    current one. A chunk the ingest merged into during its pack, or busy past
    `lock_timeout`, is skipped and retried next run.
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
        except psycopg.errors.SerializationFailure:
            logger.warning(
                "packing: the ingest merged into a window of chunk %s during its pack;"
                " rolled back, retried next run",
                chunk.name,
            )
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
    if released := release_emptied(conn, older_than):
        logger.info("packing: released the index pages of %s emptied chunks", released)
    if windows:
        logger.info("packing: %s windows into %s hour rows before %s", windows, written, older_than)
    return PackReport(windows, written, packed, skipped)
