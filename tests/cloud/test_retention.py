"""Retention: old chunks dropped and new kept, plain tables pruned, compression per edition."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from millrace.cloud import dbupgrade
from millrace.cloud.retention import (
    ADVISORY_LOCK_KEY,
    DEFAULT_AGES_DAYS,
    RETAINED_TABLES,
    RetentionPolicy,
    RetentionScheduler,
    enable_compression_if_available,
    run_retention,
    timescale_license,
)
from millrace.errors import ConfigError

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
WAIT_SECONDS = 30.0


@pytest.fixture
def db(fresh_db: str) -> str:
    dbupgrade.upgrade(fresh_db)  # the real schema: hypertables and roles
    return fresh_db


@pytest.fixture
def conn(db: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db, autocommit=True) as connection:
        yield connection


def days_ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def seed(conn: psycopg.Connection, reading_ages_days: list[float], *, now: datetime = NOW) -> None:
    device = conn.execute("INSERT INTO devices (name) VALUES ('press-1') RETURNING id").fetchone()
    metric = conn.execute("INSERT INTO metrics (name) VALUES ('temp') RETURNING id").fetchone()
    assert device and metric
    for age in reading_ages_days:
        conn.execute(
            "INSERT INTO readings (ts, device_id, metric_id, period_s, count, sum, min, max,"
            " first, last, sumsq) VALUES (%s, %s, %s, 60, 1, 1, 1, 1, 1, 1, 1)",
            (now - timedelta(days=age), device[0], metric[0]),
        )


def reading_ages(conn: psycopg.Connection) -> list[float]:
    rows = conn.execute("SELECT ts FROM readings ORDER BY ts").fetchall()
    return [round((NOW - r[0]).total_seconds() / 86400, 3) for r in rows]


def chunk_count(conn: psycopg.Connection, table: str) -> int:
    row = conn.execute("SELECT count(*) FROM show_chunks(%s::regclass)", (table,)).fetchone()
    return int(row[0]) if row else -1


@pytest.mark.integration
def test_drop_chunks_keeps_new_data_and_prunes_plain_tables(conn: psycopg.Connection) -> None:
    seed(conn, [200, 150, 100, 89, 1])
    assert chunk_count(conn, "readings") == 5
    for age in (60, 1):
        conn.execute(
            "INSERT INTO dead_letters (received_at, topic, code, reason, payload, payload_bytes)"
            " VALUES (%s, 't', 'invalid', 'r', '\\x00', 1)",
            (days_ago(age),),
        )
    device_id = conn.execute("SELECT id FROM devices").fetchone()[0]  # type: ignore[index]
    for age, seq in ((45, 1), (2, 2)):
        conn.execute(
            "INSERT INTO ingest_ledger (device_id, boot_id, seq, sent_at, received_at, windows,"
            " events, dropped, rejected, clock_synced)"
            " VALUES (%s, %s, %s, %s, %s, 1, 0, 0, 0, true)",
            (device_id, "00000000-0000-0000-0000-000000000001", seq, days_ago(age), days_ago(age)),
        )

    result = run_retention(conn, RetentionPolicy(), now=NOW)

    assert result["readings"] == 3  # the chunks of 200, 150 and 100 days ago
    assert reading_ages(conn) == [89.0, 1.0]
    assert result["dead_letters"] == 1
    assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (1,)
    assert result["ingest_ledger"] == 1  # rows deleted from a plain table
    assert conn.execute("SELECT seq FROM ingest_ledger").fetchall() == [(2,)]
    assert result["rollup_daily"] == 0
    # Idempotent: a second run finds nothing more to do.
    assert set(run_retention(conn, RetentionPolicy(), now=NOW).values()) == {0}


@pytest.mark.integration
def test_configured_ages_and_only_cleared_alerts(conn: psycopg.Connection) -> None:
    seed(conn, [20, 5])
    conn.execute(
        "INSERT INTO alerts (rule_name, device_id, metric, severity, state, raised_at)"
        " SELECT 'r', id, 'temp', 'warning', s, %s FROM devices, unnest(ARRAY['active',"
        " 'cleared']) AS s",
        (days_ago(400),),
    )
    policy = RetentionPolicy.from_days({"readings": 10, "alerts": 365})
    result = run_retention(conn, policy, now=NOW)
    assert result == {"readings": 1, "alerts": 1}
    assert reading_ages(conn) == [5.0]
    assert conn.execute("SELECT state FROM alerts").fetchall() == [("active",)]


def test_policy_rejects_unknown_tables_and_bad_ages() -> None:
    with pytest.raises(ConfigError, match=r"retention\.readngs: unknown table"):
        RetentionPolicy(ages_days={"readngs": 90})
    with pytest.raises(ConfigError, match=r"retention\.events"):
        RetentionPolicy(ages_days={"events": 0})
    with pytest.raises(ConfigError, match=r"compression\.ingest_ledger"):
        RetentionPolicy(compress_after_days={"ingest_ledger": 7})
    assert RetentionPolicy().ages_days == dict(DEFAULT_AGES_DAYS)


@pytest.mark.integration
def test_compression_only_where_the_license_allows(conn: psycopg.Connection) -> None:
    seed(conn, [30, 1])
    license_name = timescale_license(conn)
    report = enable_compression_if_available(conn, RetentionPolicy(), now=NOW)
    assert report.license == license_name
    if license_name == "apache":  # what Debian's build (and CI) has
        assert not report.available
        assert "Timescale License" in report.reason
        assert report.compressed_chunks == {}
        enabled = conn.execute(
            "SELECT count(*) FROM timescaledb_information.hypertables WHERE compression_enabled"
        ).fetchone()
        assert enabled == (0,)
    else:  # a Timescale-licensed build: the 30-day-old chunk is compressed, today's is not
        assert report.available
        assert report.compressed_chunks["readings"] == 1
        assert reading_ages(conn) == [30.0, 1.0]


@pytest.mark.integration
def test_scheduler_runs_on_its_thread_and_one_worker_at_a_time(db: str) -> None:
    seed_conn = psycopg.connect(db, autocommit=True)
    try:
        seed(seed_conn, [400, 1], now=datetime.now(UTC))  # the scheduler uses the real clock
        scheduler = RetentionScheduler(
            lambda: psycopg.connect(db), RetentionPolicy(), interval_s=3600, first_delay_s=0
        )
        # Another worker holds the lock: this round is skipped, nothing dropped.
        seed_conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        assert scheduler.run_once() is None
        assert chunk_count(seed_conn, "readings") == 2
        seed_conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))

        scheduler.start()
        try:
            deadline = time.monotonic() + WAIT_SECONDS
            while scheduler.runs == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            scheduler.stop()
        assert scheduler.runs == 1
        assert scheduler.last_result is not None and scheduler.last_result["readings"] == 1
        assert scheduler.last_compression is not None
        assert chunk_count(seed_conn, "readings") == 1
    finally:
        seed_conn.close()


def test_scheduler_survives_an_unreachable_database() -> None:
    def refuse() -> psycopg.Connection:
        return psycopg.connect("postgresql://postgres@127.0.0.1:1/none", connect_timeout=2)

    scheduler = RetentionScheduler(refuse, RetentionPolicy(), interval_s=3600)
    assert scheduler.run_once() is None
    assert scheduler.last_error and "OperationalError" in scheduler.last_error
    assert scheduler.runs == 0


@pytest.mark.integration
def test_retention_runs_as_its_least_privileged_role(
    conn: psycopg.Connection, retention_conn: psycopg.Connection
) -> None:
    """Retention used to need the superuser (drop_chunks is owner-only); its role suffices."""
    row = retention_conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    assert row.fetchone() == (False,)
    seed(conn, [200, 150, 5])
    conn.execute(
        "INSERT INTO alerts (rule_name, device_id, metric, severity, state, raised_at)"
        " SELECT 'r', id, 'temp', 'warning', 'cleared', %s FROM devices",
        (days_ago(400),),
    )
    every_table = {table: 30.0 for table in RETAINED_TABLES}
    result = run_retention(retention_conn, RetentionPolicy.from_days(every_table), now=NOW)

    assert result["readings"] == 2
    assert result["alerts"] == 1
    assert reading_ages(conn) == [5.0]
    assert set(result) == set(RETAINED_TABLES)


@pytest.mark.integration
@pytest.mark.parametrize(
    "statement",
    [
        "DROP TABLE readings",
        "DROP TABLE ingest_ledger",
        "SELECT rolpassword FROM pg_authid",
        "SELECT * FROM devices",
        "INSERT INTO audit_log (user_name, action, target) VALUES ('x', 'y', 'z')",
        "TRUNCATE alerts",
        "SELECT millrace_drop_chunks('devices'::regclass, now())",
        "SELECT drop_chunks('readings'::regclass, older_than => now())",
    ],
)
def test_retention_role_cannot_do_more_than_retention(
    retention_conn: psycopg.Connection, statement: str
) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        retention_conn.execute(statement)


@pytest.mark.integration
def test_old_sent_notifications_are_pruned_and_pending_ones_kept(conn: psycopg.Connection) -> None:
    conn.execute(
        "INSERT INTO notifications (alert_id, transition, channel, payload, state, created_at)"
        " SELECT 1, 'active', c, '{}', s, %s FROM unnest(ARRAY['a', 'b', 'c'],"
        " ARRAY['pending', 'delivered', 'failed']) AS u(c, s)",
        (days_ago(100),),
    )
    conn.execute(
        "INSERT INTO notifications (alert_id, transition, channel, payload, state, created_at)"
        " VALUES (2, 'active', 'a', '{}', 'delivered', %s)",
        (days_ago(10),),
    )
    assert DEFAULT_AGES_DAYS["notifications"] == 90
    result = run_retention(conn, RetentionPolicy(), now=NOW)
    assert result["notifications"] == 2
    kept = conn.execute("SELECT alert_id, state FROM notifications ORDER BY alert_id").fetchall()
    assert kept == [(1, "pending"), (2, "delivered")]


@pytest.mark.integration
def test_ops_events_older_than_their_age_are_pruned_by_the_retention_role(
    conn: psycopg.Connection, retention_conn: psycopg.Connection
) -> None:
    """ops_events (broker moves, database primary changes) grew without bound: no table
    rule and no privilege for the retention role. Now they are kept a year by default."""
    conn.execute(
        "INSERT INTO ops_events (at, kind, from_value, to_value)"
        " SELECT t, 'db_primary', 'a:5432', 'b:5432' FROM unnest(%s::timestamptz[]) AS t",
        ([days_ago(400), days_ago(366), days_ago(10)],),
    )
    assert DEFAULT_AGES_DAYS["ops_events"] == 365
    result = run_retention(retention_conn, RetentionPolicy(), now=NOW)
    assert result["ops_events"] == 2
    kept = conn.execute("SELECT at FROM ops_events").fetchall()
    assert kept == [(days_ago(10),)]
