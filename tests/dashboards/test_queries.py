"""The dashboard's queries against TimescaleDB filled by the real ingest path.

Every query runs as the dashboard's least-privilege role, and its numbers are
checked against the ground truth of the generated batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pandas as pd
import psycopg
import pytest
from sqlalchemy import Connection, create_engine
from sqlalchemy.pool import NullPool

from millrace.cloud.alerts.lifecycle import AlertError
from millrace.dashboards import queries
from millrace.dashboards.resolution import Resolution, pick_resolution
from tests.dashboards.conftest import Plant
from tests.dashboards.plant import (
    DEVICES,
    GAP_DEVICE,
    GAP_SEQS,
    HOT_DEVICE,
    KELVIN_DEVICE,
    LATE_DEVICE,
    OFFLINE_DEVICE,
    UNSYNCED_DEVICE,
    per_minute_windows,
)

pytestmark = pytest.mark.integration


def _connect(dsn: str) -> Connection:
    engine = create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(dsn), poolclass=NullPool
    )
    return engine.connect()


@pytest.fixture
def conn(plant: Plant) -> Iterator[Connection]:
    with _connect(plant.dash_dsn) as connection:
        yield connection


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def test_fleet_reports_derived_status_and_latest_heartbeat(conn: Connection, plant: Plant) -> None:
    fleet = queries.fleet(conn, stale_after_s=3600).set_index("device")
    assert list(fleet.index) == sorted(DEVICES)
    assert fleet.loc[OFFLINE_DEVICE, "status"] == "offline"
    assert set(fleet.drop(index=OFFLINE_DEVICE)["status"]) == {"online"}
    assert set(fleet["agent_version"]) == {"0.1.0"}
    assert fleet.loc[HOT_DEVICE, "cert_days_left"] == 21.0
    assert not fleet.loc[UNSYNCED_DEVICE, "clock_synced"]
    assert fleet.loc[UNSYNCED_DEVICE, "clock_skew_s"] == pytest.approx(4.2, abs=0.01)
    assert fleet.loc[HOT_DEVICE, "clock_skew_s"] == pytest.approx(0.015, abs=0.01)
    assert fleet.loc[OFFLINE_DEVICE, "outbox_batches"] > 0
    assert fleet.loc[OFFLINE_DEVICE, "dropped_batches"] == 2
    assert str(fleet["last_data_at"].dt.tz) == "UTC"


def test_fleet_marks_silent_connected_devices_stale(conn: Connection, plant: Plant) -> None:
    later = plant.truth.end + timedelta(hours=1)
    fleet = queries.fleet(conn, stale_after_s=300, now=later).set_index("device")
    assert fleet.loc[HOT_DEVICE, "status"] == "stale"
    assert fleet.loc[OFFLINE_DEVICE, "status"] == "offline"


def test_active_alert_counts_and_lists(conn: Connection, plant: Plant) -> None:
    counts = queries.active_alert_counts(conn)
    assert counts.to_dict("records") == [{"severity": "critical", "active": 1, "unacknowledged": 1}]
    active = queries.active_alerts(conn)
    assert list(active[["device", "metric", "rule", "state"]].itertuples(index=False)) == [
        (HOT_DEVICE, "temperature", "temperature high", "active")
    ]
    assert active.loc[0, "value"] > 80
    history = queries.alert_history(
        conn, start=plant.truth.start, end=datetime.now(UTC) + timedelta(minutes=1)
    )
    assert sorted(history["state"]) == ["active", "cleared"]
    queue = queries.unacknowledged_alerts(conn)
    assert list(queue["state"]) == ["active", "cleared"]  # what needs attention first
    assert set(queue["id"]) == set(history["id"])


def test_ingest_rate_counts_what_was_received_in_the_window(conn: Connection, plant: Plant) -> None:
    end = plant.truth.end + timedelta(seconds=5)
    start = end - timedelta(minutes=10)
    rate = queries.ingest_rate(conn, start=start, end=end)
    windows = sum(n for at, n in plant.truth.received if start <= at < end)
    batches = sum(1 for at, _ in plant.truth.received if start <= at < end)
    assert _close(rate.windows_per_s, windows / 600)
    assert _close(rate.batches_per_s, batches / 600)
    assert rate.devices == len(DEVICES)
    assert rate.newest_received_at == max(at for at, _ in plant.truth.received)


def test_device_metrics_lists_units_periods_and_spans(conn: Connection, plant: Plant) -> None:
    metrics = queries.device_metrics(conn, device=HOT_DEVICE).set_index("metric")
    assert list(metrics.index) == ["power", "pressure", "temperature"]
    assert metrics.loc["temperature", "unit"] == "°C"
    assert metrics.loc["temperature", "period_s"] == 10
    assert metrics.loc["power", "period_s"] == 60
    assert metrics.loc["temperature", "windows"] == len(
        plant.truth.windows[(HOT_DEVICE, "temperature")]
    )
    assert queries.device_names(conn) == sorted(DEVICES)
    assert queries.device_metrics(conn, device="no-such-device").empty


def test_units_are_kept_per_device(conn: Connection) -> None:
    """Births of two devices name temperature in °C and K: each device keeps its own."""
    hot = queries.device_metrics(conn, device=HOT_DEVICE).set_index("metric")
    kelvin = queries.device_metrics(conn, device=KELVIN_DEVICE).set_index("metric")
    assert (hot.loc["temperature", "unit"], kelvin.loc["temperature", "unit"]) == ("°C", "K")
    assert hot.loc["pressure", "unit"] == kelvin.loc["pressure", "unit"] == "bar"
    assert len(kelvin) == len(set(kelvin.index)), "one row per metric"


@pytest.mark.parametrize(
    ("range_h", "expected_source", "expected_bucket_s"),
    [
        (1, "windows", 10),
        (6, "windows", 30),
        (30 * 24, "hourly", 3600),
        (365 * 24, "hourly", 12 * 3600),
        (3 * 365 * 24, "daily", 86400),
    ],
)
def test_series_matches_truth_at_every_resolution(
    conn: Connection, plant: Plant, range_h: int, expected_source: str, expected_bucket_s: int
) -> None:
    truth = plant.truth
    end = truth.end
    start = end - timedelta(hours=range_h)
    resolution = pick_resolution(range_s=range_h * 3600, period_s=10)
    assert (resolution.source, resolution.bucket_s) == (expected_source, expected_bucket_s)
    frame = queries.series(
        conn, device=HOT_DEVICE, metric="temperature", resolution=resolution, start=start, end=end
    )
    assert len(frame) <= 1200  # about a point per pixel
    # Rollup buckets may start before `start`: compare over the buckets actually returned.
    covered_start = min(start, frame["ts"].min().to_pydatetime())
    whole = truth.aggregate(HOT_DEVICE, "temperature", covered_start, end, 10)
    assert frame["count"].sum() == whole["count"]
    assert frame["min"].min() == whole["min"]
    assert frame["max"].max() == whole["max"]
    assert _close((frame["mean"] * frame["count"]).sum() / frame["count"].sum(), whole["mean"])
    for row in frame.sample(n=min(5, len(frame)), random_state=1).itertuples():
        point_start = row.ts.to_pydatetime()
        bucket_end = point_start + timedelta(seconds=resolution.bucket_s)
        expected = truth.aggregate(
            HOT_DEVICE, "temperature", max(point_start, covered_start), bucket_end, 10
        )
        assert row.count == expected["count"]
        assert _close(row.mean, expected["mean"])
        assert (row.min, row.max) == (expected["min"], expected["max"])
        assert str(frame["ts"].dt.tz) == "UTC"


def test_series_reads_only_the_requested_window_period(conn: Connection, plant: Plant) -> None:
    truth = plant.truth
    frame = queries.series(
        conn,
        device=HOT_DEVICE,
        metric="power",
        resolution=Resolution("windows", 60, 60),
        start=truth.start,
        end=truth.end,
    )
    assert len(frame) == len(truth.windows[(HOT_DEVICE, "power")])
    wrong_period = queries.series(
        conn,
        device=HOT_DEVICE,
        metric="power",
        resolution=Resolution("windows", 60, 10),
        start=truth.start,
        end=truth.end,
    )
    assert wrong_period.empty
    assert list(wrong_period.columns) == list(queries.SERIES_COLUMNS)


def test_device_events_are_listed_newest_first(conn: Connection, plant: Plant) -> None:
    frame = queries.device_events(
        conn, device=HOT_DEVICE, start=plant.truth.start, end=plant.truth.end + timedelta(hours=1)
    )
    assert len(frame) == plant.truth.events[HOT_DEVICE]
    assert frame["ts"].is_monotonic_decreasing
    assert set(frame["metric"]) == {"state", "door_open"}
    assert set(frame.loc[frame["metric"] == "state", "text"]) == {"running", "idle"}
    assert set(frame.loc[frame["metric"] == "door_open", "value"]) == {1.0}


def test_dead_letters_by_reason_with_previews(conn: Connection, plant: Plant) -> None:
    start, end = plant.truth.start, plant.truth.end + timedelta(minutes=1)
    counts = queries.dead_letter_counts(conn, start=start, end=end)
    assert dict(zip(counts["code"], counts["count"], strict=True)) == dict(plant.truth.dead_letters)
    assert counts.set_index("code").loc["invalid", "devices"] == 2
    samples = queries.dead_letter_samples(conn, start=start, end=end, per_code=1)
    assert sorted(samples["code"]) == ["invalid", "undecodable"]
    by_code = samples.set_index("code")
    assert by_code.loc["invalid", "payload_head"].startswith('{"v":1,"d":"oven-02"')
    assert by_code.loc["undecodable", "payload_head"].startswith("00 01 02 03")
    assert by_code.loc["undecodable", "payload_bytes"] == 48
    empty = queries.dead_letter_counts(conn, start=start - timedelta(days=9), end=start)
    assert empty.empty


def test_open_sequence_gaps_name_the_missing_batches(conn: Connection, plant: Plant) -> None:
    gaps = queries.open_sequence_gaps(conn)
    assert gaps[["device", "seq_from", "seq_to", "missing"]].values.tolist() == [
        [GAP_DEVICE, min(GAP_SEQS), max(GAP_SEQS), plant.truth.missing_batches]
    ]
    assert gaps.loc[0, "boot_id"] == plant.truth.boot_ids[GAP_DEVICE]


def test_rejected_readings_per_device_and_metric(conn: Connection, plant: Plant) -> None:
    frame = queries.rejected_readings(conn, start=plant.truth.start, end=plant.truth.end)
    got = {(r.device, r.metric): r.rejected for r in frame.itertuples()}
    assert got == {k: v for k, v in plant.truth.rejected.items() if v}
    assert frame["rejected"].is_monotonic_decreasing


def test_late_batches_and_unsynced_clocks_per_device(conn: Connection, plant: Plant) -> None:
    truth = plant.truth
    frame = queries.delivery_by_device(
        conn, start=truth.start, end=truth.end + timedelta(minutes=5), late_after_s=60
    ).set_index("device")
    assert frame["batches"].to_dict() == dict(truth.batches)
    assert frame.loc[LATE_DEVICE, "late"] == truth.late_batches[LATE_DEVICE] > 0
    assert frame.drop(index=LATE_DEVICE)["late"].sum() == 0
    assert frame.loc[LATE_DEVICE, "max_delay_s"] == pytest.approx(240.0)
    assert frame.loc[UNSYNCED_DEVICE, "unsynced"] == truth.unsynced_batches[UNSYNCED_DEVICE] > 0


def test_backlog_history_per_device(conn: Connection, plant: Plant) -> None:
    frame = queries.backlog_history(
        conn, start=plant.truth.start, end=plant.truth.end + timedelta(minutes=1), bucket_s=600
    )
    peak = frame.groupby("device")["outbox_batches"].max()
    assert peak[OFFLINE_DEVICE] > 0
    assert peak.drop(OFFLINE_DEVICE).sum() == 0
    assert set(frame["device"]) == set(DEVICES)


def test_ingest_timeline_matches_received_windows(conn: Connection, plant: Plant) -> None:
    truth = plant.truth
    frame = queries.ingest_timeline(
        conn, start=truth.start, end=truth.end + timedelta(minutes=5), bucket_s=60
    )
    got = {row.ts.to_pydatetime(): row.windows for row in frame.itertuples()}
    assert got == per_minute_windows(truth)
    assert frame["batches"].sum() == sum(truth.batches.values())
    assert frame["delay_p50_s"].between(0.29, 0.31).all()
    assert frame["delay_max_s"].max() == pytest.approx(240.0)


def test_commit_latency_covers_every_window(conn: Connection, plant: Plant) -> None:
    truth = plant.truth
    frame = queries.commit_latency(conn, start=truth.start, end=truth.end, bucket_s=600)
    assert frame["windows"].sum() == sum(len(v) for v in truth.windows.values())
    # Written as a backfill just now: every window closed before it was stored.
    assert (frame["latency_p50_s"] > 0).all()
    assert (frame["latency_p95_s"] <= frame["latency_max_s"]).all()


def test_dead_letter_timeline_sums_to_the_counts(conn: Connection, plant: Plant) -> None:
    frame = queries.dead_letter_timeline(
        conn, start=plant.truth.start, end=plant.truth.end + timedelta(minutes=1), bucket_s=300
    )
    assert frame.groupby("code")["count"].sum().to_dict() == dict(plant.truth.dead_letters)


def test_preview_payload_is_text_or_hex() -> None:
    assert queries.preview_payload(b'{"a":1}') == '{"a":1}'
    assert queries.preview_payload(b"\x00\xff") == "00 ff"
    assert queries.preview_payload(memoryview(b"\x1b[31m")) == "1b 5b 33 31 6d"
    assert queries.preview_payload(None) == ""


def test_acknowledge_as_dashboard_role_updates_alert_and_audit(plant_factory) -> None:  # type: ignore[no-untyped-def]
    private = plant_factory(hours=1.0)
    with _connect(private.dash_dsn) as conn:
        alert_id = int(queries.active_alerts(conn).loc[0, "id"])
        conn.rollback()  # end the read's implicit transaction
        with conn.begin():
            queries.acknowledge_alert(conn, alert_id, user="otto", comment="valve closed")
        active = queries.active_alerts(conn).set_index("id")
        assert active.loc[alert_id, "acknowledged_by"] == "otto"
        assert active.loc[alert_id, "ack_comment"] == "valve closed"
        assert isinstance(active.loc[alert_id, "acknowledged_at"], pd.Timestamp)
        audit = queries.audit_entries(conn)
        assert audit[["user", "action", "target", "comment"]].values.tolist() == [
            ["otto", "alert.acknowledge", f"alert:{alert_id}", "valve closed"]
        ]
        conn.rollback()
        with pytest.raises(AlertError, match="already acknowledged by otto"), conn.begin():
            queries.acknowledge_alert(conn, alert_id, user="ada", comment="again")
        assert len(queries.audit_entries(conn)) == 1


@pytest.mark.security
@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE alerts SET state = 'cleared'",
        "UPDATE alerts SET severity = 'info'",
        "DELETE FROM audit_log",
        "UPDATE audit_log SET user_name = 'nobody'",
        "INSERT INTO readings (ts, device_id, metric_id, period_s, count, sum, min, max, first,"
        " last, sumsq) VALUES (now(), 1, 1, 10, 1, 1, 1, 1, 1, 1, 1)",
        "DELETE FROM devices",
        "UPDATE devices SET status = 'online'",
        "INSERT INTO alert_rules (name, metric, condition, high) VALUES ('x', 'm', 'above', 1)",
    ],
)
def test_dashboard_role_reads_and_only_acknowledges(plant: Plant, statement: str) -> None:
    with psycopg.connect(plant.dash_dsn) as raw:
        assert raw.execute("SELECT count(*) FROM readings").fetchone() is not None
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            raw.execute(statement)
