"""`millrace db upgrade`: migrate to head, then hypertables and least-privilege roles.

Idempotent and safe while workers run: a re-run at head changes nothing but
re-asserts grants, and GRANT/REVOKE take no lock that blocks writers. A
session advisory lock serialises concurrent upgrades of one database; role
creation tolerates a concurrent upgrade of another database in the cluster.

Before any change, the user's privileges are checked (cloud/dbprivileges.py): a
missing one is named with the statement that grants it, and nothing is changed.

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

from millrace.cloud.dbprivileges import check_privileges
from millrace.cloud.dsn import connect_writer
from millrace.errors import IngestError, UnreachableError

log = logging.getLogger(__name__)

# "millrace" in ASCII: one well-known key so every upgrader of a database queues on it.
ADVISORY_LOCK_KEY: Final = 0x6D696C6C72616365
INGEST_ROLE: Final = "millrace_ingest"
DASHBOARD_ROLE: Final = "millrace_dashboard"
RETENTION_ROLE: Final = "millrace_retention"
MANAGED_ROLES: Final = (INGEST_ROLE, DASHBOARD_ROLE, RETENTION_ROLE)

# What the ingest worker may do per table; a table not listed gets nothing.
INGEST_PRIVILEGES: Final[Mapping[str, tuple[str, ...]]] = {
    "devices": ("SELECT", "INSERT", "UPDATE"),
    "metrics": ("SELECT", "INSERT", "UPDATE"),
    # UPDATE: a window an agent closed early at SIGTERM is merged with its rest (writer.py).
    "readings": ("SELECT", "INSERT", "UPDATE"),
    "events": ("SELECT", "INSERT"),
    "rollup_hourly": ("SELECT", "INSERT", "UPDATE"),
    "rollup_daily": ("SELECT", "INSERT", "UPDATE"),
    # Commits add partials; a drain deletes them (UPDATE: its FOR UPDATE SKIP LOCKED).
    "rollup_pending": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    "dead_letters": ("INSERT",),
    "dead_letter_overflow": ("SELECT", "INSERT", "UPDATE"),
    "device_metrics": ("SELECT", "INSERT"),
    # DELETE: a metric a device's birth stops naming, with no data of it, is forgotten.
    "device_units": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    "ingest_ledger": ("SELECT", "INSERT"),
    "ingest_streams": ("SELECT", "INSERT", "UPDATE"),
    "sequence_gaps": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    # A repeated birth's hole is skipped (ON CONFLICT DO NOTHING); rows are never changed.
    "data_holes": ("SELECT", "INSERT"),
    "alert_rules": ("SELECT",),
    "alerts": ("SELECT", "INSERT", "UPDATE"),
    "device_health": ("SELECT", "INSERT", "UPDATE"),
    "device_health_history": ("SELECT", "INSERT"),
    "metric_freshness": ("SELECT", "INSERT", "UPDATE"),
    # The alert notification outbox: intents written at ingest, marked by the senders.
    "notifications": ("SELECT", "INSERT", "UPDATE"),
    # A gateway's broker move and a new database primary (cloud/opsevents.py).
    "ops_events": ("SELECT", "INSERT"),
}
# The dashboard reads everything; beyond that it acknowledges alerts and audits it.
DASHBOARD_COLUMN_UPDATES: Final[Mapping[str, tuple[str, ...]]] = {
    "alerts": ("acknowledged_at", "acknowledged_by", "ack_comment"),
}
DASHBOARD_INSERTS: Final = ("audit_log",)
# Retention (cloud/retention.py) prunes plain tables by DELETE; ingest_streams also needs
# UPDATE (open_gaps, and the FOR UPDATE row locks it takes before deleting).
RETENTION_PRIVILEGES: Final[Mapping[str, tuple[str, ...]]] = {
    "ingest_ledger": ("SELECT", "DELETE"),
    "ingest_streams": ("SELECT", "UPDATE", "DELETE"),
    "sequence_gaps": ("SELECT", "DELETE"),
    "data_holes": ("SELECT", "DELETE"),
    "alerts": ("SELECT", "DELETE"),
    "audit_log": ("SELECT", "DELETE"),
    "notifications": ("SELECT", "DELETE"),
    "ops_events": ("SELECT", "DELETE"),
    # Packing (cloud/packing.py) moves old windows from readings into readings_packed:
    # one DELETE ... RETURNING takes a chunk's rows (no lock holding the ingest off);
    # TRUNCATE gives back the index pages of a chunk VACUUM left without rows.
    "readings": ("SELECT", "DELETE", "TRUNCATE"),
    "readings_packed": ("SELECT", "INSERT", "DELETE"),
}
# drop_chunks needs the hypertable's owner, so retention calls this SECURITY DEFINER
# wrapper instead; it drops chunks of these hypertables only, nothing else.
DROP_CHUNKS_FUNCTION: Final = "millrace_drop_chunks"
RETENTION_HYPERTABLES: Final = (
    "readings",
    "events",
    "rollup_hourly",
    "rollup_daily",
    "dead_letters",
    "device_health_history",
    "readings_packed",
)
# The replication state for the dashboard (migration 0009 says why SECURITY DEFINER).
REPLICATION_FUNCTION: Final = "millrace_replication"
_SKIP_TABLES: Final = frozenset({"alembic_version"})


@dataclass(frozen=True, slots=True)
class UpgradeReport:
    """What an upgrade did, for the CLI to print."""

    revision_before: str | None
    revision_after: str | None
    hypertables_created: tuple[str, ...]
    roles_created: tuple[str, ...]
    privileges_changed: tuple[str, ...] = ()


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Alembic filter: skip indexes TimescaleDB made itself (`<table>_<column>_idx`)."""
    return not (
        type_ == "index" and reflected and compare_to is None and (name or "").endswith("_idx")
    )


def alembic_config(connection: Any = None) -> Any:
    """An Alembic Config for the packaged migrations (no alembic.ini needed)."""
    from alembic.config import Config

    config = Config()
    location = resources.files("millrace.cloud").joinpath("migrations")
    config.set_main_option("script_location", str(location))
    config.attributes["connection"] = connection
    return config


def _engine(dsn: str) -> Any:
    """A SQLAlchemy engine over psycopg for Alembic (one connection, no pool)."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    # A creator accepts both URL and key=value DSNs exactly as libpq does.
    return create_engine(
        "postgresql+psycopg://", creator=lambda: connect_writer(dsn), poolclass=NullPool
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
    from millrace.cloud.schema import HypertableSpec, metadata

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


Grants = dict[tuple[str, str], frozenset[str]]  # (object, role) -> privileges
ColumnGrants = dict[tuple[str, str, str], frozenset[str]]  # (table, column, role) -> privileges


def _desired(tables: list[str], sequences: dict[str, str]) -> tuple[Grants, ColumnGrants]:
    """What each managed role should hold, per table, sequence and column."""
    grants: Grants = {}
    for name in tables:
        grants[(name, INGEST_ROLE)] = frozenset(INGEST_PRIVILEGES.get(name, ()))
        reads = {"SELECT"} | ({"INSERT"} if name in DASHBOARD_INSERTS else set())
        grants[(name, DASHBOARD_ROLE)] = frozenset(reads)
        grants[(name, RETENTION_ROLE)] = frozenset(RETENTION_PRIVILEGES.get(name, ()))
    # Identity columns draw from sequences: whoever inserts needs USAGE on them.
    for sequence, owner in sequences.items():
        ingest = "INSERT" in INGEST_PRIVILEGES.get(owner, ())
        grants[(sequence, INGEST_ROLE)] = frozenset({"USAGE"} if ingest else ())
        dashboard = owner in DASHBOARD_INSERTS
        grants[(sequence, DASHBOARD_ROLE)] = frozenset({"USAGE"} if dashboard else ())
        grants[(sequence, RETENTION_ROLE)] = frozenset()
    columns: ColumnGrants = {
        (table, column, DASHBOARD_ROLE): frozenset({"UPDATE"})
        for table, names in DASHBOARD_COLUMN_UPDATES.items()
        if table in tables
        for column in names
    }
    return grants, columns


_CURRENT_GRANTS: Final = """
SELECT c.relname, a.grantee::regrole::text, a.privilege_type
FROM pg_class c, aclexplode(c.relacl) a
WHERE c.relnamespace = current_schema()::regnamespace
  AND a.grantee IN (SELECT oid FROM pg_roles WHERE rolname = ANY(%s))
"""
_CURRENT_COLUMN_GRANTS: Final = """
SELECT c.relname, att.attname, a.grantee::regrole::text, a.privilege_type
FROM pg_attribute att JOIN pg_class c ON c.oid = att.attrelid, aclexplode(att.attacl) a
WHERE c.relnamespace = current_schema()::regnamespace
  AND a.grantee IN (SELECT oid FROM pg_roles WHERE rolname = ANY(%s))
"""
_SEQUENCES: Final = """
SELECT c.relname, d.refobjid::regclass::text FROM pg_class c
JOIN pg_depend d ON d.objid = c.oid AND d.deptype IN ('a', 'i')
WHERE c.relkind = 'S' AND c.relnamespace = current_schema()::regnamespace
"""


def _grant(conn: psycopg.Connection[Any], tables: list[str]) -> list[str]:
    """Make both roles' privileges exactly the desired ones; returns the objects changed.

    Only objects whose privileges differ are touched: re-running the upgrade next to
    busy workers changes no catalog row (TimescaleDB updates chunk ACLs as it creates
    chunks, and two writers of one catalog row fail with "tuple concurrently updated").
    """
    roles = list(MANAGED_ROLES)
    schema = sql.Identifier(_schema(conn.cursor()))
    for role in roles:
        row = conn.execute(
            "SELECT has_schema_privilege(%s, current_schema(), 'USAGE')", [role]
        ).fetchone()
        if not (row and row[0]):
            conn.execute(
                sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, sql.Identifier(role))
            )
    sequences = dict(conn.execute(_SEQUENCES).fetchall())
    want, want_columns = _desired(tables, sequences)
    have: dict[tuple[str, str], set[str]] = {}
    for obj, role, privilege in conn.execute(_CURRENT_GRANTS, [roles]).fetchall():
        have.setdefault((obj, role), set()).add(privilege)
    have_columns: dict[tuple[str, str, str], set[str]] = {}
    for table, column, role, privilege in conn.execute(_CURRENT_COLUMN_GRANTS, [roles]):
        have_columns.setdefault((table, column, role), set()).add(privilege)
    stale = {
        obj for (obj, role), privs in want.items() if set(privs) != have.get((obj, role), set())
    }
    stale |= {obj for obj, _ in have if obj not in {o for o, _ in want}}
    stale |= {
        table
        for key in want_columns.keys() | have_columns.keys()
        for table in (key[0],)
        if set(want_columns.get(key, ())) != have_columns.get(key, set())
    }
    role_list = sql.SQL(", ").join(map(sql.Identifier, roles))
    for obj in sorted(stale):
        kind = sql.SQL("SEQUENCE " if obj in sequences else "TABLE ")
        target = sql.Composed([kind, sql.Identifier(obj)])
        conn.execute(sql.SQL("REVOKE ALL ON {} FROM {}").format(target, role_list))
        for role in roles:
            privileges = want.get((obj, role), frozenset())
            if privileges:
                conn.execute(
                    sql.SQL("GRANT {} ON {} TO {}").format(
                        sql.SQL(", ").join(sql.SQL(p) for p in sorted(privileges)),
                        target,
                        sql.Identifier(role),
                    )
                )
        for (table, column, role), privileges in sorted(want_columns.items()):
            if table == obj:
                conn.execute(
                    sql.SQL("GRANT {} ({}) ON {} TO {}").format(
                        sql.SQL(", ").join(sql.SQL(p) for p in sorted(privileges)),
                        sql.Identifier(column),
                        target,
                        sql.Identifier(role),
                    )
                )
    return sorted(stale)


_DROP_CHUNKS_BODY: Final = """
DECLARE
    dropped integer;
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = hypertable AND n.nspname = {schema} AND c.relname = ANY({allowed})
    ) THEN
        RAISE EXCEPTION 'millrace retention may not drop chunks of %', hypertable
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT count(*) INTO dropped FROM {ts_schema}.drop_chunks(hypertable, older_than => older_than);
    RETURN dropped;
END
"""


def _ensure_drop_chunks_function(conn: psycopg.Connection[Any], schema: str) -> bool:
    """(Re)create the retention role's drop_chunks wrapper when missing or changed."""
    row = conn.execute(
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"
        " WHERE e.extname = 'timescaledb'"
    ).fetchone()
    if row is None:
        raise IngestError("the timescaledb extension is missing; run millrace db upgrade")
    body = sql.SQL(_DROP_CHUNKS_BODY).format(
        schema=sql.Literal(schema),
        allowed=sql.Literal(list(RETENTION_HYPERTABLES)),
        ts_schema=sql.Identifier(row[0]),
    )
    body_text = body.as_string(conn)
    function = sql.Identifier(schema, DROP_CHUNKS_FUNCTION)
    existing = conn.execute(
        "SELECT p.prosrc FROM pg_proc p WHERE p.proname = %s"
        " AND p.pronamespace = current_schema()::regnamespace",
        [DROP_CHUNKS_FUNCTION],
    ).fetchone()
    if existing is not None and existing[0] == body_text:
        return False
    conn.execute(
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {}(hypertable regclass, older_than timestamptz)"
            " RETURNS integer LANGUAGE plpgsql SECURITY DEFINER"
            " SET search_path = pg_catalog, pg_temp AS {}"
        ).format(function, sql.Literal(body_text))
    )
    conn.execute(
        sql.SQL("REVOKE ALL ON FUNCTION {}(regclass, timestamptz) FROM PUBLIC").format(function)
    )
    conn.execute(
        sql.SQL("GRANT EXECUTE ON FUNCTION {}(regclass, timestamptz) TO {}").format(
            function, sql.Identifier(RETENTION_ROLE)
        )
    )
    return True


def _grant_replication_function(conn: psycopg.Connection[Any]) -> bool:
    """Let the dashboard role read the replication state; only when it may not yet."""
    function = sql.Identifier(_schema(conn.cursor()), REPLICATION_FUNCTION)
    signature = sql.SQL("{}()").format(function).as_string(conn)
    row = conn.execute(
        "SELECT has_function_privilege(%s, %s::regprocedure, 'EXECUTE')",
        [DASHBOARD_ROLE, signature],
    ).fetchone()
    if row is not None and row[0]:
        return False
    conn.execute(
        sql.SQL("GRANT EXECUTE ON FUNCTION {}() TO {}").format(
            function, sql.Identifier(DASHBOARD_ROLE)
        )
    )
    return True


def _schema(cur: psycopg.Cursor[Any]) -> str:
    cur.execute("SELECT current_schema()")
    row = cur.fetchone()
    if row is None or row[0] is None:
        raise IngestError("no current schema: check the search_path of the upgrading user")
    return str(row[0])


def _owned_tables() -> tuple[str, ...]:
    """Every table the upgrade creates or alters: the metadata's and Alembic's own."""
    from millrace.cloud.schema import metadata

    return (*sorted(metadata.tables), "alembic_version")


def _tables(cur: psycopg.Cursor[Any]) -> list[str]:
    from millrace.cloud.schema import metadata

    cur.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename"
    )
    present = {row[0] for row in cur.fetchall()}
    return sorted((set(metadata.tables) & present) - _SKIP_TABLES)


def _migrate(dsn: str) -> tuple[str | None, str | None]:
    """Alembic to head on a connection of its own; (revision before, after)."""
    from alembic import command

    engine = _engine(dsn)
    try:
        with engine.connect() as conn:
            before = _current_revision(conn)
            conn.commit()
            command.upgrade(alembic_config(conn), "head")
            conn.commit()
            after = _current_revision(conn)
            conn.commit()
    finally:
        engine.dispose()
    return before, after


def upgrade(dsn: str) -> UpgradeReport:
    """Bring the database at `dsn` to the newest schema; see the module docstring."""
    from sqlalchemy.exc import DBAPIError

    # Alembic narrates every step at INFO; our own summary line is enough.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        # Migrations run on the primary only: a multi-host DSN skips a standby (cloud/dsn.py).
        with connect_writer(dsn, autocommit=True) as conn:
            # Every missing privilege is said before the first change (cloud/dbprivileges.py).
            check_privileges(conn, roles=MANAGED_ROLES, tables=_owned_tables())
            with conn.cursor() as cur:
                _ensure_timescaledb(cur)
            # Held by this session for the whole upgrade; a second upgrader queues here.
            conn.execute("SELECT pg_advisory_lock(%s)", [ADVISORY_LOCK_KEY])
            try:
                before, after = _migrate(dsn)
                with conn.transaction(), conn.cursor() as cur:
                    hypertables = _create_hypertables(cur)
                with conn.cursor() as cur:
                    roles = _ensure_roles(cur)
                with conn.transaction(), conn.cursor() as cur:
                    changed = _grant(conn, _tables(cur))
                    if _ensure_drop_chunks_function(conn, _schema(cur)):
                        changed.append(DROP_CHUNKS_FUNCTION)
                    if _grant_replication_function(conn):
                        changed.append(REPLICATION_FUNCTION)
            finally:
                if not conn.broken:
                    conn.execute("SELECT pg_advisory_unlock(%s)", [ADVISORY_LOCK_KEY])
    except psycopg.OperationalError as exc:
        raise UnreachableError(f"cannot reach the database: {_first_line(exc)}") from exc
    except DBAPIError as exc:
        if isinstance(exc.orig, psycopg.OperationalError):
            raise UnreachableError(f"cannot reach the database: {_first_line(exc.orig)}") from exc
        raise
    if changed:
        log.info("privileges set on %s", ", ".join(changed))
    log.info("schema at %s (was %s)", after, before)
    return UpgradeReport(before, after, tuple(hypertables), tuple(roles), tuple(changed))


def new_revision(dsn: str, message: str) -> None:
    """Developer tool: write an Alembic revision for metadata changes (see docs/cloud.md).

    `dsn` must be a scratch database already at head (`upgrade(dsn)` first); the new
    file lands in cloud/migrations/versions/ for review.
    """
    from alembic import command

    engine = _engine(dsn)
    try:
        with engine.connect() as conn:
            command.revision(alembic_config(conn), message=message, autogenerate=True)
            conn.commit()
    finally:
        engine.dispose()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
