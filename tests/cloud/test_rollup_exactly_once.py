"""Rollups count every stored window exactly once, exactly.

The writer merges each commit's windows into hourly partials and COPYs them into
rollup_pending in the transaction that claims the ledger rows and copies the readings;
a drain merges partials into both rollup tables in one transaction of its own. So a
rollup can never count a window the readings do not hold, nor miss one they do (once
drained), whatever order, duplication or splitting the stream arrives with, and
however drains interleave with commits, die or run concurrently.
"""

from __future__ import annotations

import math
import random
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import psycopg
import pytest

from millrace.cloud import rollups
from millrace.cloud.ingest.messages import Incoming
from millrace.cloud.ingest.writer import BatchWriter
from millrace.wire import Batch, Window, encode_batch
from tests.cloud.ingest_support import (
    DAY_MS,
    HOUR_MS,
    Agg,
    IngestDb,
    assert_stored_exactly,
    drain_rollups,
    ingest_db,  # noqa: F401  (fixture)
    make_window,
    query,
    stored_rollups,
)

pytestmark = pytest.mark.integration

PERIOD_S = 600
RECEIVED = datetime(2026, 1, 1, tzinfo=UTC)


def _stream(rng: random.Random, device: str) -> tuple[list[Batch], list[Batch]]:
    """Two boots of one device over 26 h across a UTC midnight; ~1 in 6 windows split.

    A split window is closed early by the first boot and finished by the second (same
    metric and start), as after a SIGTERM and restart.
    """
    day = 1_764_028_800_000  # a UTC midnight
    start = day - 20 * HOUR_MS
    before: list[Window] = []
    after: list[Window] = []
    for slot in range(26 * 3600 // PERIOD_S):
        for metric in ("temp", "flow"):
            at = start + slot * PERIOD_S * 1000
            before.append(make_window(rng, metric, at, PERIOD_S))
            if rng.random() < 1 / 6:
                after.append(make_window(rng, metric, at, PERIOD_S))
    boots = (uuid.UUID(int=rng.getrandbits(128)).hex, uuid.UUID(int=rng.getrandbits(128)).hex)
    out: tuple[list[Batch], list[Batch]] = ([], [])
    for boot, windows, into in zip(boots, (before, after), out, strict=True):
        for seq, i in enumerate(range(0, len(windows), 7)):
            chunk = tuple(windows[i : i + 7])
            into.append(Batch(device, boot, seq, chunk[-1].start_ms, windows=chunk))
    return out


def _expected(stored_order: list[Batch], bucket_ms: int) -> dict[tuple[str, str, int, int], Agg]:
    """From scratch: every stored window merged once into its bucket, in the order stored."""
    names: dict[str, int] = {}
    metrics: dict[str, int] = {}
    triples = [
        (names.setdefault(b.device, len(names)), metrics.setdefault(w.metric, len(metrics)), w)
        for b in stored_order
        for w in b.windows
    ]
    device_of = {v: k for k, v in names.items()}
    metric_of = {v: k for k, v in metrics.items()}
    rows = rollups.aggregate(triples, bucket_s=bucket_ms // 1000)
    return {
        (device_of[d], metric_of[m], period, bucket): Agg(
            r.count, r.sum, r.min, r.max, r.sumsq, r.first, r.first_at, r.last, r.last_at, r.parts
        )
        for (d, m, period, bucket), r in rows.items()
    }


def _assert_equal(
    got: dict[tuple[str, str, int, int], Agg], want: dict[tuple[str, str, int, int], Agg]
) -> None:
    assert got.keys() == want.keys()
    for key, w in want.items():
        g = got[key]
        assert (g.count, g.min, g.max, g.windows) == (w.count, w.min, w.max, w.windows), key
        assert (g.first, g.first_ms, g.last, g.last_ms) == (w.first, w.first_ms, w.last, w.last_ms)
        assert math.isclose(g.sum, w.sum, rel_tol=1e-12, abs_tol=1e-9), key
        assert math.isclose(g.sumsq, w.sumsq, rel_tol=1e-12, abs_tol=1e-9), key


def test_rollups_equal_a_recomputation_after_a_late_split_redelivered_stream(
    ingest_db: IngestDb,  # noqa: F811
) -> None:
    rng = random.Random(18)
    batches = [b for device in ("roll-a", "roll-b") for boot in _stream(rng, device) for b in boot]
    deliveries = list(batches)
    rng.shuffle(deliveries)  # late: any order, also the second boot's parts first
    for b in rng.sample(batches, len(batches) // 3):  # redelivered, later
        deliveries.insert(rng.randrange(deliveries.index(b) + 1, len(deliveries) + 1), b)
    writers = [(BatchWriter(), psycopg.connect(ingest_db.ingest_dsn)) for _ in range(2)]
    stored_order: list[Batch] = []
    seen: set[tuple[str, str, int]] = set()
    try:
        while deliveries:
            take = rng.randint(1, 6)
            part, deliveries = deliveries[:take], deliveries[take:]
            writer, conn = rng.choice(writers)  # two workers of one share group
            writer.prepare(conn, part)
            conn.commit()
            with conn.transaction():
                writer.write(conn, [Incoming(b, RECEIVED) for b in part])
            fresh = {(b.device, b.boot_id, b.seq): b for b in part}
            for key in sorted(fresh.keys() - seen):  # the writer's order within a commit
                stored_order.append(fresh[key])
            seen |= fresh.keys()
            if rng.random() < 0.2:  # drains interleave with the commits
                drain_rollups(ingest_db.ingest_dsn)
    finally:
        for _, conn in writers:
            conn.close()
    assert len(stored_order) == len(batches)
    drain_rollups(ingest_db.ingest_dsn)
    for table, bucket_ms in (("rollup_hourly", HOUR_MS), ("rollup_daily", DAY_MS)):
        _assert_equal(
            stored_rollups(ingest_db.owner_dsn, table), _expected(stored_order, bucket_ms)
        )
    # And the hourly rollups agree with the readings they summarise, also where an hour's
    # last window was split: its later part gives `last`, in both.
    disagree = query(
        ingest_db.owner_dsn,
        """
        SELECT r.device_id, r.metric_id, r.bucket FROM rollup_hourly r
          FULL JOIN (SELECT device_id, metric_id, period_s, date_trunc('hour', ts) AS bucket,
                            sum(count) AS count, min(min) AS min, max(max) AS max,
                            sum(sum) AS sum, (array_agg(first ORDER BY ts))[1] AS first,
                            (array_agg(last ORDER BY ts DESC))[1] AS last
                       FROM readings GROUP BY 1, 2, 3, 4) g
            USING (device_id, metric_id, period_s, bucket)
         WHERE r.count IS DISTINCT FROM g.count OR r.min IS DISTINCT FROM g.min
            OR r.max IS DISTINCT FROM g.max OR r.first IS DISTINCT FROM g.first
            OR r.last IS DISTINCT FROM g.last
            OR abs(r.sum - g.sum) > 1e-9 * greatest(1, abs(g.sum)) OR g.sum IS NULL
        """,
    )
    assert disagree == []


_DIE_AFTER_THE_COPY = """
import os, signal, sys
from datetime import UTC, datetime
import psycopg
from millrace.cloud.ingest import writer as w
from millrace.cloud.ingest.messages import Incoming
from millrace.wire import decode_batch, CONTENT_TYPE_MSGPACK

def die(cur, hourly):  # the readings are copied, the rollup partials not yet
    count = cur.execute("SELECT count(*) FROM readings").fetchone()[0]
    print(count, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

w.rollups.copy_pending = die
batch = decode_batch(sys.stdin.buffer.read(), content_type=CONTENT_TYPE_MSGPACK)
writer = w.BatchWriter()
with psycopg.connect(sys.argv[1]) as conn:
    writer.prepare(conn, [batch])
    conn.commit()
    with conn.transaction():
        writer.write(conn, [Incoming(batch, datetime.now(UTC))])
"""


def test_a_worker_killed_between_the_copy_and_the_rollups_leaves_neither(
    ingest_db: IngestDb,  # noqa: F811
) -> None:
    rng = random.Random(7)
    windows = tuple(
        make_window(rng, m, 1_764_028_800_000 + i * 60_000, 60)
        for i in range(30)
        for m in ("temp", "flow")
    )
    boot = uuid.UUID(int=rng.getrandbits(128)).hex
    batch = Batch("roll-kill", boot, 0, windows[-1].start_ms, windows=windows)
    child = subprocess.run(
        [sys.executable, "-c", _DIE_AFTER_THE_COPY, ingest_db.ingest_dsn],
        input=encode_batch(batch),
        capture_output=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    assert child.stdout.split() == [str(len(windows)).encode()]  # it died with them copied
    for table in ("readings", "rollup_pending", "rollup_hourly", "rollup_daily", "ingest_ledger"):
        assert query(ingest_db.owner_dsn, f"SELECT count(*) FROM {table}") == [(0,)], table
    # The broker redelivers to another worker: stored once, rollups to match.
    writer = BatchWriter()
    with psycopg.connect(ingest_db.ingest_dsn) as conn:
        writer.prepare(conn, [batch])
        conn.commit()
        with conn.transaction():
            writer.write(conn, [Incoming(batch, RECEIVED)])
    assert_stored_exactly(ingest_db.owner_dsn, [batch])
