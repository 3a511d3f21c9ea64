"""Failovers as events operators see: a gateway's broker move, a new database primary.

Both are written where they are noticed, cheaply: a device's broker only when a birth or
heartbeat arrives through a different one than recorded (one UPDATE that matches no row
otherwise), the primary only when an ingest worker connects. The dashboard's Pipeline page
lists `ops_events` and each device's `devices.broker`.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, Final

import psycopg

logger = logging.getLogger(__name__)

# Serialises workers that connect at once after a failover: one event per change.
PRIMARY_LOCK_KEY: Final = 0x6D696C6C70726D79


def note_broker(
    conn: psycopg.Connection[Any], device_id: int, broker: str, *, received_at: datetime
) -> None:
    """Record that `device_id` spoke through `broker` (host:port); an event if it moved.

    Only a change writes (and locks) the row; a message received before the one that set
    the current broker (delivered late by another worker) changes nothing.
    """
    row = conn.execute(
        """
        UPDATE devices d SET broker = %(broker)s, broker_at = %(at)s
          FROM (SELECT broker FROM devices WHERE id = %(id)s) AS old
         WHERE d.id = %(id)s AND d.broker IS DISTINCT FROM %(broker)s
           AND (d.broker_at IS NULL OR d.broker_at <= %(at)s)
        RETURNING old.broker, d.name
        """,
        {"id": device_id, "broker": broker, "at": received_at},
    ).fetchone()
    if row is None or row[0] is None:  # unchanged, outdated, or the first broker seen
        return
    conn.execute(
        "INSERT INTO ops_events (at, kind, device_id, from_value, to_value)"
        " VALUES (%s, 'broker_move', %s, %s, %s)",
        (received_at, device_id, row[0], broker),
    )
    logger.info("device %s moved from broker %s to %s", row[1], row[0], broker)


def server_of(conn: psycopg.Connection[Any]) -> str:
    """host:port of the server `conn` reached (of a multi-host DSN, the one it chose)."""
    return f"{conn.info.host}:{conn.info.port}"


def note_primary(conn: psycopg.Connection[Any]) -> bool:
    """Record the primary `conn` is on if it is not the one recorded last; True if new."""
    primary = server_of(conn)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [PRIMARY_LOCK_KEY])
        last = conn.execute(
            "SELECT to_value FROM ops_events WHERE kind = 'db_primary' ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if last is not None and last[0] == primary:
            return False
        before = None if last is None else last[0]
        conn.execute(
            "INSERT INTO ops_events (kind, from_value, to_value) VALUES ('db_primary', %s, %s)",
            (before, primary),
        )
    if before is None:
        logger.info("database primary is %s", primary)
    else:
        logger.warning("database primary moved from %s to %s", before, primary)
    return True
