"""Redundancy on the Pipeline page: the database nodes, each gateway's broker, failovers.

Like queries.py: functions of a SQLAlchemy `Connection` returning fixed columns, no
Streamlit. The replication state comes from `millrace_replication()` (migration 0009), a
SECURITY DEFINER function, so the dashboard role needs neither pg_monitor nor
pg_read_all_stats (which would also show it every session's query text).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import pandas as pd
from sqlalchemy import Connection, func, select, text

from millrace.cloud.schema.core import devices
from millrace.cloud.schema.ops import ops_events

MAX_OPS_EVENTS: Final = 500
REPLICATION_COLUMNS: Final = (
    "role",
    "name",
    "address",
    "state",
    "sync_state",
    "replay_lag_s",
    "lag_bytes",
)
OPS_EVENT_COLUMNS: Final = ("at", "kind", "device", "from_value", "to_value")


@dataclass(frozen=True, slots=True)
class DatabaseState:
    """The node the dashboard is connected to and what it knows of the other."""

    server: str  # host:port as the dashboard's DSN names it
    primary: bool
    # role 'standby' rows (on a primary) or one 'upstream' row (on a standby).
    replication: pd.DataFrame


def database_state(conn: Connection) -> DatabaseState:
    """Which node this connection is on, whether it is the primary, and replication lag.

    On the primary one row per standby (state, sync_state, replay lag in seconds and in
    bytes of WAL not yet replayed); on a standby one row for the primary it streams from.
    """
    info: Any = conn.connection.dbapi_connection.info  # type: ignore[union-attr]
    in_recovery = bool(conn.execute(text("SELECT pg_is_in_recovery()")).scalar())
    result = conn.execute(text("SELECT * FROM millrace_replication()"))
    frame = pd.DataFrame(result.fetchall(), columns=list(REPLICATION_COLUMNS))
    frame["lag_bytes"] = pd.to_numeric(frame["lag_bytes"]).astype("Float64")
    return DatabaseState(f"{info.host}:{info.port}", not in_recovery, frame)


def ops_events_in(
    conn: Connection, *, start: datetime, end: datetime, limit: int = MAX_OPS_EVENTS
) -> pd.DataFrame:
    """Broker moves and database primary changes in [start, end), newest first."""
    e = ops_events
    stmt = (
        select(
            e.c.at,
            e.c.kind,
            devices.c.name.label("device"),
            e.c.from_value,
            e.c.to_value,
        )
        .select_from(e.outerjoin(devices, devices.c.id == e.c.device_id))
        .where(e.c.at >= start, e.c.at < end)
        .order_by(e.c.at.desc(), e.c.id.desc())
        .limit(limit)
    )
    result = conn.execute(stmt)
    frame = pd.DataFrame(result.fetchall(), columns=list(OPS_EVENT_COLUMNS))
    frame["at"] = pd.to_datetime(frame["at"], utc=True)
    return frame


def gateway_brokers(conn: Connection) -> pd.DataFrame:
    """Each device's broker (of its last birth or heartbeat) and since when, by broker."""
    stmt = select(
        devices.c.name.label("device"),
        func.coalesce(devices.c.broker, "unknown").label("broker"),
        devices.c.broker_at.label("since"),
    ).order_by(devices.c.broker, devices.c.name)
    result = conn.execute(stmt)
    frame = pd.DataFrame(result.fetchall(), columns=["device", "broker", "since"])
    frame["since"] = pd.to_datetime(frame["since"], utc=True)
    return frame


def describe_event(kind: str, device: object, before: object, after: str) -> str:
    """One line an operator reads: what moved, from where, to where.

    `device` and `before` may be missing (None, or NaN from a DataFrame).
    """
    if kind == "broker_move":
        return f"{device} moved from broker {before} to {after}"
    if not isinstance(before, str):
        return f"database primary is {after}"
    return f"database primary moved from {before} to {after}"
