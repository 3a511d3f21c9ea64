"""Sequence-gap bookkeeping against the real database: constant work per late seq, a cap
per stream, and retention of streams and gaps (issue "The guarantee must not end at the
broker", item 3)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from millrace.cloud.ingest.messages import Incoming
from millrace.cloud.ingest.streams import StreamsResult, record_streams
from millrace.cloud.retention import RetentionPolicy, run_retention
from millrace.wire import Batch
from tests.cloud.ingest_support import IngestDb, ingest_db  # noqa: F401  (fixture)

NOW = datetime(2025, 11, 24, 16, 0, tzinfo=UTC)
BOOT = "c" * 32
SENT_MS = 1_764_000_000_000
DEVICE = "press-1"


class CountingCursor(psycopg.Cursor[Any]):
    """Counts the statements a piece of code sends."""

    statements = 0

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        CountingCursor.statements += 1
        return super().execute(*args, **kwargs)


def _items(seqs: list[int], *, at: datetime = NOW, boot: str = BOOT) -> list[Incoming]:
    return [Incoming(Batch(DEVICE, boot, s, SENT_MS), at) for s in seqs]


@pytest.fixture
def conn(ingest_db: IngestDb) -> Iterator[psycopg.Connection[Any]]:  # noqa: F811
    with psycopg.connect(ingest_db.ingest_dsn, cursor_factory=CountingCursor) as connection:
        yield connection


def _device(conn: psycopg.Connection[Any], owner_dsn: str) -> dict[str, int]:
    with psycopg.connect(owner_dsn, autocommit=True) as owner:
        row = owner.execute(
            "INSERT INTO devices (name) VALUES (%s) ON CONFLICT (name) DO UPDATE SET name = %s"
            " RETURNING id",
            (DEVICE, DEVICE),
        ).fetchone()
    assert row
    return {DEVICE: row[0]}


def _record(
    conn: psycopg.Connection[Any], ids: dict[str, int], seqs: list[int], **kw: Any
) -> StreamsResult:
    with conn.transaction(), conn.cursor() as cur:
        return record_streams(cur, ids, _items(seqs), **kw)


def _gaps(conn: psycopg.Connection[Any]) -> list[tuple[int, int]]:
    rows = conn.execute("SELECT seq_from, seq_to FROM sequence_gaps ORDER BY seq_from").fetchall()
    conn.commit()
    return [(a, b) for a, b in rows]


def _stream(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    row = conn.execute("SELECT open_gaps, gaps_dropped FROM ingest_streams").fetchone()
    conn.commit()
    assert row
    return row[0], row[1]


_GAP_ROW_STATS = (
    "SELECT n_tup_ins, n_tup_upd, n_tup_del, coalesce(idx_tup_fetch, 0) + seq_tup_read"
    " FROM pg_stat_xact_user_tables WHERE relname = 'sequence_gaps'"
)


def _late_seq_work(conn: psycopg.Connection[Any], ids: dict[str, int], seq: int) -> dict[str, int]:
    """Statements sent and sequence_gaps rows written/fetched for one late seq.

    pg_stat_xact_user_tables holds the backend's counts not yet flushed (older
    transactions' too), so the work is the difference across the call.
    """
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SET LOCAL enable_seqscan = off")  # the plan a large table gets anyway
        before_rows = cur.execute(_GAP_ROW_STATS).fetchone()
        before = CountingCursor.statements
        record_streams(cur, ids, _items([seq]), max_gaps=100_000)
        statements = CountingCursor.statements - before
        after_rows = cur.execute(_GAP_ROW_STATS).fetchone()
    assert before_rows and after_rows
    ins, upd, dele, fetched = (a - b for a, b in zip(after_rows, before_rows, strict=True))
    return {"statements": statements, "inserted": ins, "updated": upd, "deleted": dele,
            "fetched": fetched}  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize("gaps", [100, 4000])
def test_late_seq_work_is_constant_whatever_the_open_gaps(
    conn: psycopg.Connection[Any],
    ingest_db: IngestDb,  # noqa: F811
    gaps: int,
) -> None:
    ids = _device(conn, ingest_db.owner_dsn)
    _record(conn, ids, list(range(0, 2 * gaps + 1, 2)), max_gaps=100_000)  # 0, 2, 4, ...
    assert len(_gaps(conn)) == gaps
    # A gap's only seq arrives: one gap closes; a seq inside a wider gap splits it.
    closing = _late_seq_work(conn, ids, gaps + 1 if gaps % 2 == 0 else gaps)
    # The same five statements and the same rows whatever the stream's other gaps: the
    # old code deleted and re-inserted every gap of the stream here.
    assert closing == {"statements": 5, "inserted": 0, "updated": 0, "deleted": 1, "fetched": 2}
    assert len(_gaps(conn)) == gaps - 1 and _stream(conn) == (gaps - 1, 0)


@pytest.mark.integration
def test_a_late_seq_splits_only_its_own_gap_in_place(
    conn: psycopg.Connection[Any],
    ingest_db: IngestDb,  # noqa: F811
) -> None:
    ids = _device(conn, ingest_db.owner_dsn)
    _record(conn, ids, [0, 10, 20, 30])
    assert _gaps(conn) == [(1, 9), (11, 19), (21, 29)]
    split = _late_seq_work(conn, ids, 15)
    # (11, 19) becomes (11, 14) in place plus a new (16, 19); the other gaps are untouched.
    assert split == {"statements": 5, "inserted": 1, "updated": 1, "deleted": 0, "fetched": 2}
    assert _gaps(conn) == [(1, 9), (11, 14), (16, 19), (21, 29)]
    assert _stream(conn) == (4, 0)


@pytest.mark.integration
def test_gaps_in_the_database_are_exactly_the_missing_seqs(
    conn: psycopg.Connection[Any],
    ingest_db: IngestDb,  # noqa: F811
) -> None:
    ids = _device(conn, ingest_db.owner_dsn)
    rnd = random.Random(7)
    seqs = rnd.sample(range(200), 120)
    first = min(seqs[:7])  # the stream starts at its first batch seen
    for start in range(0, len(seqs), 7):
        _record(conn, ids, seqs[start : start + 7])
    missing = set(range(first, max(seqs) + 1)) - set(seqs)
    listed = {s for low, high in _gaps(conn) for s in range(low, high + 1)}
    assert listed == missing
    assert _stream(conn)[0] == len(_gaps(conn))


@pytest.mark.integration
def test_a_stream_keeps_at_most_max_gaps_and_counts_the_oldest_it_forgets(
    conn: psycopg.Connection[Any],
    ingest_db: IngestDb,  # noqa: F811
) -> None:
    ids = _device(conn, ingest_db.owner_dsn)
    first = _record(conn, ids, list(range(0, 21, 2)), max_gaps=5)  # 10 gaps
    assert first == StreamsResult(opened=10, dropped=5)
    assert _gaps(conn) == [(11, 11), (13, 13), (15, 15), (17, 17), (19, 19)]
    assert _stream(conn) == (5, 5)
    later = _record(conn, ids, [24, 26, 1], max_gaps=5)  # 2 new gaps; 1 was forgotten
    assert later == StreamsResult(opened=2, dropped=2)
    assert _gaps(conn) == [(15, 15), (17, 17), (19, 19), (21, 23), (25, 25)]
    assert _stream(conn) == (5, 7)
    _record(conn, ids, [17], max_gaps=5)
    assert _stream(conn) == (4, 7)


def _commit_work(
    conn: psycopg.Connection[Any], ids: dict[str, int], seqs: list[int], max_gaps: int
) -> dict[str, int]:
    """sequence_gaps rows fetched and deleted by one record_streams call (see above)."""
    with conn.transaction(), conn.cursor() as cur:
        before = cur.execute(_GAP_ROW_STATS).fetchone()
        record_streams(cur, ids, _items(seqs), max_gaps=max_gaps)
        after = cur.execute(_GAP_ROW_STATS).fetchone()
    assert before and after
    _ins, _upd, deleted, fetched = (a - b for a, b in zip(after, before, strict=True))
    return {"deleted": deleted, "fetched": fetched}


@pytest.mark.integration
def test_forgetting_gaps_over_the_cap_fetches_only_the_gaps_it_forgets(
    conn: psycopg.Connection[Any],
    ingest_db: IngestDb,  # noqa: F811
) -> None:
    """Found by test_gap_flood: the trim's DELETE ran its per-stream search once per gap of
    the stream (1,000 x n rows fetched per commit, 96 ms at the cap), and every search
    walked the gaps already forgotten from the index's low end."""
    cap, opened = 1000, 10
    ids = _device(conn, ingest_db.owner_dsn)
    _record(conn, ids, list(range(0, 2 * cap + 1, 2)), max_gaps=cap)
    for step in range(5):  # forget some, so deleted entries lie below the live gaps
        top = 2 * cap + 2 * opened * step
        _record(conn, ids, [top + 2 * i for i in range(1, opened + 1)], max_gaps=cap)
    assert _stream(conn)[0] == cap
    top = 2 * cap + 2 * opened * 5
    work = _commit_work(conn, ids, [top + 2 * i for i in range(1, opened + 1)], cap)
    assert work["deleted"] == opened
    # The lowest `opened` gaps found, then each deleted by its key: a few fetches per
    # forgotten gap, whatever the cap and the gaps forgotten before.
    assert work["fetched"] <= 3 * opened, work
    assert _stream(conn) == (cap, 6 * opened)


@pytest.mark.integration
def test_a_late_seq_in_a_forgotten_gap_is_stored_without_touching_any_gap(
    conn: psycopg.Connection[Any],
    ingest_db: IngestDb,  # noqa: F811
) -> None:
    ids = _device(conn, ingest_db.owner_dsn)
    _record(conn, ids, list(range(0, 21, 2)), max_gaps=5)  # gaps 1..9 forgotten
    assert _gaps(conn)[0] == (11, 11)
    work = _commit_work(conn, ids, [3], 5)
    assert work == {"deleted": 0, "fetched": 0}
    assert _gaps(conn) == [(11, 11), (13, 13), (15, 15), (17, 17), (19, 19)]
    assert _stream(conn) == (5, 5)


@pytest.mark.integration
def test_retention_removes_old_streams_and_gaps_and_keeps_counts_true(
    conn: psycopg.Connection[Any],
    ingest_db: IngestDb,  # noqa: F811
) -> None:
    ids = _device(conn, ingest_db.owner_dsn)
    old_boot, new_boot = "d" * 32, "e" * 32
    with conn.transaction(), conn.cursor() as cur:
        record_streams(cur, ids, _items([0, 5], at=NOW - timedelta(days=40), boot=old_boot))
        record_streams(cur, ids, _items([0, 5], at=NOW - timedelta(days=40), boot=new_boot))
        record_streams(cur, ids, _items([10], at=NOW, boot=new_boot))  # an old gap, a new one
    with psycopg.connect(ingest_db.owner_dsn, autocommit=True) as owner:
        done = run_retention(
            owner, RetentionPolicy({"ingest_streams": 30, "sequence_gaps": 30}), now=NOW
        )
        assert done == {"ingest_streams": 1, "sequence_gaps": 1}
        streams = owner.execute("SELECT boot_id, open_gaps FROM ingest_streams").fetchall()
        gaps = owner.execute("SELECT boot_id, seq_from, seq_to FROM sequence_gaps").fetchall()
    assert streams == [(uuid.UUID(new_boot), 1)]
    assert gaps == [(uuid.UUID(new_boot), 6, 9)]
