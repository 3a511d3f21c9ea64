"""`millrace db upgrade` checks its user's privileges first and says what to grant."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import replace

import psycopg
import pytest
from psycopg import sql

from millrace.cloud.dbprivileges import UpgradePrivileges, problems
from millrace.cloud.dbupgrade import MANAGED_ROLES
from tests.fixtures.fix_postgres import PostgresServer

ALL_GRANTED = UpgradePrivileges(
    user="owner",
    database="millrace",
    schema="public",
    superuser=False,
    createrole=True,
    schema_create=True,
    schema_grant=True,
    timescaledb=True,
    missing_roles=MANAGED_ROLES,
    roles_without_usage=MANAGED_ROLES,
    foreign_tables=(),
)


def test_an_owner_with_createrole_and_the_extension_lacks_nothing() -> None:
    assert problems(ALL_GRANTED) == []


def test_without_createrole_the_fix_names_alter_role_and_the_roles_to_make() -> None:
    (found,) = problems(replace(ALL_GRANTED, createrole=False))
    assert "`ALTER ROLE owner CREATEROLE`" in found
    assert all(role in found for role in MANAGED_ROLES)


def test_roles_made_beforehand_need_no_createrole() -> None:
    assert problems(replace(ALL_GRANTED, createrole=False, missing_roles=())) == []


def test_a_missing_extension_needs_a_superuser_once() -> None:
    (found,) = problems(replace(ALL_GRANTED, timescaledb=False))
    assert "a superuser must run `CREATE EXTENSION timescaledb` in database millrace" in found
    assert problems(replace(ALL_GRANTED, timescaledb=False, superuser=True)) == []


def test_tables_of_another_owner_and_no_create_on_the_schema_are_named() -> None:
    found = problems(
        replace(ALL_GRANTED, schema_create=False, foreign_tables=(("readings", "admin"),))
    )
    assert any("belong to admin" in f and "GRANT admin TO owner" in f for f in found)
    assert "`GRANT CREATE ON SCHEMA public TO owner`" in found


def _upgrade(dsn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "millrace.cli", "db", "upgrade", "--dsn", dsn],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def _tables(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return sorted(r[0] for r in rows)


@pytest.mark.integration
def test_db_upgrade_without_createrole_says_what_to_grant_and_changes_nothing(
    pg_factory: Callable[..., PostgresServer],
) -> None:
    """The issue's case: an owner without CREATEROLE; then the advice is followed."""
    server = pg_factory()  # its own cluster: the group roles must not exist yet
    owner = f"owner_{uuid.uuid4().hex[:8]}"
    dsn = server.create_database("plant")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION timescaledb")
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(owner)))
        conn.execute(sql.SQL("ALTER DATABASE plant OWNER TO {}").format(sql.Identifier(owner)))
    owner_dsn = server.dsn_for("plant", user=owner)

    refused = _upgrade(owner_dsn)

    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert f"`ALTER ROLE {owner} CREATEROLE`" in refused.stderr
    assert "nothing was changed" in refused.stderr
    assert _tables(dsn) == []  # not even alembic_version
    with psycopg.connect(dsn) as conn:
        roles = conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", [list(MANAGED_ROLES)]
        ).fetchall()
    assert roles == []

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} CREATEROLE").format(sql.Identifier(owner)))
    done = _upgrade(owner_dsn)

    assert done.returncode == 0, done.stderr
    assert "readings" in _tables(dsn)
    assert "roles created: " + ", ".join(MANAGED_ROLES) in done.stdout


@pytest.mark.integration
def test_db_upgrade_by_a_non_superuser_without_the_extension_asks_a_superuser(
    pg_factory: Callable[..., PostgresServer],
) -> None:
    server = pg_factory()
    owner = f"owner_{uuid.uuid4().hex[:8]}"
    dsn = server.create_database("plant")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEROLE").format(sql.Identifier(owner)))
        conn.execute(sql.SQL("ALTER DATABASE plant OWNER TO {}").format(sql.Identifier(owner)))

    refused = _upgrade(server.dsn_for("plant", user=owner))

    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    assert "a superuser must run `CREATE EXTENSION timescaledb` in database plant" in (
        refused.stderr
    )
    assert _tables(dsn) == []


@pytest.mark.integration
def test_db_upgrade_by_an_owner_without_createrole_uses_roles_made_beforehand(
    pg_factory: Callable[..., PostgresServer],
) -> None:
    """The Ansible way (docs/rollout.md): a superuser makes the groups, the owner upgrades."""
    server = pg_factory()
    owner = f"owner_{uuid.uuid4().hex[:8]}"
    dsn = server.create_database("plant")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION timescaledb")
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(owner)))
        conn.execute(sql.SQL("ALTER DATABASE plant OWNER TO {}").format(sql.Identifier(owner)))
        for role in MANAGED_ROLES:
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))

    done = _upgrade(server.dsn_for("plant", user=owner))

    assert done.returncode == 0, done.stderr
    assert "roles created: none" in done.stdout
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT has_table_privilege('millrace_ingest', 'readings', 'INSERT'),"
            " has_table_privilege('millrace_dashboard', 'readings', 'INSERT')"
        ).fetchone()
    assert row == (True, False)


def test_db_upgrade_help_names_the_privileges_and_the_dsn_file_format(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from millrace.cli import main

    with pytest.raises(SystemExit):
        main(["db", "upgrade", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "CREATEROLE" in text and "CREATE EXTENSION timescaledb" in text
    assert "one line, a postgresql:// URL or key=value pairs" in text
