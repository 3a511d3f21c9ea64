"""Packing old windows (cloud/packing.py): exact, once, atomic per chunk, and pruned by retention.

Packing runs as a login of the least-privileged millrace_retention role, as the
retention schedule does; windows are stored through the ingest writer's readings path.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from millrace.cloud import dbupgrade
from millrace.cloud.config import load_config
from millrace.cloud.packing import PackReport, pack_windows, storage_at_rest
from millrace.cloud.retention import RetentionPolicy, RetentionScheduler
from millrace.errors import ConfigError
from tests.cloud.packing_support import (
    PERIOD_S,
    SLOTS_PER_HOUR,
    flush_stats,
    ids,
    merged,
    random_aggregate,
    random_windows,
    store,
    windows_at_rest,
)
from tests.cloud.test_cloud_doc_examples import materialize

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
BASE = datetime(2026, 11, 1, tzinfo=UTC)
GIVE_UP_SECONDS = 120.0


@pytest.fixture
def db(fresh_db: str) -> str:
    dbupgrade.upgrade(fresh_db)
    return fresh_db


@pytest.fixture
def conn(db: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db, autocommit=True) as connection:
        yield connection


def hot_hours(conn: psycopg.Connection) -> list[datetime]:
    rows = conn.execute("SELECT DISTINCT time_bucket('1 hour', ts) FROM readings ORDER BY 1")
    return [r[0] for r in rows.fetchall()]


def packed_hours(conn: psycopg.Connection) -> list[datetime]:
    return [r[0] for r in conn.execute("SELECT hour FROM readings_packed ORDER BY 1").fetchall()]


def test_storage_at_rest_is_native_compression_only_on_the_timescale_license() -> None:
    assert storage_at_rest("timescale") == "native_compression"
    assert storage_at_rest("apache") == "pack"


@pytest.mark.integration
def test_packing_moves_whole_old_chunks_into_one_row_per_hour_and_reads_back_exactly(
    conn: psycopg.Connection, retention_conn: psycopg.Connection
) -> None:
    rng = random.Random(18)
    device, metric = ids(conn, "press-1", "temp")
    dense = random_windows(rng, device_id=device, metric_id=metric, hour=BASE, hours=1)
    gappy = random_windows(
        rng, device_id=device, metric_id=metric, hour=BASE + HOUR, hours=4, missing=0.1
    )
    next_day = random_windows(rng, device_id=device, metric_id=metric, hour=BASE + DAY, hours=2)
    truth = merged(dense, gappy, next_day)
    store(conn, truth)
    cutoff = BASE + DAY + 3 * HOUR  # the second day's chunk is not wholly before it

    report = pack_windows(retention_conn, older_than=cutoff)

    assert report == PackReport(windows=len(dense) + len(gappy), hours=5, chunks=1)
    assert hot_hours(conn) == [BASE + DAY, BASE + DAY + HOUR]
    assert packed_hours(conn) == [BASE + h * HOUR for h in range(5)]
    slots = conn.execute("SELECT hour, slots IS NULL FROM readings_packed ORDER BY 1").fetchall()
    assert slots == [(BASE, True)] + [(BASE + h * HOUR, False) for h in range(1, 5)]
    assert windows_at_rest(conn) == truth  # every field of every window, bit for bit
    options = conn.execute(
        "SELECT DISTINCT c.reloptions FROM pg_class c JOIN timescaledb_information.chunks k"
        " ON k.chunk_name = c.relname WHERE k.hypertable_name = 'readings_packed'"
    ).fetchall()
    assert options == [(["toast_tuple_target=128"],)]
    assert (
        pack_windows(retention_conn, older_than=cutoff) == PackReport()
    )  # the emptied chunk: no pages


@pytest.mark.integration
def test_late_window_for_a_packed_hour_is_stored_once_then_merged_into_its_row(
    conn: psycopg.Connection, retention_conn: psycopg.Connection
) -> None:
    rng = random.Random(7)
    device, metric = ids(conn, "press-1", "temp")
    base = random_windows(rng, device_id=device, metric_id=metric, hour=BASE, hours=2)
    del base[(BASE + timedelta(seconds=1230), device, metric, PERIOD_S)]  # a slot never sent
    store(conn, base)
    pack_windows(retention_conn, older_than=BASE + DAY)
    assert hot_hours(conn) == []

    def key(seconds: int) -> tuple[datetime, int, int, int]:
        return (BASE + timedelta(seconds=seconds), device, metric, PERIOD_S)

    # The rest of windows an agent closed early, at both edges of an hour, and a new window.
    late = {key(s): random_aggregate(rng) for s in (0, 3590, 3600, 1230)}
    store(conn, late)  # the ingest path: no conflict with the packed parts, nothing refused
    truth = merged(base, late)

    stored = conn.execute("SELECT count(*) FROM readings").fetchone()
    assert stored == (4,)  # each late window stored once, in the hot form
    assert windows_at_rest(conn) == truth  # read across both forms, merged
    report = pack_windows(retention_conn, older_than=BASE + DAY)
    assert (report.windows, report.hours, report.chunks) == (4, 2, 1)
    assert hot_hours(conn) == []
    assert windows_at_rest(conn) == truth  # merged into the packed rows by the contract's rules
    split = truth[key(3590)]
    assert split == base[key(3590)].merge(late[key(3590)])
    assert (split.first, split.last) == (base[key(3590)].first, late[key(3590)].last)
    rows = conn.execute("SELECT hour, windows, slots IS NULL FROM readings_packed ORDER BY 1")
    assert rows.fetchall() == [(BASE, SLOTS_PER_HOUR, True), (BASE + HOUR, SLOTS_PER_HOUR, True)]


@pytest.mark.integration
def test_a_chunk_holding_a_window_off_its_grid_is_left_hot_and_the_others_are_packed(
    conn: psycopg.Connection, retention_conn: psycopg.Connection
) -> None:
    rng = random.Random(11)
    device, metric = ids(conn, "press-1", "temp")
    first = random_windows(rng, device_id=device, metric_id=metric, hour=BASE, hours=1)
    second = random_windows(rng, device_id=device, metric_id=metric, hour=BASE + DAY, hours=1)
    odd = {(BASE + timedelta(seconds=5), device, metric, PERIOD_S): random_aggregate(rng)}
    store(conn, merged(first, second, odd))  # written by hand: the wire refuses such a start

    report = pack_windows(retention_conn, older_than=BASE + 2 * DAY)

    assert report == PackReport(windows=len(second), hours=1, chunks=1, skipped=1)
    assert hot_hours(conn) == [BASE]  # the whole first day is left as it was
    assert windows_at_rest(conn) == merged(first, second, odd)


@pytest.mark.integration
def test_a_chunk_an_ingest_is_writing_to_is_packed_at_once_and_that_write_next_run(
    db: str, conn: psycopg.Connection, retention_conn: psycopg.Connection
) -> None:
    rng = random.Random(13)
    device, metric = ids(conn, "press-1", "temp")
    first = random_windows(rng, device_id=device, metric_id=metric, hour=BASE, hours=1)
    second = random_windows(rng, device_id=device, metric_id=metric, hour=BASE + DAY, hours=1)
    store(conn, merged(first, second))
    late = {(BASE + 2 * HOUR, device, metric, PERIOD_S): random_aggregate(rng)}

    # An ingest transaction storing a late window for the first day, not committed yet:
    # the run neither waits for it nor takes it; both chunks are packed.
    with psycopg.connect(db) as ingest:
        ingest.execute("SELECT 1")  # open the transaction the COPY runs in
        store(ingest, late)
        report = pack_windows(retention_conn, older_than=BASE + 2 * DAY, lock_timeout="500ms")
        assert report == PackReport(windows=len(first) + len(second), hours=2, chunks=2)
        ingest.commit()
        flush_stats(ingest)

    assert hot_hours(conn) == [BASE + 2 * HOUR]
    assert windows_at_rest(conn) == merged(first, second, late)
    report = pack_windows(retention_conn, older_than=BASE + 2 * DAY)
    assert report == PackReport(windows=1, hours=1, chunks=1)
    assert hot_hours(conn) == []
    assert windows_at_rest(conn) == merged(first, second, late)


def _waiting_packer_pid(conn: psycopg.Connection, login: str) -> int | None:
    row = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE usename = %s AND wait_event_type = 'Lock'"
        " AND query LIKE '%%touched%%'",
        (login,),
    ).fetchone()
    return int(row[0]) if row else None


@pytest.mark.integration
@pytest.mark.faults
def test_a_packing_run_killed_between_its_steps_loses_and_doubles_nothing(
    db: str, conn: psycopg.Connection, retention_conn: psycopg.Connection, retention_login: str
) -> None:
    rng = random.Random(3)
    device, metric = ids(conn, "press-1", "temp")
    base = merged(
        *(
            random_windows(rng, device_id=device, metric_id=metric, hour=BASE + d * DAY, hours=2)
            for d in range(2)
        )
    )
    store(conn, base)
    pack_windows(retention_conn, older_than=BASE + 2 * DAY)
    late = {
        (BASE + d * DAY + h * HOUR + timedelta(seconds=600), device, metric, PERIOD_S): (
            random_aggregate(rng)
        )
        for d in range(2)
        for h in range(2)
    }
    store(conn, late)
    truth = merged(base, late)
    before_hot = conn.execute("SELECT * FROM readings ORDER BY ts").fetchall()
    before_packed = conn.execute("SELECT * FROM readings_packed ORDER BY hour").fetchall()
    second_day = [BASE + DAY, BASE + DAY + HOUR]

    # Another session holds a packed row of the second day: the run packs the first day's
    # chunk, reads the second's, then waits to take that row out; it is killed right there.
    with psycopg.connect(db) as blocker:
        blocker.execute("SELECT 1 FROM readings_packed WHERE hour = %s FOR UPDATE", (BASE + DAY,))
        errors: list[BaseException] = []

        def run() -> None:
            try:
                pack_windows(retention_conn, older_than=BASE + 2 * DAY, lock_timeout="10min")
            except psycopg.Error as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        give_up = time.monotonic() + GIVE_UP_SECONDS
        while (pid := _waiting_packer_pid(conn, retention_login)) is None:
            if time.monotonic() > give_up or not thread.is_alive():
                break
            time.sleep(0.1)
        assert pid is not None, "the packing run never reached the second chunk's second step"
        # It has read the second day's chunk; readers still see it, nothing is committed.
        assert hot_hours(conn) == second_day
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        thread.join(GIVE_UP_SECONDS)
        blocker.rollback()
    assert not thread.is_alive() and len(errors) == 1

    # The first chunk committed; the killed one left both tables as they were.
    assert hot_hours(conn) == second_day
    hot = conn.execute("SELECT * FROM readings ORDER BY ts").fetchall()
    assert hot == [r for r in before_hot if r[0] >= BASE + DAY]
    packed = conn.execute("SELECT * FROM readings_packed ORDER BY hour").fetchall()
    assert packed[2:] == before_packed[2:]
    assert windows_at_rest(conn) == truth
    with psycopg.connect(db, user=retention_login, autocommit=True) as again:
        assert pack_windows(again, older_than=BASE + 2 * DAY).windows == 2
    assert hot_hours(conn) == []
    assert windows_at_rest(conn) == truth


@pytest.mark.integration
def test_the_retention_schedule_packs_old_windows_and_drops_packed_chunks_at_the_readings_age(
    db: str, conn: psycopg.Connection, retention_conn: psycopg.Connection, retention_login: str
) -> None:
    rng = random.Random(5)
    device, metric = ids(conn, "press-1", "temp")
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    ancient = random_windows(
        rng, device_id=device, metric_id=metric, hour=now - 100 * 24 * HOUR, hours=1
    )
    old = random_windows(
        rng, device_id=device, metric_id=metric, hour=now - 10 * 24 * HOUR, hours=1
    )
    recent = random_windows(rng, device_id=device, metric_id=metric, hour=now - HOUR, hours=1)
    store(conn, merged(ancient, old, recent))
    pack_windows(retention_conn, older_than=now - 50 * 24 * HOUR)  # packed before it aged out
    assert packed_hours(conn) == [now - 100 * 24 * HOUR]

    scheduler = RetentionScheduler(
        lambda: psycopg.connect(db, user=retention_login), RetentionPolicy(), interval_s=3600
    )
    result = scheduler.run_once()

    assert result is not None and scheduler.last_error is None
    assert result["readings"] == 2  # the packed chunk and the emptied hot one, 100 days old
    assert scheduler.last_packing == PackReport(windows=len(old), hours=1, chunks=1)
    assert packed_hours(conn) == [now - 10 * 24 * HOUR]
    assert hot_hours(conn) == [now - HOUR]
    assert windows_at_rest(conn) == merged(old, recent)


def test_policy_rejects_a_bad_packing_age() -> None:
    with pytest.raises(ConfigError, match=r"retention\.pack_after_days"):
        RetentionPolicy(pack_after_days=0)
    assert RetentionPolicy(pack_after_days=None).pack_after_days is None


def test_ingest_config_sets_the_packing_age_and_names_the_key_when_bad(tmp_path: Path) -> None:
    shown = load_config(materialize("[retention]\npack_after_days = 0.5\n", tmp_path / "ok"))
    assert shown.retention.pack_after_days == 0.5
    defaults = load_config(materialize("", tmp_path / "defaults"))
    assert defaults.retention.pack_after_days == 1.0
    with pytest.raises(ConfigError, match=r"retention\.pack_after_days"):
        load_config(materialize("[retention]\npack_after_days = 0\n", tmp_path / "bad"))
