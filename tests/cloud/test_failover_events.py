"""Failovers operators see: a gateway's broker move and a new database primary (ops_events).

Against real TimescaleDB. The database failover itself is
tests/dashboards/test_pipeline_redundancy.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from millrace.cloud import dbupgrade, opsevents
from millrace.cloud.registry import apply_heartbeat, apply_state
from millrace.wire import DeviceState, Heartbeat
from tests.cloud.ingest_support import query

T0 = datetime(2026, 12, 6, 8, 0, tzinfo=UTC)
BOOT = "c" * 32
A = "a.plant.example:8883"
B = "b.plant.example:8883"


def _heartbeat(device: str) -> Heartbeat:
    return Heartbeat(device, BOOT, int(T0.timestamp() * 1000), 0, 0, 0.0, 0, 0)


def _events(dsn: str) -> list[tuple[Any, ...]]:
    return query(
        dsn,
        "SELECT e.kind, d.name, e.from_value, e.to_value FROM ops_events e"
        " LEFT JOIN devices d ON d.id = e.device_id ORDER BY e.id",
    )


def test_a_gateway_heard_through_another_broker_is_one_move_event(fresh_db: str) -> None:
    dbupgrade.upgrade(fresh_db)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        birth = DeviceState("gw0003", "online", int(T0.timestamp() * 1000), boot_id=BOOT)
        apply_state(conn, birth, received_at=T0, broker=A)
        for i in range(1, 4):
            apply_heartbeat(
                conn, _heartbeat("gw0003"), received_at=T0 + timedelta(seconds=i), broker=A
            )
        apply_heartbeat(conn, _heartbeat("gw0003"), received_at=T0 + timedelta(seconds=5), broker=B)
        apply_heartbeat(conn, _heartbeat("gw0003"), received_at=T0 + timedelta(seconds=6), broker=B)
        # Received through A before the move, committed after it by another worker.
        apply_heartbeat(conn, _heartbeat("gw0003"), received_at=T0 + timedelta(seconds=4), broker=A)
        # A will is the broker's message: it says nothing about where the gateway is.
        will = DeviceState("gw0003", "offline", int(T0.timestamp() * 1000), boot_id=BOOT)
        apply_state(conn, will, received_at=T0 + timedelta(seconds=7), broker=A)
    assert _events(fresh_db) == [("broker_move", "gw0003", A, B)]
    assert query(fresh_db, "SELECT broker, broker_at FROM devices WHERE name = 'gw0003'") == [
        (B, T0 + timedelta(seconds=5))
    ]


def test_a_new_primary_is_recorded_once_per_change(fresh_db: str) -> None:
    dbupgrade.upgrade(fresh_db)
    info = psycopg.conninfo.conninfo_to_dict(fresh_db)
    assert info["host"] == "127.0.0.1"
    other = psycopg.conninfo.make_conninfo(**{**info, "host": "localhost"})
    port = info["port"]
    for dsn, recorded in ((fresh_db, True), (fresh_db, False), (other, True), (other, False)):
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert opsevents.note_primary(conn) is recorded
    assert _events(fresh_db) == [
        ("db_primary", None, None, f"127.0.0.1:{port}"),
        ("db_primary", None, f"127.0.0.1:{port}", f"localhost:{port}"),
    ]
