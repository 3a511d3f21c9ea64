"""What `millrace db upgrade` needs of its user, checked before it changes anything.

The upgrade creates tables (CREATE on the schema), the NOLOGIN group roles
(CREATEROLE, unless a superuser made them beforehand), grants USAGE on the schema
to them (the schema's owner, or USAGE WITH GRANT OPTION), and alters tables that
exist already (their owner). The timescaledb extension is not trusted: creating it
takes a superuser, once per database. Found lacking, all of it is said in one line
with the statements that fix it, before the first change, so a refused upgrade
leaves no half-made schema behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import psycopg

from millrace.errors import ConfigError

# The key a refusal names: the DSN's user is what lacks the privilege.
PRIVILEGE_KEY: Final = "database user"


@dataclass(frozen=True, slots=True)
class UpgradePrivileges:
    """What the upgrading user may do in the target database, as the catalog says."""

    user: str
    database: str
    schema: str
    superuser: bool
    createrole: bool
    schema_create: bool
    schema_grant: bool  # owns the schema or holds USAGE WITH GRANT OPTION
    timescaledb: bool  # the extension exists in this database
    missing_roles: tuple[str, ...]
    roles_without_usage: tuple[str, ...]
    foreign_tables: tuple[tuple[str, str], ...]  # (table, owner) the user cannot act as


def _ident(name: str) -> str:
    """`name` as SQL would need it quoted, for the statements a message suggests."""
    plain = name.isidentifier() and name == name.lower() and name.isascii()
    return name if plain else '"' + name.replace('"', '""') + '"'


def problems(p: UpgradePrivileges) -> list[str]:
    """One clause per missing privilege, each naming the statement that grants it."""
    found: list[str] = []
    user = _ident(p.user)
    if not p.timescaledb and not p.superuser:
        found.append(
            f"a superuser must run `CREATE EXTENSION timescaledb` in database {p.database} once"
            " (timescaledb in shared_preload_libraries)"
        )
    if p.superuser:
        return found
    if p.foreign_tables:
        owners = sorted({owner for _, owner in p.foreign_tables})
        tables = ", ".join(sorted(t for t, _ in p.foreign_tables)[:3])
        found.append(
            f"tables ({tables}) belong to {', '.join(owners)}: run the upgrade as that role"
            f" or `GRANT {_ident(owners[0])} TO {user}`"
        )
    if not p.schema_create:
        found.append(f"`GRANT CREATE ON SCHEMA {_ident(p.schema)} TO {user}`")
    if p.missing_roles and not p.createrole:
        roles = ", ".join(p.missing_roles)
        found.append(
            f"it may not create roles: `ALTER ROLE {user} CREATEROLE`, or a superuser creates"
            f" {roles} beforehand (`CREATE ROLE <name> NOLOGIN` each)"
        )
    if p.roles_without_usage and not p.schema_grant:
        found.append(
            f"it may not grant USAGE on schema {p.schema}: make it the schema's owner"
            f" (`ALTER SCHEMA {_ident(p.schema)} OWNER TO {user}`)"
        )
    return found


_FACTS: Final = """
SELECT current_user, current_database(), current_schema(), r.rolsuper, r.rolcreaterole,
       has_schema_privilege(current_schema(), 'CREATE'),
       pg_has_role(n.nspowner, 'USAGE')
           OR has_schema_privilege(current_schema(), 'USAGE WITH GRANT OPTION'),
       EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
FROM pg_roles r, pg_namespace n
WHERE r.rolname = current_user AND n.nspname = current_schema()
"""
_FOREIGN_TABLES: Final = """
SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_class c
WHERE c.relnamespace = current_schema()::regnamespace AND c.relname = ANY(%s)
  AND NOT pg_has_role(c.relowner, 'USAGE')
ORDER BY c.relname
"""


def read_privileges(
    conn: psycopg.Connection[Any], *, roles: tuple[str, ...], tables: tuple[str, ...]
) -> UpgradePrivileges:
    """Gather the facts `problems` judges; reads the catalog only."""
    row = conn.execute(_FACTS).fetchone()
    if row is None or row[2] is None:
        raise ConfigError(
            PRIVILEGE_KEY, "no current schema: check the search_path of the upgrading user"
        )
    user, database, schema, superuser, createrole, create, grant, timescaledb = row
    existing = {
        name
        for (name,) in conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", [list(roles)]
        )
    }
    missing = tuple(r for r in roles if r not in existing)
    with_usage = {
        name
        for (name,) in conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)"
            " AND has_schema_privilege(oid, current_schema()::regnamespace, 'USAGE')",
            [list(existing)],
        )
    }
    without_usage = tuple(r for r in roles if r not in with_usage)
    foreign = tuple(
        (str(t), str(o)) for t, o in conn.execute(_FOREIGN_TABLES, [list(tables)]).fetchall()
    )
    return UpgradePrivileges(
        user=str(user),
        database=str(database),
        schema=str(schema),
        superuser=bool(superuser),
        createrole=bool(createrole),
        schema_create=bool(create),
        schema_grant=bool(grant),
        timescaledb=bool(timescaledb),
        missing_roles=missing,
        roles_without_usage=without_usage,
        foreign_tables=foreign,
    )


def check_privileges(
    conn: psycopg.Connection[Any], *, roles: tuple[str, ...], tables: tuple[str, ...]
) -> UpgradePrivileges:
    """Raise one ConfigError naming every missing privilege and its fix; nothing is changed."""
    privileges = read_privileges(conn, roles=roles, tables=tables)
    found = problems(privileges)
    if found:
        raise ConfigError(
            PRIVILEGE_KEY,
            f"{privileges.user} cannot upgrade database {privileges.database}, nothing was"
            f" changed: {'; '.join(found)}",
        )
    return privileges


__all__ = ["UpgradePrivileges", "check_privileges", "problems", "read_privileges"]
