"""Packing next to the ingest's late writes: no write waits for a pack, no window doubled or lost.

Packing runs as a login of the millrace_retention role; the late writes go through the
ingest writer's readings path (store_readings) from other sessions with a 1 s
lock_timeout, so a write held off by the pack fails instead of waiting. A pack is held
open between its steps deterministically: another session holds a packed row the pack
must take out (after it has read the chunk), or a hook runs between its statements.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import psycopg
import pytest

from millrace.cloud import dbupgrade
from millrace.cloud.packing import PackReport, pack_windows
from millrace.wire.aggregate import Aggregate
from tests.cloud.packing_support import (
    PERIOD_S,
    Key,
    ids,
    merged,
    random_aggregate,
    random_windows,
    store,
    waiting_pid,
    windows_at_rest,
)

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
BASE = datetime(2026, 11, 1, tzinfo=UTC)
GIVE_UP_SECONDS = 120.0
INGEST_LOCK_TIMEOUT = "1s"


@pytest.fixture
def db(fresh_db: str) -> str:
    dbupgrade.upgrade(fresh_db)
    return fresh_db


@pytest.fixture
def conn(db: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db, autocommit=True) as connection:
        yield connection


@pytest.fixture
def ingest(db: str) -> Iterator[psycopg.Connection]:
    """A session writing as the ingest does, refusing to wait on a lock for long."""
    with psycopg.connect(db, autocommit=True) as connection:
        connection.execute(f"SET lock_timeout = '{INGEST_LOCK_TIMEOUT}'")
        yield connection


def hot_keys(conn: psycopg.Connection) -> set[Key]:
    rows = conn.execute("SELECT ts, device_id, metric_id, period_s FROM readings").fetchall()
    return {cast(Key, tuple(r)) for r in rows}


class _PackInThread:
    """`pack_windows` on a thread, its result or error kept for the test."""

    def __init__(self, target: Callable[[], PackReport]) -> None:
        self.report: PackReport | None = None
        self.errors: list[BaseException] = []

        def run() -> None:
            try:
                self.report = target()
            except BaseException as exc:  # handed to the test
                self.errors.append(exc)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> PackReport:
        self.thread.join(GIVE_UP_SECONDS)
        assert not self.thread.is_alive() and not self.errors, self.errors
        assert self.report is not None
        return self.report


def _wait_for_pid(conn: psycopg.Connection, login: str, pack: _PackInThread) -> int:
    give_up = time.monotonic() + GIVE_UP_SECONDS
    while (pid := waiting_pid(conn, login, "touched")) is None:
        assert time.monotonic() < give_up and pack.thread.is_alive(), pack.errors
        time.sleep(0.05)
    return pid


@pytest.mark.integration
def test_a_late_window_for_a_chunk_being_packed_is_stored_without_waiting_for_the_pack(
    db: str,
    conn: psycopg.Connection,
    retention_conn: psycopg.Connection,
    ingest: psycopg.Connection,
    retention_login: str,
) -> None:
    rng = random.Random(31)
    device, metric = ids(conn, "press-1", "temp")
    base = random_windows(rng, device_id=device, metric_id=metric, hour=BASE, hours=2)
    del base[(BASE + timedelta(seconds=1230), device, metric, PERIOD_S)]
    store(conn, base)
    pack_windows(retention_conn, older_than=BASE + DAY)
    late = {(BASE + timedelta(seconds=s), device, metric, PERIOD_S): random_aggregate(rng)
            for s in (600, 4200)}  # fmt: skip
    store(conn, late)  # a gateway back after a day: the next run packs these
    later_still = {
        (BASE + timedelta(seconds=1230), device, metric, PERIOD_S): random_aggregate(rng)
    }

    # Another session holds a packed row of the first hour: the pack reads (takes) the
    # chunk's late windows, then waits to take that row out, its transaction open.
    with psycopg.connect(db) as blocker:
        blocker.execute("SELECT 1 FROM readings_packed WHERE hour = %s FOR UPDATE", (BASE,))
        pack = _PackInThread(
            lambda: pack_windows(retention_conn, older_than=BASE + DAY, lock_timeout="10min")
        )
        _wait_for_pid(conn, retention_login, pack)

        # The ingest stores a window for that chunk now, with a 1 s lock_timeout: the old
        # pack's EXCLUSIVE lock made it fail (LockNotAvailable) after waiting.
        store(ingest, later_still)

        assert hot_keys(conn) == set(late) | set(later_still)  # readers: nothing packed yet
        assert windows_at_rest(conn) == merged(base, late, later_still)
        blocker.rollback()
        report = pack.join()

    assert report == PackReport(windows=2, hours=2, chunks=1)
    assert hot_keys(conn) == set(later_still)  # after the pack's snapshot: left for the next run
    assert windows_at_rest(conn) == merged(base, late, later_still)  # each window once
    assert pack_windows(retention_conn, older_than=BASE + DAY) == PackReport(
        windows=1, hours=1, chunks=1
    )
    assert hot_keys(conn) == set()
    assert windows_at_rest(conn) == merged(base, late, later_still)


class _HookAfter:
    """A connection whose `execute` runs `hook` once, after a statement containing `marker`."""

    def __init__(self, conn: psycopg.Connection, marker: str, hook: Callable[[], None]) -> None:
        self._conn = conn
        self._marker = marker
        self._hook: Callable[[], None] | None = hook

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def execute(self, query: Any, params: Any = None) -> Any:
        cur = self._conn.execute(query, params)
        if self._hook is not None and isinstance(query, str) and self._marker in query:
            hook, self._hook = self._hook, None
            hook()
        return cur


@pytest.mark.integration
def test_a_window_merged_by_the_ingest_while_its_chunk_is_packed_is_counted_once(
    conn: psycopg.Connection, retention_conn: psycopg.Connection, ingest: psycopg.Connection
) -> None:
    rng = random.Random(37)
    device, metric = ids(conn, "press-1", "temp")
    first = random_windows(rng, device_id=device, metric_id=metric, hour=BASE, hours=1)
    second = random_windows(rng, device_id=device, metric_id=metric, hour=BASE + DAY, hours=1)
    store(conn, merged(first, second))
    split = (BASE + timedelta(seconds=1800), device, metric, PERIOD_S)
    rest: dict[Key, Aggregate] = {split: random_aggregate(rng)}  # the rest of a window cut short

    # The pack of the first chunk has begun (its snapshot taken, the chunk not read yet)
    # when the ingest merges the rest into that window: it commits at once; the old pack
    # held the chunk's EXCLUSIVE lock from its start, so the merge failed (1 s timeout).
    refused: list[psycopg.Error] = []

    def merge_the_rest() -> None:
        try:
            store(ingest, rest)
        except psycopg.Error as exc:
            refused.append(exc)

    hooked = _HookAfter(retention_conn, "CREATE TEMP TABLE", merge_the_rest)
    report = pack_windows(cast(psycopg.Connection, hooked), older_than=BASE + 2 * DAY)
    assert refused == []

    # The pack's DELETE met the merged row: that chunk rolled back and skipped, not doubled.
    assert report == PackReport(windows=len(second), hours=1, chunks=1, skipped=1)
    assert hot_keys(conn) == set(first)
    stored = conn.execute(
        "SELECT count FROM readings WHERE ts = %s AND device_id = %s", (split[0], device)
    ).fetchone()
    assert stored == (first[split].count + rest[split].count,)
    assert windows_at_rest(conn) == merged(first, second, rest)
    report = pack_windows(retention_conn, older_than=BASE + 2 * DAY)
    assert report == PackReport(windows=len(first), hours=1, chunks=1)
    assert hot_keys(conn) == set()
    assert windows_at_rest(conn) == merged(first, second, rest)  # every sum exact


@pytest.mark.integration
def test_the_rest_of_a_window_the_pack_has_taken_waits_for_its_commit_and_is_counted_once(
    db: str, conn: psycopg.Connection, retention_conn: psycopg.Connection, retention_login: str
) -> None:
    rng = random.Random(41)
    device, metric = ids(conn, "press-1", "temp")
    first = random_windows(rng, device_id=device, metric_id=metric, hour=BASE, hours=1)
    store(conn, first)
    pack_windows(retention_conn, older_than=BASE + DAY)
    key = (BASE + timedelta(seconds=600), device, metric, PERIOD_S)
    late = {key: random_aggregate(rng)}  # a late part of a packed window
    store(conn, late)
    rest = {key: random_aggregate(rng)}  # and the part after it

    # The pack has taken the chunk's rows and waits on a packed row; the ingest's COPY of
    # the rest of a window whose first part that DELETE took waits for the pack's end
    # (the one wait left: the row is the pack's until it commits), then is stored hot.
    with psycopg.connect(db) as blocker, psycopg.connect(db, autocommit=True) as writer:
        blocker.execute("SELECT 1 FROM readings_packed WHERE hour = %s FOR UPDATE", (BASE,))
        pack = _PackInThread(
            lambda: pack_windows(retention_conn, older_than=BASE + DAY, lock_timeout="10min")
        )
        _wait_for_pid(conn, retention_login, pack)
        writing = threading.Thread(target=store, args=(writer, rest), daemon=True)
        writing.start()
        give_up = time.monotonic() + GIVE_UP_SECONDS
        while conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
            (writer.info.backend_pid,),
        ).fetchone() != (1,):
            assert time.monotonic() < give_up and writing.is_alive()
            time.sleep(0.05)
        blocker.rollback()
        assert pack.join() == PackReport(windows=1, hours=1, chunks=1)
        writing.join(GIVE_UP_SECONDS)
        assert not writing.is_alive()

    truth = merged(first, late, rest)
    assert hot_keys(conn) == set(rest)  # the earlier parts packed, the rest hot
    assert windows_at_rest(conn) == truth
    assert pack_windows(retention_conn, older_than=BASE + DAY) == PackReport(
        windows=1, hours=1, chunks=1
    )
    assert windows_at_rest(conn) == truth


_CHUNK_PAGES = """
SELECT pg_relation_size(r), pg_indexes_size(r) / current_setting('block_size')::int
FROM (SELECT format('%I.%I', chunk_schema, chunk_name)::regclass AS r
      FROM timescaledb_information.chunks WHERE hypertable_name = 'readings') AS k
"""


@pytest.mark.integration
def test_a_chunk_packed_by_its_owner_is_vacuumed_and_released_to_no_pages_till_a_late_window(
    conn: psycopg.Connection,
) -> None:
    rng = random.Random(43)
    device, metric = ids(conn, "press-1", "temp")
    first = random_windows(rng, device_id=device, metric_id=metric, hour=BASE, hours=6)
    store(conn, first)
    heap, index_pages = conn.execute(_CHUNK_PAGES).fetchone() or (0, 0)
    assert heap > 0 and index_pages > 1

    assert pack_windows(conn, older_than=BASE + DAY).chunks == 1  # the owner: VACUUM runs
    assert conn.execute(_CHUNK_PAGES).fetchall() == [(0, 1)]  # no heap, an index metapage
    assert pack_windows(conn, older_than=BASE + DAY) == PackReport()
    late = {(BASE + timedelta(seconds=600), device, metric, PERIOD_S): random_aggregate(rng)}
    store(conn, late)
    assert pack_windows(conn, older_than=BASE + DAY) == PackReport(windows=1, hours=1, chunks=1)
    assert conn.execute(_CHUNK_PAGES).fetchall() == [(0, 1)]
    assert windows_at_rest(conn) == merged(first, late)


@pytest.mark.integration
def test_a_chunk_vacuumed_by_autovacuum_is_released_by_the_next_run_of_a_packer_not_its_owner(
    conn: psycopg.Connection, retention_conn: psycopg.Connection
) -> None:
    rng = random.Random(47)
    device, metric = ids(conn, "press-1", "temp")
    first = random_windows(rng, device_id=device, metric_id=metric, hour=BASE, hours=6)
    store(conn, first)
    pack_windows(retention_conn, older_than=BASE + DAY)
    heap, index_pages = conn.execute(_CHUNK_PAGES).fetchone() or (0, 0)
    assert heap > 0 and index_pages > 1  # the retention role may not VACUUM it
    conn.execute("VACUUM readings")  # what autovacuum does: the heap goes, the index stays
    assert conn.execute(_CHUNK_PAGES).fetchall() == [(0, index_pages)]

    assert pack_windows(retention_conn, older_than=BASE + DAY) == PackReport()
    assert conn.execute(_CHUNK_PAGES).fetchall() == [(0, 1)]
    assert windows_at_rest(conn) == first
