"""The rollup drain: partials leave rollup_pending exactly once, into exact rollups.

A drain takes partials, merges them and upserts both rollup tables in one transaction,
so a drain killed half-way leaves every partial for the next one, and drains running
at once take disjoint partials (FOR UPDATE SKIP LOCKED).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import UTC, datetime

import psycopg
import pytest

from millrace.cloud import rollups
from millrace.cloud.ingest import rollup_drain
from millrace.cloud.ingest.messages import Incoming
from millrace.cloud.ingest.writer import BatchWriter
from millrace.wire import Batch
from tests.cloud.ingest_support import (
    IngestDb,
    assert_rollups_match,
    drain_rollups,
    ingest_db,  # noqa: F401  (fixture)
    make_batches,
    query,
)

pytestmark = pytest.mark.integration

RECEIVED = datetime(2026, 1, 1, tzinfo=UTC)
END_MS = 1_764_028_800_000 + 5 * 3_600_000  # 5 h after a UTC midnight: both days


def _commit_all(dsn: str, batches: list[Batch], *, per_commit: int) -> int:
    """Store `batches` a few per commit, as a worker does; returns partials pending."""
    writer = BatchWriter()
    with psycopg.connect(dsn) as conn:
        writer.prepare(conn, batches)
        conn.commit()
        for i in range(0, len(batches), per_commit):
            with conn.transaction():
                writer.write(conn, [Incoming(b, RECEIVED) for b in batches[i : i + per_commit]])
    return _pending(dsn)


def _pending(dsn: str) -> int:
    return int(query(dsn, "SELECT count(*) FROM rollup_pending")[0][0])


def _batches() -> list[Batch]:
    # 60 s windows over ~10 h crossing a UTC midnight; commits of 4 batches share hours.
    return make_batches("drain-a", batches=40, windows_per_batch=45, end_ms=END_MS, seed=3)


_DIE_AFTER_TAKING = """
import os, signal, sys
import psycopg
from millrace.cloud.ingest import rollup_drain

def die(cur, merged):  # the partials are taken and merged, not yet upserted
    print(len(merged), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

rollup_drain.rollups.write_rollups = die
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    rollup_drain.drain_once(conn)
"""


def test_a_drain_killed_between_taking_and_upserting_leaves_its_partials_for_the_next(
    ingest_db: IngestDb,  # noqa: F811
) -> None:
    batches = _batches()
    pending = _commit_all(ingest_db.ingest_dsn, batches, per_commit=4)
    assert pending > 0
    child = subprocess.run(
        [sys.executable, "-c", _DIE_AFTER_TAKING, ingest_db.ingest_dsn],
        capture_output=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    assert int(child.stdout) > 0  # it died holding merged rows
    assert _pending(ingest_db.owner_dsn) == pending  # nothing taken for good
    for table in ("rollup_hourly", "rollup_daily"):
        assert query(ingest_db.owner_dsn, f"SELECT count(*) FROM {table}") == [(0,)], table
    assert drain_rollups(ingest_db.ingest_dsn) == pending  # the next drain takes them all
    assert _pending(ingest_db.owner_dsn) == 0
    assert_rollups_match(ingest_db.owner_dsn, batches)


def test_two_concurrent_drains_never_merge_a_partial_twice(
    ingest_db: IngestDb,  # noqa: F811
) -> None:
    batches = _batches()
    pending = _commit_all(ingest_db.ingest_dsn, batches, per_commit=2)
    with (
        psycopg.connect(ingest_db.ingest_dsn) as first,
        psycopg.connect(ingest_db.ingest_dsn) as second,
    ):
        # The first drain has taken (and holds) half the partials, not yet committed...
        held = rollup_drain.take(first.cursor(), pending // 2)
        # ...while the second takes what is left: the rows the first holds are skipped.
        taken = rollup_drain.take(second.cursor(), pending)
        assert {r[0] for r in held}.isdisjoint(r[0] for r in taken)
        assert len(held) + len(taken) == pending
        for conn, rows in ((second, taken), (first, held)):  # either may commit first
            rollups.write_rollups(conn.cursor(), rollups.merge_partials(r[:-1] for r in rows))
            conn.commit()
    assert _pending(ingest_db.owner_dsn) == 0
    assert_rollups_match(ingest_db.owner_dsn, batches)


def test_a_drain_skips_its_turn_while_another_workers_drain_is_merging(
    ingest_db: IngestDb,  # noqa: F811
) -> None:
    """One drain at a time: partials merge in id order, so a split window's `last` holds."""
    batches = _batches()
    pending = _commit_all(ingest_db.ingest_dsn, batches, per_commit=2)
    with (
        psycopg.connect(ingest_db.ingest_dsn) as first,
        psycopg.connect(ingest_db.ingest_dsn) as second,
    ):
        first.execute("SELECT pg_advisory_xact_lock(%s)", [rollup_drain.DRAIN_LOCK_KEY])
        # While the first worker's drain holds the lock, the second's turn takes nothing.
        assert rollup_drain.drain_once(second) == rollup_drain.Drained()
        assert _pending(ingest_db.owner_dsn) == pending
        first.rollback()
        done = rollup_drain.drain_all(second)
    assert done.partials == pending
    assert _pending(ingest_db.owner_dsn) == 0
    assert_rollups_match(ingest_db.owner_dsn, batches)
