"""A window closed early at SIGTERM and finished after the restart is merged, not refused."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import sql

from millrace.cloud.ingest.messages import Incoming
from millrace.cloud.ingest.writer import BatchWriter
from millrace.wire import Batch, Window
from tests.cloud.ingest_support import (  # noqa: F401  (ingest_db: fixture)
    IngestDb,
    drain_rollups,
    ingest_db,
)

START_MS = 1_764_000_000_000  # aligned to 10 s
NOW = datetime(2025, 11, 24, 16, 0, tzinfo=UTC)
BOOT_BEFORE = "a" * 32
BOOT_AFTER = "b" * 32


def _window(values: list[float]) -> Window:
    return Window(
        "oven.temp",
        START_MS,
        10,
        len(values),
        sum(values),
        min(values),
        max(values),
        values[0],
        values[-1],
        sum(v * v for v in values),
    )


def _batch(boot_id: str, seq: int, values: list[float]) -> Incoming:
    batch = Batch(
        device="press-1",
        boot_id=boot_id,
        seq=seq,
        sent_at_ms=START_MS + 10_000,
        windows=(_window(values),),
    )
    return Incoming(batch, NOW)


def _write(dsn: str, writer: BatchWriter, *items: Incoming) -> None:
    with psycopg.connect(dsn) as conn:
        writer.prepare(conn, [i.batch for i in items])
        conn.commit()
        with conn.transaction():
            writer.write(conn, list(items))


def _stored(dsn: str, table: str) -> tuple:
    with psycopg.connect(dsn) as conn:
        query = sql.SQL("SELECT count, sum, min, max, first, last, sumsq FROM {}")
        rows = conn.execute(query.format(sql.Identifier(table))).fetchall()
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.integration
@pytest.mark.parametrize("same_transaction", [False, True])
def test_split_window_merges_exactly(ingest_db: IngestDb, same_transaction: bool) -> None:  # noqa: F811
    before, after = [5.0, 7.0, 3.0], [9.0, 4.0]
    writer = BatchWriter()
    first, rest = _batch(BOOT_BEFORE, 41, before), _batch(BOOT_AFTER, 0, after)
    if same_transaction:
        _write(ingest_db.ingest_dsn, writer, first, rest)
    else:
        _write(ingest_db.ingest_dsn, writer, first)
        _write(ingest_db.ingest_dsn, BatchWriter(), rest)  # another worker, or after a restart
    everything = before + after
    expected = (5, sum(everything), 3.0, 9.0, 5.0, 4.0, sum(v * v for v in everything))
    assert _stored(ingest_db.owner_dsn, "readings") == expected
    drain_rollups(ingest_db.ingest_dsn)
    # The part stored later gives `last`, in the rollup too (within a commit or across).
    assert _stored(ingest_db.owner_dsn, "rollup_hourly")[:6] == expected[:6]
    # Both batches are in the ledger: a redelivery of either is still a duplicate.
    with psycopg.connect(ingest_db.owner_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM ingest_ledger").fetchone() == (2,)
    _write(ingest_db.ingest_dsn, BatchWriter(), rest)
    assert _stored(ingest_db.owner_dsn, "readings") == expected
