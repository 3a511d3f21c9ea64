"""`millrace db upgrade`: schema equals the metadata; idempotent, concurrent, least privilege."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from millrace.cloud import dbupgrade
from millrace.cloud.schema import HypertableSpec, metadata
from tests.cloud.ingest_support import (
    Publisher,
    assert_stored_exactly,
    make_batches,
    make_config,
    publishers,
    query,
    running_worker,
    wait_ledger,
)

__all__ = ["publishers"]

pytestmark = pytest.mark.integration


def _schema_diff(dsn: str) -> list[Any]:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = dbupgrade._engine(dsn)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"include_object": dbupgrade.include_object, "compare_type": True}
            )
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def test_upgrade_builds_the_metadata_and_is_idempotent(fresh_db: str) -> None:
    first = dbupgrade.upgrade(fresh_db)
    assert first.revision_before is None and first.revision_after
    hypertables = {t.name for t in metadata.sorted_tables if "hypertable" in t.info}
    assert set(first.hypertables_created) == hypertables
    assert _schema_diff(fresh_db) == [], "migrations and cloud.schema.metadata differ"
    again = dbupgrade.upgrade(fresh_db)
    assert again.revision_before == again.revision_after == first.revision_after
    assert again.hypertables_created == () and again.roles_created == ()
    assert "readings" in first.privileges_changed
    assert again.privileges_changed == (), "a re-run must not touch the catalog"
    intervals = dict(
        query(
            fresh_db,
            "SELECT hypertable_name, time_interval::text FROM timescaledb_information.dimensions",
        )
    )
    for table in metadata.sorted_tables:
        spec = table.info.get("hypertable")
        if isinstance(spec, HypertableSpec):
            expected = scalar_interval(fresh_db, spec.chunk_interval)
            assert intervals[table.name] == expected, table.name


def scalar_interval(dsn: str, text: str) -> str:
    return str(query(dsn, "SELECT %s::interval::text", [text])[0][0])


def test_concurrent_upgrades_serialise(fresh_db: str) -> None:
    errors: list[BaseException] = []
    reports: list[dbupgrade.UpgradeReport] = []

    def run() -> None:
        try:
            reports.append(dbupgrade.upgrade(fresh_db))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert sum(1 for r in reports if r.revision_before is None) == 1
    assert sum(len(r.hypertables_created) for r in reports) == len(
        [t for t in metadata.sorted_tables if "hypertable" in t.info]
    )


def _login(dsn: str, role: str) -> str:
    login = f"{role.split('_')[1]}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                sql.Identifier(login), sql.Identifier(role)
            )
        )
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info["user"] = login
    return psycopg.conninfo.make_conninfo(**info)


def _allowed(dsn: str, statement: str) -> bool:
    with psycopg.connect(dsn) as conn:
        try:
            conn.execute(statement)
        except psycopg.errors.InsufficientPrivilege:
            return False
        finally:
            conn.rollback()
    return True


def test_roles_are_least_privilege(fresh_db: str) -> None:
    dbupgrade.upgrade(fresh_db)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("INSERT INTO devices (name) VALUES ('priv-a')")
        conn.execute(
            "INSERT INTO alerts (rule_name, device_id, metric, severity)"
            " SELECT 'r', id, 'temp', 'warning' FROM devices"
        )
    ingest = _login(fresh_db, dbupgrade.INGEST_ROLE)
    dashboard = _login(fresh_db, dbupgrade.DASHBOARD_ROLE)
    reading = (
        "INSERT INTO readings (ts, device_id, metric_id, period_s, count, sum, min, max, first,"
        " last, sumsq) VALUES (now(), 1, 1, 60, 1, 1, 1, 1, 1, 1, 1)"
    )
    assert _allowed(ingest, reading)
    assert _allowed(ingest, "INSERT INTO metrics (name) VALUES ('m')")
    assert _allowed(ingest, "UPDATE alerts SET state = 'cleared'")
    assert not _allowed(ingest, "DELETE FROM readings")
    assert not _allowed(ingest, "SELECT * FROM dead_letters")
    assert not _allowed(ingest, "SELECT * FROM audit_log")
    assert not _allowed(ingest, "DELETE FROM ingest_ledger")
    assert not _allowed(ingest, "CREATE TABLE evil (x int)")
    assert _allowed(dashboard, "SELECT * FROM readings, rollup_hourly, dead_letters LIMIT 1")
    assert _allowed(dashboard, "UPDATE alerts SET acknowledged_by = 'ann', ack_comment = 'ok'")
    assert _allowed(
        dashboard, "INSERT INTO audit_log (user_name, action, target) VALUES ('a', 'b', 'c')"
    )
    assert not _allowed(dashboard, "UPDATE alerts SET severity = 'info'")
    assert not _allowed(dashboard, reading)
    assert not _allowed(dashboard, "DELETE FROM alerts")
    roles = query(
        fresh_db,
        "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = ANY(%s) ORDER BY 1",
        [list(dbupgrade.MANAGED_ROLES)],
    )
    assert roles == [
        ("millrace_dashboard", False),
        ("millrace_ingest", False),
        ("millrace_retention", False),
    ]


def test_upgrade_while_a_worker_ingests(
    broker_factory: Callable[..., Any],
    fresh_db: str,
    publishers: Callable[..., Publisher],
    tmp_path: Path,
) -> None:
    from tests.cloud.ingest_support import prepare_database

    db = prepare_database(fresh_db)
    server = broker_factory()
    config = make_config(tmp_path, server=server, dsn=db.ingest_dsn, client_id="w1", group="gu")
    batches = make_batches("upg-a", batches=80, windows_per_batch=20, seed=21)
    with running_worker(config):
        pub = publishers(server, "upg-a")
        done = threading.Event()

        def upgrade_repeatedly() -> None:
            while not done.is_set():
                dbupgrade.upgrade(db.owner_dsn)

        upgrader = threading.Thread(target=upgrade_repeatedly)
        upgrader.start()
        try:
            for i in range(0, len(batches), 10):
                pub.publish(batches[i : i + 10])
            wait_ledger(db.owner_dsn, len(batches))
        finally:
            done.set()
            upgrader.join(60)
    assert_stored_exactly(db.owner_dsn, batches)


def test_cli_upgrade_and_a_clear_error_for_a_dead_database(fresh_db: str, tmp_path: Path) -> None:
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(fresh_db + "\n")
    ok = subprocess.run(
        [sys.executable, "-m", "millrace.cli", "db", "upgrade", "--dsn-file", str(dsn_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "schema at revision" in ok.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "millrace.cli",
            "db",
            "upgrade",
            "--dsn",
            "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 3  # docs/cli.md: a service it needs did not answer
    assert bad.stderr.startswith("millrace: error: cannot reach the database")
    assert "Traceback" not in bad.stderr


def test_cli_dsn_file_problems_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from millrace.cli import main

    absent, empty = tmp_path / "absent.dsn", tmp_path / "empty.dsn"
    empty.write_text("\n")
    assert main(["db", "upgrade", "--dsn-file", str(absent)]) == 2
    assert capsys.readouterr().err == f"millrace: error: --dsn-file: file not found: {absent}\n"
    assert main(["db", "upgrade", "--dsn-file", str(empty)]) == 2
    assert capsys.readouterr().err == f"millrace: error: --dsn-file: {empty} is empty\n"
    assert main(["db", "upgrade", "--dsn", "postgresql://x", "--dsn-file", str(empty)]) == 2
    assert "give --dsn or --dsn-file, not both" in capsys.readouterr().err


def _migrate(dsn: str, verb: str, revision: str) -> None:
    from alembic import command

    engine = dbupgrade._engine(dsn)
    try:
        with engine.begin() as conn:
            getattr(command, verb)(dbupgrade.alembic_config(conn), revision)
    finally:
        engine.dispose()


def test_units_move_from_the_metric_to_each_device_that_sent_it(fresh_db: str) -> None:
    """0004: metrics.unit (fleet-wide) becomes device_units for the devices with data."""
    _migrate(fresh_db, "upgrade", "0003")
    with psycopg.connect(fresh_db) as conn:
        conn.execute("INSERT INTO devices (name) VALUES ('oven-1'), ('oven-2'), ('idle')")
        conn.execute(
            "INSERT INTO metrics (name, unit) VALUES ('temp', 'degC'), ('speed', NULL),"
            " ('born.only', 'K')"  # named by a birth, no data: no device to give it to
        )
        conn.execute(
            "INSERT INTO device_metrics (device_id, metric_id)"
            " SELECT d.id, m.id FROM devices d, metrics m"
            " WHERE d.name IN ('oven-1', 'oven-2') AND m.name IN ('temp', 'speed')"
        )
    dbupgrade.upgrade(fresh_db)
    with psycopg.connect(fresh_db) as conn:
        rows = conn.execute(
            "SELECT d.name, u.metric, u.unit FROM device_units u JOIN devices d"
            " ON d.id = u.device_id ORDER BY 1, 2"
        ).fetchall()
        assert rows == [("oven-1", "temp", "degC"), ("oven-2", "temp", "degC")]
        columns = conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'metrics'"
        ).fetchall()
        assert ("unit",) not in columns
        conn.execute(
            "UPDATE device_units SET unit = 'K'"
            " WHERE device_id = (SELECT id FROM devices WHERE name = 'oven-1')"
        )
        conn.execute(
            "INSERT INTO device_units (device_id, metric, unit)"
            " SELECT id, 'temp', 'degC' FROM devices WHERE name = 'idle'"
        )
    assert _schema_diff(fresh_db) == []
    _migrate(fresh_db, "downgrade", "0003")  # back to one label: the most common one
    with psycopg.connect(fresh_db) as conn:
        units = dict(conn.execute("SELECT name, unit FROM metrics").fetchall())
        # born.only's label had no device to go to: gone, as the births will say it again.
        assert units == {"temp": "degC", "speed": None, "born.only": None}
