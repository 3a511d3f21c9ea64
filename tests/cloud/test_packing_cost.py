"""What packing reads: each stored window once per run that packs it, and nothing else.

Counted with PostgreSQL's own block statistics (pg_statio) of every `readings` chunk
and `readings_packed` chunk over a day of hourly runs, as the retention schedule
runs them; packing runs as a login of the millrace_retention role, which does not own
the chunks and so leaves their VACUUM to autovacuum (off here).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from millrace.cloud import dbupgrade
from millrace.cloud.packing import pack_windows
from tests.cloud.packing_support import flush_stats, ids, random_windows, store, windows_at_rest

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
BASE = datetime(2026, 11, 1, tzinfo=UTC)
DAYS = 3

_BLOCKS = """
SELECT k.range_start, s.heap_blks_read + s.heap_blks_hit,
       pg_relation_size(s.relid) / current_setting('block_size')::int
FROM timescaledb_information.chunks k
JOIN pg_statio_all_tables s ON s.schemaname = k.chunk_schema AND s.relname = k.chunk_name
WHERE k.hypertable_name = %s
ORDER BY 1
"""


def blocks(conn: psycopg.Connection, table: str) -> dict[datetime, tuple[int, int]]:
    """Per chunk (by range start): (heap blocks accessed so far, blocks in its file now)."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return {r[0]: (int(r[1]), int(r[2])) for r in conn.execute(_BLOCKS, (table,)).fetchall()}


@pytest.fixture
def db(fresh_db: str) -> str:
    dbupgrade.upgrade(fresh_db)
    return fresh_db


@pytest.fixture
def conn(db: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db, autocommit=True) as connection:
        yield connection


@pytest.mark.integration
def test_hourly_packing_over_a_day_reads_each_stored_window_once_and_no_other_chunk(
    conn: psycopg.Connection, retention_conn: psycopg.Connection
) -> None:
    # No autovacuum or analyze may read the chunks while they are counted.
    for table in ("readings", "readings_packed"):
        conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    rng = random.Random(1818)
    device, metric = ids(conn, "press-1", "temp")
    truth = random_windows(rng, device_id=device, metric_id=metric, hour=BASE, hours=DAYS * 24)
    store(conn, truth)
    options = conn.execute(
        "SELECT DISTINCT c.reloptions FROM pg_class c JOIN timescaledb_information.chunks k"
        " ON k.chunk_name = c.relname WHERE k.hypertable_name = 'readings'"
    ).fetchall()
    assert options == [(["autovacuum_enabled=false"],)]  # chunks take the hypertable's
    flush_stats(conn)
    before = blocks(conn, "readings")
    assert sorted(before) == [BASE + d * DAY for d in range(DAYS)]
    assert all(size > 0 for _, size in before.values())
    last_day = BASE + (DAYS - 1) * DAY

    # Hourly runs through the last day: the first packs the days before it, the 22 after
    # it find nothing to pack, the run at the day's end packs that day.
    for h in range(1, 24):
        pack_windows(retention_conn, older_than=last_day + h * HOUR)
    flush_stats(retention_conn)
    before_last = blocks(conn, "readings")
    packed_before_last = blocks(conn, "readings_packed")
    pack_windows(retention_conn, older_than=last_day + DAY)
    flush_stats(retention_conn)
    after = blocks(conn, "readings")
    packed_after = blocks(conn, "readings_packed")

    # Each chunk read exactly once, whole: as many block reads as its file had blocks,
    # and for each window two more of the page the scan holds pinned (its DELETE and the
    # RETURNING's fetch: buffer hits, never I/O).
    read = {start: after[start][0] - before[start][0] for start in before}
    per_day = len(truth) // DAYS
    assert read == {start: size + 2 * per_day for start, (_, size) in before.items()}
    # The last day's chunk was not read at all by the 23 runs before its day ended.
    assert before_last[last_day][0] == before[last_day][0]
    # Emptied: no live row left, the dead ones wait for a VACUUM (the run after it sees
    # no pages; until then the statistics' count of live rows, 0, keeps them unselected).
    assert conn.execute("SELECT count(*) FROM readings").fetchone() == (0,)
    # Packing the last day read no packed chunk of the days before it.
    assert sorted(packed_after) == [BASE + d * DAY for d in range(DAYS)]
    for day in range(DAYS - 1):
        start = BASE + day * DAY
        assert packed_after[start][0] == packed_before_last[start][0]
    assert windows_at_rest(conn) == truth

    # A run with nothing to pack reads no block of either table.
    flush_stats(conn)
    hot_now, packed_now = blocks(conn, "readings"), blocks(conn, "readings_packed")
    pack_windows(retention_conn, older_than=last_day + DAY + HOUR)
    flush_stats(retention_conn)
    assert blocks(conn, "readings") == hot_now
    assert blocks(conn, "readings_packed") == packed_now
