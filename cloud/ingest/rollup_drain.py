"""The rollups' second stage: merge the commits' hourly partials into the rollup tables.

The ingest commit only COPYs its partials into `rollup_pending` (cloud/rollups.py);
this drain deletes a batch of them, merges them per key and upserts both rollup
tables, all in one transaction of its own. Killed half-way, it leaves the partials in
`rollup_pending` for the next drain: nothing lost, nothing merged twice. One drain runs
at a time in the whole database (a transaction advisory lock; a worker finding it held
skips its turn), so partials merge into the tables in id order and a split window's
later part keeps giving `last`; rows another transaction holds are skipped (FOR UPDATE
SKIP LOCKED) all the same, and any worker drains what a dead one left. Many commits' partials
of one hour merge once per drain instead of once per commit. Rollups lag their
readings by about one drain interval (`batch.rollup_drain_ms`, docs/cloud.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from millrace.cloud import rollups
from millrace.cloud.ingest.metrics import IngestMetrics

log = logging.getLogger(__name__)

# Partials per drain transaction: bounds its memory and lock time; a backlog takes several.
DRAIN_BATCH_ROWS: Final = 50_000
STOP_TIMEOUT_SECONDS: Final = 120.0

# pg_try_advisory_xact_lock key of the drain ("millrace rollup drain", as int64).
DRAIN_LOCK_KEY: Final = 0x6D696C6C5F726472

_TAKE: Final = f"""
DELETE FROM rollup_pending WHERE id = ANY(ARRAY(
    SELECT id FROM rollup_pending ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED))
RETURNING id, {", ".join(rollups.PENDING_COLUMNS)},
    extract(epoch FROM clock_timestamp() - committed_at)::float8
"""


@dataclass(frozen=True, slots=True)
class Drained:
    """What drains merged: partials taken, rollup rows touched, age of the oldest partial."""

    partials: int = 0
    rollup_rows: int = 0
    oldest_s: float = 0.0

    def __add__(self, other: Drained) -> Drained:
        return Drained(
            self.partials + other.partials,
            self.rollup_rows + other.rollup_rows,
            max(self.oldest_s, other.oldest_s),
        )


def take(cur: psycopg.Cursor[Any], limit: int = DRAIN_BATCH_ROWS) -> list[tuple[Any, ...]]:
    """Delete up to `limit` partials no other drain holds; rows as `rollup_pending` had them.

    Inside the caller's transaction: the partials are gone only if it commits.
    """
    cur.execute(_TAKE, [limit])
    return cur.fetchall()


def drain_once(conn: psycopg.Connection[Any], limit: int = DRAIN_BATCH_ROWS) -> Drained:
    """Take up to `limit` partials and merge them into both rollup tables, one transaction."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_xact_lock(%s)", [DRAIN_LOCK_KEY])
        locked = cur.fetchone()
        if not (locked and locked[0]):
            return Drained()  # another worker's drain is merging: it takes what is here
        rows = take(cur, limit)
        if not rows:
            return Drained()
        merged = rollups.merge_partials(row[:-1] for row in rows)
        touched = rollups.write_rollups(cur, merged)
    return Drained(len(rows), touched, max(row[-1] for row in rows))


def drain_all(conn: psycopg.Connection[Any], limit: int = DRAIN_BATCH_ROWS) -> Drained:
    """Drain until no partial is left that another drain does not hold."""
    total = Drained()
    while True:
        done = drain_once(conn, limit)
        total += done
        if done.partials < limit:
            return total


class RollupDrainer:
    """A thread draining `rollup_pending` every `interval_s` and once more when stopped."""

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection[Any]],
        *,
        interval_s: float,
        metrics: IngestMetrics | None = None,
    ) -> None:
        self._connect = connect
        self._interval_s = interval_s
        self._metrics = metrics
        self._conn: psycopg.Connection[Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread."""
        self._thread = threading.Thread(target=self._loop, name="millrace-rollup-drain")
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        """Stop after a last drain of everything pending (a clean stop leaves nothing)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_SECONDS)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.run_once()
        if not self.run_once():
            log.warning("rollup partials left in rollup_pending: the next drain merges them")
        if self._conn is not None:
            self._conn.close()

    def run_once(self) -> bool:
        """Drain everything pending now; False if the database failed (retried next time)."""
        started = time.perf_counter()
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
                self._conn.autocommit = True
            done = drain_all(self._conn)
            row = self._conn.execute("SELECT count(*) FROM rollup_pending").fetchone()
        except psycopg.Error as exc:
            log.warning("rollup drain failed, retried next interval: %s", type(exc).__name__)
            if self._conn is not None:
                self._conn.close()
            return False
        if self._metrics is not None:
            self._metrics.rollup_drain_seconds.observe(time.perf_counter() - started)
            self._metrics.rollup_pending.set(row[0] if row else 0)
            if done.partials:
                self._metrics.rollup_lag_seconds.set(done.oldest_s)
        return True
