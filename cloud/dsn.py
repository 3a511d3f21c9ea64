"""Connections that write go to the primary, whichever node that is now.

With a Patroni pair the DSN names both nodes (`host=a,b port=p1,p2`, or
`postgresql://u@a:p1,b:p2/db`); libpq tries them in order and, with
`target_session_attrs=read-write`, skips a standby. So a fresh connection after a
failover reaches the new primary with no change of configuration. The ingest worker,
retention, migrations and the dashboard (its alert acknowledgements write) connect
through here; a DSN asking for a standby is refused at load, naming the key.
"""

from __future__ import annotations

from typing import Any, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict

from millrace.configfile import Table
from millrace.errors import ConfigError

WRITER_SESSION_ATTRS: Final = "read-write"
# What libpq accepts (PostgreSQL 14+); the last three may pick a standby, which refuses writes.
SESSION_ATTRS: Final = frozenset(
    {"any", "read-write", "primary", "read-only", "standby", "prefer-standby"}
)
STANDBY_SESSION_ATTRS: Final = frozenset({"read-only", "standby", "prefer-standby"})


def dsn_key(table: Table, *, env: str | None) -> str:
    """The key a DSN read by `configfile.read_dsn` came from, for error messages."""
    for name in ("dsn_file", "dsn"):
        if table.has(name):
            return table.key(name)
    return env or table.key("dsn")


def check_writer_dsn(dsn: str, *, key: str, connects_here: bool = True) -> str:
    """`dsn` if a writer can use it: parseable, hosts and ports agree, no standby asked for.

    `connects_here=False` is for a writer that connects without `connect_writer` (the
    dashboard's pool): its DSN must itself say target_session_attrs when it names hosts.
    """
    try:
        info = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        # libpq's own message may quote part of the string, password included: not shown.
        raise ConfigError(
            key, "libpq cannot parse this DSN (expected key=value pairs or a postgresql:// URL)"
        ) from None
    hosts = _count(info.get("host") or info.get("hostaddr"))
    ports = _count(info.get("port"))
    if ports > 1 and ports != hosts:
        raise ConfigError(
            key, f"names {hosts} host(s) but {ports} ports: give one port, or one per host"
        )
    attrs = str(info.get("target_session_attrs") or "")
    if attrs and attrs not in SESSION_ATTRS:
        raise ConfigError(
            key, f"target_session_attrs={attrs} is not one of {', '.join(sorted(SESSION_ATTRS))}"
        )
    if attrs in STANDBY_SESSION_ATTRS:
        raise ConfigError(
            key,
            f"target_session_attrs={attrs} may connect to a standby, which refuses writes;"
            f" use {WRITER_SESSION_ATTRS} or leave it out",
        )
    if not attrs and hosts > 1 and not connects_here:
        raise ConfigError(
            key,
            f"names {hosts} hosts but no target_session_attrs: add"
            f" target_session_attrs={WRITER_SESSION_ATTRS} so it follows the primary",
        )
    return dsn


def writer_params(dsn: str) -> dict[str, Any]:
    """Connection keywords that keep a writer on the primary unless the DSN already says how."""
    if conninfo_to_dict(dsn).get("target_session_attrs"):
        return {}
    return {"target_session_attrs": WRITER_SESSION_ATTRS}


def connect_writer(dsn: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """`psycopg.connect` to the primary among the DSN's hosts (see the module docstring)."""
    return psycopg.connect(dsn, **{**writer_params(dsn), **kwargs})


def _count(value: object) -> int:
    return len(str(value).split(",")) if value else 1
