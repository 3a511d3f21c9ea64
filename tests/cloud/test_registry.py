"""Device registry: status transitions from birth, will and data, and heartbeats, in TimescaleDB."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from millrace.cloud import dbupgrade
from millrace.cloud.registry import (
    apply_heartbeat,
    apply_state,
    derive_status,
    device_statuses,
    ensure_device,
    status_select,
)
from millrace.wire import DeviceState, Heartbeat

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
BOOT_1 = "1" * 32
BOOT_2 = "2" * 32


@pytest.fixture
def conn(fresh_db: str) -> Iterator[psycopg.Connection]:
    dbupgrade.upgrade(fresh_db)  # the real schema: hypertables and roles
    with psycopg.connect(fresh_db) as connection:
        yield connection


def birth(device: str, boot: str = BOOT_1, **kw: str) -> DeviceState:
    return DeviceState(device, "online", int(T0.timestamp() * 1000), boot_id=boot, **kw)


def will(device: str, boot: str = BOOT_1) -> DeviceState:
    return DeviceState(device, "offline", int(T0.timestamp() * 1000), boot_id=boot)


def status_of(conn: psycopg.Connection, name: str, now: datetime, stale_s: float = 300) -> str:
    (row,) = device_statuses(conn, stale_after_s=stale_s, now=now, names=[name])
    return row.status


def set_last_data(conn: psycopg.Connection, name: str, at: datetime) -> None:
    """What the writer does on commit (its column): last data seen."""
    conn.execute("UPDATE devices SET last_data_at = %s WHERE name = %s", (at, name))


@pytest.mark.integration
def test_birth_online_will_offline_and_no_data_stale(conn: psycopg.Connection) -> None:
    apply_state(conn, birth("press-1", agent_version="1.2.0", config_hash="abc"), received_at=T0)
    row = conn.execute(
        "SELECT status, boot_id, agent_version, config_hash, last_state_at, last_seen_at"
        " FROM devices WHERE name = 'press-1'"
    ).fetchone()
    assert row == ("online", BOOT_1, "1.2.0", "abc", T0, T0)
    # Just born: a grace period before missing data makes it stale.
    assert status_of(conn, "press-1", T0 + timedelta(seconds=299)) == "online"
    assert status_of(conn, "press-1", T0 + timedelta(seconds=301)) == "stale"

    set_last_data(conn, "press-1", T0 + timedelta(seconds=600))
    assert status_of(conn, "press-1", T0 + timedelta(seconds=700)) == "online"
    assert status_of(conn, "press-1", T0 + timedelta(seconds=1000)) == "stale"
    assert status_of(conn, "press-1", T0 + timedelta(seconds=1000), stale_s=600) == "online"

    apply_state(conn, will("press-1"), received_at=T0 + timedelta(seconds=1100))
    assert status_of(conn, "press-1", T0 + timedelta(seconds=1101)) == "offline"
    # The birth's details stay for the fleet view.
    assert conn.execute("SELECT boot_id FROM devices WHERE name = 'press-1'").fetchone() == (
        BOOT_1,
    )


@pytest.mark.integration
def test_out_of_order_and_late_wills_are_ignored(conn: psycopg.Connection) -> None:
    apply_state(conn, birth("press-1", BOOT_1), received_at=T0)
    apply_state(conn, birth("press-1", BOOT_2), received_at=T0 + timedelta(seconds=20))
    # The previous boot's will, delivered late by another worker: not the current session.
    apply_state(conn, will("press-1", BOOT_1), received_at=T0 + timedelta(seconds=30))
    # A message that arrived before the newest one applied: outdated.
    apply_state(conn, will("press-1", BOOT_2), received_at=T0 + timedelta(seconds=10))
    now = T0 + timedelta(seconds=40)
    assert status_of(conn, "press-1", now) == "online"
    assert conn.execute("SELECT boot_id FROM devices WHERE name = 'press-1'").fetchone() == (
        BOOT_2,
    )
    apply_state(conn, will("press-1", BOOT_2), received_at=T0 + timedelta(seconds=50))
    assert status_of(conn, "press-1", now) == "offline"


@pytest.mark.integration
def test_devices_registered_on_first_sight_once(conn: psycopg.Connection) -> None:
    first = ensure_device(conn, "oven-1")
    assert ensure_device(conn, "oven-1") == first
    # A device known only from data (no birth yet) counts as online while data is fresh.
    set_last_data(conn, "oven-1", T0)
    assert status_of(conn, "oven-1", T0 + timedelta(seconds=10)) == "online"
    assert status_of(conn, "oven-1", T0 + timedelta(seconds=400)) == "stale"
    ensure_device(conn, "oven-2")
    assert status_of(conn, "oven-2", T0) == "offline"  # never heard from


@pytest.mark.integration
def test_heartbeat_latest_row_and_history(conn: psycopg.Connection) -> None:
    def hb(batches: int, drops: int) -> Heartbeat:
        return Heartbeat(
            device="press-1",
            boot_id=BOOT_1,
            ts_ms=int(T0.timestamp() * 1000),
            outbox_batches=batches,
            outbox_bytes=batches * 1000,
            outbox_oldest_age_s=12.5,
            dropped_batches=drops,
            rejected_readings=3,
            driver_errors={"modbus": 2},
            cpu_percent=4.5,
            rss_bytes=40_000_000,
            disk_free_bytes=10**9,
            cert_days_left=300.0,
            agent_version="1.2.0",
        )

    apply_heartbeat(conn, hb(10, 0), received_at=T0)
    apply_heartbeat(conn, hb(50, 7), received_at=T0 + timedelta(seconds=30))
    apply_heartbeat(conn, hb(1, 0), received_at=T0 + timedelta(seconds=15))  # late delivery
    apply_heartbeat(conn, hb(50, 7), received_at=T0 + timedelta(seconds=30))  # redelivered
    latest = conn.execute(
        "SELECT outbox_batches, dropped_batches, rejected_readings, driver_errors,"
        " cert_days_left, received_at, reported_at FROM device_health"
    ).fetchall()
    assert latest == [(50, 7, 3, {"modbus": 2}, 300.0, T0 + timedelta(seconds=30), T0)]
    history = conn.execute(
        "SELECT received_at, outbox_batches FROM device_health_history ORDER BY received_at"
    ).fetchall()
    assert [b for _, b in history] == [10, 1, 50]
    seen = conn.execute("SELECT last_seen_at, status FROM devices").fetchall()
    assert seen == [(T0 + timedelta(seconds=30), "unknown")]


@pytest.mark.integration
def test_status_select_runs_through_sqlalchemy(conn: psycopg.Connection, fresh_db: str) -> None:
    from sqlalchemy import create_engine

    apply_state(conn, birth("press-1"), received_at=T0)
    apply_state(conn, birth("press-2"), received_at=T0)
    apply_state(conn, will("press-2"), received_at=T0)
    conn.commit()
    engine = create_engine(fresh_db.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as sa:
            rows = sa.execute(status_select(stale_after_s=60, now=T0)).all()
            live = sa.execute(status_select(stale_after_s=60)).all()  # database now()
    finally:
        engine.dispose()
    assert [(r.name, r.status, r.reported_status) for r in rows] == [
        ("press-1", "online", "online"),
        ("press-2", "offline", "offline"),
    ]
    assert [r.status for r in live] == ["stale", "offline"]  # T0 is long past


@pytest.mark.parametrize(
    ("reported", "data_age_s", "state_age_s", "expected"),
    [
        ("offline", 1, 1, "offline"),
        ("online", None, 10, "online"),
        ("online", None, 100, "stale"),
        ("online", 100, 10, "online"),
        ("online", 10, 100, "online"),
        ("online", None, None, "stale"),
        ("unknown", 10, None, "online"),
        ("unknown", 100, None, "stale"),
        ("unknown", None, None, "offline"),
        ("unknown", None, 1, "offline"),
    ],
)
def test_derive_status_matches_the_sql(
    reported: str, data_age_s: int | None, state_age_s: int | None, expected: str
) -> None:
    now = T0
    last_data = None if data_age_s is None else now - timedelta(seconds=data_age_s)
    last_state = None if state_age_s is None else now - timedelta(seconds=state_age_s)
    got = derive_status(
        reported=reported,
        last_data_at=last_data,
        last_state_at=last_state,
        now=now,
        stale_after_s=60,
    )
    assert got == expected


def units_of(conn: psycopg.Connection, device: str) -> dict[str, str]:
    return dict(
        conn.execute(
            "SELECT metric, unit FROM device_units JOIN devices ON devices.id = device_id"
            " WHERE devices.name = %s",
            (device,),
        ).fetchall()
    )


@pytest.mark.integration
def test_birth_units_label_metrics_and_follow_changes(conn: psycopg.Connection) -> None:
    state = DeviceState(
        "press-1",
        "online",
        int(T0.timestamp() * 1000),
        boot_id=BOOT_1,
        units={"oven.temp": "degC", "line.speed": "m/min"},
    )
    apply_state(conn, state, received_at=T0)
    assert units_of(conn, "press-1") == {"oven.temp": "degC", "line.speed": "m/min"}
    # A birth creates no metric: only data does (the metric cap counts those).
    assert conn.execute("SELECT count(*) FROM metrics").fetchone() == (0,)
    # line.speed has data; a birth that no longer names it keeps its label for that history.
    device_id = ensure_device(conn, "press-1")
    (metric_id,) = conn.execute(
        "INSERT INTO metrics (name) VALUES ('line.speed') RETURNING id"
    ).fetchone()  # type: ignore[misc]
    conn.execute("INSERT INTO device_metrics VALUES (%s, %s)", (device_id, metric_id))
    changed = DeviceState(
        "press-1", "online", int(T0.timestamp() * 1000), boot_id=BOOT_2, units={"oven.temp": "K"}
    )
    apply_state(conn, changed, received_at=T0 + timedelta(seconds=5))
    assert units_of(conn, "press-1") == {"oven.temp": "K", "line.speed": "m/min"}
    # A metric named by no birth any more and without data is forgotten (bounded rows).
    renamed = DeviceState(
        "press-1", "online", int(T0.timestamp() * 1000), boot_id=BOOT_1, units={"oven.t": "K"}
    )
    apply_state(conn, renamed, received_at=T0 + timedelta(seconds=7))
    assert units_of(conn, "press-1") == {"oven.t": "K", "line.speed": "m/min"}


@pytest.mark.integration
def test_units_are_kept_per_device_one_birth_never_relabels_another(
    conn: psycopg.Connection,
) -> None:
    def born(device: str, unit: str, at: datetime) -> DeviceState:
        ms = int(at.timestamp() * 1000)
        return DeviceState(device, "online", ms, boot_id=BOOT_1, units={"oven.temp": unit})

    apply_state(conn, born("oven-1", "degC", T0), received_at=T0)
    apply_state(conn, born("oven-2", "K", T0), received_at=T0 + timedelta(seconds=1))
    assert units_of(conn, "oven-1") == {"oven.temp": "degC"}
    assert units_of(conn, "oven-2") == {"oven.temp": "K"}
    # A birth older than the device's current one (delivered late) relabels nothing.
    apply_state(conn, born("oven-1", "degF", T0), received_at=T0 - timedelta(seconds=30))
    assert units_of(conn, "oven-1") == {"oven.temp": "degC"}
