"""`millrace db upgrade`: migrate to head, then hypertables and least-privilege roles.

Idempotent and safe while workers run: a re-run at head changes nothing but
re-asserts grants, and GRANT/REVOKE take no lock that blocks writers. A
session advisory lock serialises concurrent upgrades of one database; role
creation tolerates a concurrent upgrade of another database in the cluster.

Roles are NOLOGIN groups; deployments grant them to login users:
`CREATE ROLE ingest1 LOGIN PASSWORD '...' IN ROLE millrace_ingest`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import psycopg
from psycopg import sql

from millrace.errors import IngestError

log = logging.getLogger(__name__)

# "millrace" in ASCII: one well-known key so every upgrader of a database queues on it.
ADVISORY_LOCK_KEY: Final = 0x6D696C6C72616365
INGEST_ROLE: Final = "millrace_ingest"
DASHBOARD_ROLE: Final = "millrace_dashboard"
MANAGED_ROLES: Final = (INGEST_ROLE, DASHBOARD_ROLE)

# What the ingest worker may do per table; a table not listed gets nothing.
INGEST_PRIVILEGES: Final[Mapping[str, tuple[str, ...]]] = {
    "devices": ("SELECT", "INSERT", "UPDATE"),
    "metrics": ("SELECT", "INSERT"),
    "readings": ("SELECT", "INSERT"),
    "events": ("SELECT", "INSERT"),
    "rollup_hourly": ("SELECT", "INSERT", "UPDATE"),
    "rollup_daily": ("SELECT", "INSERT", "UPDATE"),
    "dead_letters": ("INSERT",),
    "ingest_ledger": ("SELECT", "INSERT"),
    "ingest_streams": ("SELECT", "INSERT", "UPDATE"),
    "sequence_gaps": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    "alert_rules": ("SELECT",),
    "alerts": ("SELECT", "INSERT", "UPDATE"),
    "device_health": ("SELECT", "INSERT", "UPDATE"),
    "device_health_history": ("SELECT", "INSERT"),
    "metric_freshness": ("SELECT", "INSERT", "UPDATE"),
}
# The dashboard reads everything; beyond that it acknowledges alerts and audits it.
DASHBOARD_COLUMN_UPDATES: Final[Mapping[str, tuple[str, ...]]] = {
    "alerts": ("acknowledged_at", "acknowledged_by", "ack_comment"),
}
DASHBOARD_INSERTS: Final = ("audit_log",)
_SKIP_TABLES: Final = frozenset({"alembic_version"})


@dataclass(frozen=True, slots=True)
class UpgradeReport:
    """What an upgrade did, for the CLI to print."""

    revision_before: str | None
    revision_after: str | None
    hypertables_created: tuple[str, ...]
    roles_created: tuple[str, ...]


def alembic_config(connection: Any = None) -> Any:
    """An Alembic Config for the packaged migrations (no alembic.ini needed)."""
    from alembic.config import Config

    config = Config()
    location = resources.files("cloud").joinpath("migrations")
    config.set_main_option("script_location", str(location))
    config.attributes["connection"] = connection
    return config


def _engine(dsn: str) -> Any:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    # A creator accepts both URL and key=value DSNs exactly as libpq does.
    return create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(dsn), poolclass=NullPool
    )


def _current_revision(conn: Any) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()  # type: ignore[no-any-return]


def _ensure_timescaledb(cur: psycopg.Cursor[Any]) -> None:
    cur.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
    if cur.fetchone() is not None:
        return
    try:
        cur.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except psycopg.Error as exc:
        raise IngestError(
            "cannot create the timescaledb extension "
            f"({exc.diag.message_primary or exc}); a superuser must run "
            "CREATE EXTENSION timescaledb in this database, with timescaledb in "
            "shared_preload_libraries"
        ) from exc


def _create_hypertables(cur: psycopg.Cursor[Any]) -> list[str]:
    from cloud.schema import HypertableSpec, metadata

    cur.execute(
        "SELECT hypertable_name FROM timescaledb_information.hypertables"
        " WHERE hypertable_schema = current_schema()"
    )
    existing = {row[0] for row in cur.fetchall()}
    created = []
    for table in metadata.sorted_tables:
        spec = table.info.get("hypertable")
        if not isinstance(spec, HypertableSpec) or table.name in existing:
            continue
        cur.execute(
            "SELECT create_hypertable(%s::regclass, %s, chunk_time_interval => %s::interval,"
            " create_default_indexes => %s, if_not_exists => true, migrate_data => true)",
            [table.name, spec.time_column, spec.chunk_interval, spec.default_indexes],
        )
        created.append(table.name)
        log.info(
            "hypertable %s on %s, chunks of %s", table.name, spec.time_column, spec.chunk_interval
        )
    return created


def _ensure_roles(cur: psycopg.Cursor[Any]) -> list[str]:
    created = []
    for role in MANAGED_ROLES:
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role])
        if cur.fetchone() is not None:
            continue
        # A concurrent upgrade of another database may create it first: not an error.
        cur.execute(
            sql.SQL(
                "DO $$ BEGIN CREATE ROLE {} NOLOGIN;"
                " EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
            ).format(sql.Identifier(role))
        )
        created.append(role)
    return created


def _privileges(names: tuple[str, ...]) -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL(p) for p in names)


def _grant(cur: psycopg.Cursor[Any], tables: list[str]) -> None:
    """Reset and re-grant both roles' privileges on every table (one transaction)."""
    ingest, dashboard = sql.Identifier(INGEST_ROLE), sql.Identifier(DASHBOARD_ROLE)
    cur.execute(
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}, {}").format(
            sql.Identifier(_schema(cur)), ingest, dashboard
        )
    )
    for name in tables:
        table = sql.Identifier(name)
        cur.execute(sql.SQL("REVOKE ALL ON {} FROM {}, {}").format(table, ingest, dashboard))
        cur.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(table, dashboard))
        if name in INGEST_PRIVILEGES:
            cur.execute(
                sql.SQL("GRANT {} ON {} TO {}").format(
                    _privileges(INGEST_PRIVILEGES[name]), table, ingest
                )
            )
        if name in DASHBOARD_COLUMN_UPDATES:
            columns = sql.SQL(", ").join(map(sql.Identifier, DASHBOARD_COLUMN_UPDATES[name]))
            cur.execute(sql.SQL("GRANT UPDATE ({}) ON {} TO {}").format(columns, table, dashboard))
        if name in DASHBOARD_INSERTS:
            cur.execute(sql.SQL("GRANT INSERT ON {} TO {}").format(table, dashboard))
    # Identity columns draw from sequences: ingest inserts into several such tables.
    cur.execute(
        "SELECT c.relname, d.refobjid::regclass::text FROM pg_class c"
        " JOIN pg_depend d ON d.objid = c.oid AND d.deptype IN ('a', 'i')"
        " WHERE c.relkind = 'S' AND c.relnamespace = current_schema()::regnamespace"
    )
    for sequence, owner in cur.fetchall():
        seq = sql.Identifier(sequence)
        cur.execute(sql.SQL("REVOKE ALL ON SEQUENCE {} FROM {}, {}").format(seq, ingest, dashboard))
        if "INSERT" in INGEST_PRIVILEGES.get(owner, ()):
            cur.execute(sql.SQL("GRANT USAGE ON SEQUENCE {} TO {}").format(seq, ingest))
        if owner in DASHBOARD_INSERTS:
            cur.execute(sql.SQL("GRANT USAGE ON SEQUENCE {} TO {}").format(seq, dashboard))


def _schema(cur: psycopg.Cursor[Any]) -> str:
    cur.execute("SELECT current_schema()")
    row = cur.fetchone()
    if row is None or row[0] is None:
        raise IngestError("no current schema: check the search_path of the upgrading user")
    return str(row[0])


def _tables(cur: psycopg.Cursor[Any]) -> list[str]:
    from cloud.schema import metadata

    cur.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename"
    )
    present = {row[0] for row in cur.fetchall()}
    return sorted((set(metadata.tables) & present) - _SKIP_TABLES)


def upgrade(dsn: str) -> UpgradeReport:
    """Bring the database at `dsn` to the newest schema; see the module docstring."""
    from alembic import command

    # Alembic narrates every step at INFO; our own summary line is enough.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    engine = _engine(dsn)
    try:
        with engine.connect() as conn:
            raw: psycopg.Connection[Any] = conn.connection.driver_connection  # type: ignore[assignment]
            with raw.cursor() as cur:
                _ensure_timescaledb(cur)
            conn.commit()
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({ADVISORY_LOCK_KEY})")
            conn.commit()
            try:
                before = _current_revision(conn)
                conn.commit()
                command.upgrade(alembic_config(conn), "head")
                conn.commit()
                after = _current_revision(conn)
                conn.commit()
                with raw.cursor() as cur:
                    hypertables = _create_hypertables(cur)
                    roles = _ensure_roles(cur)
                    _grant(cur, _tables(cur))
                conn.commit()
            finally:
                conn.rollback()
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({ADVISORY_LOCK_KEY})")
                conn.commit()
    except psycopg.OperationalError as exc:
        raise IngestError(f"cannot reach the database: {exc}") from exc
    finally:
        engine.dispose()
    log.info("schema at %s (was %s)", after, before)
    return UpgradeReport(before, after, tuple(hypertables), tuple(roles))
