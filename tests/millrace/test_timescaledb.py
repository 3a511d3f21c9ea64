"""TimescaleDB as bootstrap builds it, on the test fixtures' own PostgreSQL servers."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import sql

from tests.fixtures.fix_postgres import PostgresServer

pytestmark = pytest.mark.integration

T0 = datetime(2024, 3, 1, tzinfo=UTC)

READINGS_DDL = """
CREATE TABLE readings (
    time timestamptz NOT NULL,
    device text NOT NULL,
    value double precision NOT NULL
)
"""


def make_hypertable(conn: psycopg.Connection, *, chunk: timedelta = timedelta(days=1)) -> None:
    conn.execute(READINGS_DDL)
    conn.execute("SELECT create_hypertable('readings', by_range('time', %s))", [chunk])


def test_extension_and_hypertable(fresh_db: str) -> None:
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        version = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
        ).fetchone()
        assert version is not None
        preload = conn.execute("SHOW shared_preload_libraries").fetchone()
        assert preload is not None
        assert "timescaledb" in preload[0]
        # Our build compiles telemetry out (only the config placeholder is seen); binary
        # packages from Timescale have it, and the fixture turns it off.
        telemetry = conn.execute(
            "SELECT current_setting('timescaledb.telemetry_level', true)"
        ).fetchone()
        assert telemetry in {("off",), (None,)}

        make_hypertable(conn)
        row = conn.execute(
            "SELECT hypertable_name, num_dimensions FROM timescaledb_information.hypertables"
        ).fetchone()
        assert row == ("readings", 1)


def test_edition_is_reported(fresh_db: str) -> None:
    with psycopg.connect(fresh_db) as conn:
        row = conn.execute("SHOW timescaledb.license").fetchone()
        version = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = %s", ["timescaledb"]
        ).fetchone()
    assert row is not None
    assert version is not None
    print(f"timescaledb {version[0]}, edition (timescaledb.license): {row[0]}")
    assert row[0] in {"apache", "timescale"}


def test_time_bucket_aggregates_per_hour(fresh_db: str) -> None:
    # 3 hours x 6 readings (every 10 minutes) with values 0..17.
    rows = [(T0 + timedelta(minutes=10 * i), "pump-1", float(i)) for i in range(18)]
    with psycopg.connect(fresh_db) as conn:
        make_hypertable(conn)
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO readings VALUES (%s, %s, %s)", rows)
        buckets = conn.execute(
            """
            SELECT time_bucket(INTERVAL '1 hour', time) AS bucket, count(*), sum(value)
            FROM readings GROUP BY bucket ORDER BY bucket
            """
        ).fetchall()
    assert buckets == [
        (T0, 6, float(sum(range(0, 6)))),
        (T0 + timedelta(hours=1), 6, float(sum(range(6, 12)))),
        (T0 + timedelta(hours=2), 6, float(sum(range(12, 18)))),
    ]


def test_drop_chunks_removes_old_data_only(fresh_db: str) -> None:
    # One reading per day for 5 days, 1-day chunks: 5 chunks.
    rows = [(T0 + timedelta(days=d, hours=12), "pump-1", float(d)) for d in range(5)]
    with psycopg.connect(fresh_db) as conn:
        make_hypertable(conn)
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO readings VALUES (%s, %s, %s)", rows)
        chunks_before = conn.execute("SELECT count(*) FROM show_chunks('readings')").fetchone()
        dropped = conn.execute(
            "SELECT drop_chunks('readings', older_than => %s::timestamptz)",
            [T0 + timedelta(days=3)],
        ).fetchall()
        chunks_after = conn.execute("SELECT count(*) FROM show_chunks('readings')").fetchone()
        remaining = conn.execute("SELECT value FROM readings ORDER BY time").fetchall()
    assert chunks_before == (5,)
    assert len(dropped) == 3
    assert chunks_after == (2,)
    assert remaining == [(3.0,), (4.0,)]


def test_shared_server_settings(pg_server: PostgresServer) -> None:
    assert pg_server.dsn == f"postgresql://{pg_server.user}@127.0.0.1:{pg_server.port}/postgres"
    with psycopg.connect(pg_server.dsn) as conn:
        settings: dict[str, str] = dict(
            conn.execute(
                """
                SELECT name, setting FROM pg_settings
                WHERE name IN ('listen_addresses', 'max_connections', 'unix_socket_directories')
                """
            ).fetchall()
        )
    assert settings["listen_addresses"] == "127.0.0.1"
    assert int(settings["max_connections"]) >= 100
    assert settings["unix_socket_directories"].startswith(str(pg_server.datadir.parent))


def test_create_and_drop_database(pg_server: PostgresServer) -> None:
    name = "Mixed Case-db"  # identifiers are quoted, so odd names work
    dsn = pg_server.create_database(name)
    holder = psycopg.connect(dsn)  # a connected client must not block the drop
    try:
        with psycopg.connect(pg_server.dsn) as conn:
            listed = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        assert listed == (1,)
        pg_server.drop_database(name)
        with psycopg.connect(pg_server.dsn) as conn:
            gone = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        assert gone is None
    finally:
        holder.close()


def test_private_server_stops_and_starts_again(
    pg_factory: Callable[..., PostgresServer],
) -> None:
    server = pg_factory()
    dsn = server.create_database("plant")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION timescaledb")
        make_hypertable(conn)
        conn.execute("INSERT INTO readings VALUES (%s, 'pump-1', 1.0)", [T0])
    port = server.port

    server.stop()
    assert not server.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2)

    server.start()
    assert server.port == port
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM readings").fetchone() == (1,)

    # A crash (immediate stop) keeps what was committed; recovery runs on start.
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO readings VALUES (%s, 'pump-1', 2.0)", [T0 + timedelta(hours=1)])
    server.stop(mode="immediate")
    server.restart()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*), sum(value) FROM readings").fetchone() == (2, 3.0)


def test_private_servers_are_independent(
    pg_factory: Callable[..., PostgresServer], pg_server: PostgresServer
) -> None:
    private = pg_factory()
    assert private.port != pg_server.port
    private.create_database("only_here")
    with psycopg.connect(pg_server.dsn) as conn:
        found = conn.execute(
            sql.SQL("SELECT 1 FROM pg_database WHERE datname = {}").format(sql.Literal("only_here"))
        ).fetchone()
    assert found is None
    private.stop()
    with psycopg.connect(pg_server.dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
