"""Failovers operators see: a gateway's broker move and a new database primary (ops_events).

Against real TimescaleDB; the move from real messages through two real brokers into a
worker on both. The database failover itself is tests/dashboards/test_pipeline_redundancy.py.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import create_engine

from millrace import topics
from millrace.cloud import dbupgrade, opsevents
from millrace.cloud.registry import apply_heartbeat, apply_state
from millrace.dashboards import redundancy
from millrace.wire import DeviceState, Heartbeat
from tests.cloud.ingest_support import (
    IngestDb,
    Publisher,
    ingest_db,
    query,
    running_worker,
    wait_for,
)
from tests.cloud.test_broker_failover import endpoint, worker_config

T0 = datetime(2026, 12, 6, 8, 0, tzinfo=UTC)
BOOT = "c" * 32
__all__ = ["ingest_db"]

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


def test_a_gateway_moving_between_real_brokers_shows_as_a_move_on_the_pipeline_page(
    broker_factory: Any, ingest_db: IngestDb, tmp_path: Path
) -> None:
    a, b = broker_factory(), broker_factory()
    config = worker_config(tmp_path, [a, b], ingest_db.ingest_dsn, "fo-events")
    device = f"fo-ev-{uuid.uuid4().hex[:6]}"
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    beat = Heartbeat(device, BOOT, now_ms, 0, 0, 0.0, 0, 0).to_json()

    def broker_of() -> Any:
        rows = query(ingest_db.owner_dsn, "SELECT broker FROM devices WHERE name = %s", [device])
        return rows[0][0] if rows else None

    with running_worker(config):
        on_a = Publisher(a, device)
        try:
            on_a.publish_raw(
                DeviceState(device, "online", now_ms, boot_id=BOOT).to_json(),
                topic=topics.state_topic(device),
            )
            on_a.publish_raw(beat, topic=topics.health_topic(device))
            wait_for(lambda: broker_of() == endpoint(a), what="the gateway on broker a")
        finally:
            on_a.close()
        on_b = Publisher(b, device)
        try:
            on_b.publish_raw(beat, topic=topics.health_topic(device))
            wait_for(lambda: broker_of() == endpoint(b), what="the gateway on broker b")
        finally:
            on_b.close()
    engine = create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(ingest_db.owner_dsn)
    )
    try:
        with engine.connect() as conn:
            events = redundancy.ops_events_in(
                conn, start=datetime.now(UTC) - timedelta(hours=1), end=datetime.now(UTC)
            )
            brokers = redundancy.gateway_brokers(conn)
    finally:
        engine.dispose()
    moves = events[events["kind"] == "broker_move"]
    lines = [
        redundancy.describe_event(*row)
        for row in moves[["kind", "device", "from_value", "to_value"]].itertuples(index=False)
    ]
    assert lines == [f"{device} moved from broker {endpoint(a)} to {endpoint(b)}"]
    assert brokers.set_index("device").loc[device, "broker"] == endpoint(b)
    # The worker's first connection names the primary it found.
    primaries = events[events["kind"] == "db_primary"]
    assert list(primaries["to_value"]) == [_server(ingest_db.ingest_dsn)]


def _server(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        return opsevents.server_of(conn)
