"""Every SQL statement the dashboard runs, as SQLAlchemy Core over cloud.schema.

Functions take a SQLAlchemy `Connection` and keyword-only filters, bind every
value as a parameter, and return pandas DataFrames with fixed columns (also
when empty) and UTC timestamps; pages convert to the configured time zone.
Nothing here knows about Streamlit: data.py caches these, tests call them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import pandas as pd
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    DateTime,
    Double,
    Integer,
    Interval,
    Select,
    Subquery,
    Text,
    and_,
    bindparam,
    case,
    cast,
    func,
    literal,
    select,
    true,
)

from millrace.cloud import registry
from millrace.cloud.alerts import lifecycle
from millrace.cloud.schema.core import (
    data_holes,
    dead_letters,
    device_units,
    devices,
    events,
    ingest_ledger,
    metrics,
    readings,
    rollup_daily,
    rollup_hourly,
    sequence_gaps,
)
from millrace.cloud.schema.ops import alerts, audit_log, device_health, device_health_history
from millrace.cloud.schema.packed import readings_packed
from millrace.dashboards.resolution import HOUR_SECONDS, Resolution, Source

# Enough to see what went wrong without shipping a whole payload to every browser.
DEAD_LETTER_PREVIEW_BYTES: Final = 160
MAX_EVENTS: Final = 2000
MAX_ALERT_ROWS: Final = 1000
MAX_GAP_ROWS: Final = 500
MAX_HOLE_ROWS: Final = 500


# --- helpers ------------------------------------------------------------------------------


def _frame(
    conn: Connection,
    stmt: Select[Any],
    *,
    times: tuple[str, ...] = (),
    params: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Run `stmt`; its labels become the columns, `times` become UTC datetimes."""
    result = conn.execute(stmt, params or {})
    frame = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
    for column in times:
        frame[column] = pd.to_datetime(frame[column], utc=True)
    return frame


def _seconds(value: float) -> ColumnElement[Any]:
    return literal(timedelta(seconds=value), type_=Interval())


def _epoch_s(interval: ColumnElement[Any]) -> ColumnElement[float]:
    """An interval in seconds as a float (extract returns numeric)."""
    return cast(func.extract("epoch", interval), Double)


def _bucket(width_s: int, column: ColumnElement[Any]) -> ColumnElement[Any]:
    return func.time_bucket(_seconds(width_s), column)


def _device_id(name: str) -> ColumnElement[Any]:
    return select(devices.c.id).where(devices.c.name == name).scalar_subquery()


def _metric_id(name: str) -> ColumnElement[Any]:
    return select(metrics.c.id).where(metrics.c.name == name).scalar_subquery()


def _big(expr: ColumnElement[Any]) -> ColumnElement[int]:
    """sum() of a bigint is numeric in PostgreSQL: bring it back to an integer."""
    return cast(func.coalesce(expr, 0), BigInteger)


# --- fleet and overview ---------------------------------------------------------------------

FLEET_COLUMNS: Final = (
    "device",
    "status",
    "reported_status",
    "last_seen_at",
    "last_data_at",
    "agent_version",
    "outbox_batches",
    "outbox_bytes",
    "outbox_oldest_age_s",
    "dropped_batches",
    "rejected_readings",
    "cert_days_left",
    "clock_synced",
    "clock_skew_s",
    "health_at",
)


def fleet(conn: Connection, *, stale_after_s: float, now: datetime | None = None) -> pd.DataFrame:
    """Every device with its derived status (cloud.registry's rule) and latest heartbeat."""
    status = registry.status_select(stale_after_s=stale_after_s, now=now).subquery()
    health = device_health
    stmt = (
        select(
            status.c.name.label("device"),
            status.c.status,
            status.c.reported_status,
            status.c.last_seen_at,
            status.c.last_data_at,
            func.coalesce(status.c.agent_version, func.nullif(health.c.agent_version, "")).label(
                "agent_version"
            ),
            health.c.outbox_batches,
            health.c.outbox_bytes,
            health.c.outbox_oldest_age_s,
            health.c.dropped_batches,
            health.c.rejected_readings,
            health.c.cert_days_left,
            health.c.clock_synced,
            # The agent's clock minus ours at the heartbeat (transit is milliseconds).
            _epoch_s(health.c.reported_at - health.c.received_at).label("clock_skew_s"),
            health.c.received_at.label("health_at"),
        )
        .select_from(status.outerjoin(health, health.c.device_id == status.c.id))
        .order_by(status.c.name)
    )
    return _frame(conn, stmt, times=("last_seen_at", "last_data_at", "health_at"))


def active_alert_counts(conn: Connection) -> pd.DataFrame:
    """Active alerts per severity: columns severity, active, unacknowledged."""
    stmt = (
        select(
            alerts.c.severity,
            func.count().label("active"),
            func.count().filter(alerts.c.acknowledged_at.is_(None)).label("unacknowledged"),
        )
        .where(alerts.c.state == "active")
        .group_by(alerts.c.severity)
    )
    return _frame(conn, stmt)


@dataclass(frozen=True, slots=True)
class IngestRate:
    """What reached the database per second over [start, end)."""

    batches_per_s: float
    windows_per_s: float
    events_per_s: float
    devices: int
    newest_received_at: datetime | None


def ingest_rate(conn: Connection, *, start: datetime, end: datetime) -> IngestRate:
    """Committed batches, windows and events per second, by the time workers received them."""
    ledger = ingest_ledger
    stmt = select(
        func.count(),
        _big(func.sum(ledger.c.windows)),
        _big(func.sum(ledger.c.events)),
        func.count(ledger.c.device_id.distinct()),
        func.max(ledger.c.received_at),
    ).where(ledger.c.received_at >= start, ledger.c.received_at < end)
    batches, windows, n_events, n_devices, newest = conn.execute(stmt).one()
    span_s = max((end - start).total_seconds(), 1e-9)
    return IngestRate(
        batches_per_s=batches / span_s,
        windows_per_s=windows / span_s,
        events_per_s=n_events / span_s,
        devices=n_devices,
        newest_received_at=newest,
    )


# --- device --------------------------------------------------------------------------------


def device_names(conn: Connection) -> list[str]:
    """Every registered device id, sorted."""
    return list(conn.execute(select(devices.c.name).order_by(devices.c.name)).scalars())


METRIC_COLUMNS: Final = ("metric", "unit", "period_s", "first_ts", "last_ts", "windows")


def device_metrics(conn: Connection, *, device: str) -> pd.DataFrame:
    """The numeric metrics a device has delivered: finest window period and time span.

    Read from the hourly rollups (written with every window), so it is cheap
    however long the history.
    """
    h = rollup_hourly
    u = device_units
    device_id = _device_id(device)
    stmt = (
        select(
            metrics.c.name.label("metric"),
            u.c.unit,  # this device's own birth's unit, never another device's
            func.min(h.c.period_s).label("period_s"),
            func.min(h.c.first_ts).label("first_ts"),
            func.max(h.c.last_ts).label("last_ts"),
            _big(func.sum(h.c.windows)).label("windows"),
        )
        .select_from(
            h.join(metrics, metrics.c.id == h.c.metric_id).outerjoin(
                u, and_(u.c.device_id == h.c.device_id, u.c.metric == metrics.c.name)
            )
        )
        .where(h.c.device_id == device_id)
        .group_by(metrics.c.name, u.c.unit)
        .order_by(metrics.c.name)
    )
    return _frame(conn, stmt, times=("first_ts", "last_ts"))


SERIES_COLUMNS: Final = ("ts", "mean", "min", "max", "count", "rejected", "windows")
_WINDOW_FIELDS: Final = ("count", "sum", "min", "max", "rejected")
# The series statement's parameters: built once per source, bound per call.
_DEVICE: Final = bindparam("device", type_=Text())
_METRIC: Final = bindparam("metric", type_=Text())
_PERIOD: Final = bindparam("period_s", type_=Integer())
_START: Final = bindparam("start", type_=DateTime(timezone=True))
_END: Final = bindparam("end", type_=DateTime(timezone=True))
_PACKED_FROM: Final = bindparam("packed_from", type_=DateTime(timezone=True))
_BUCKET: Final = bindparam("bucket", type_=Interval())


def _ids_match(table: Any) -> tuple[ColumnElement[bool], ...]:
    return (
        table.c.device_id
        == select(devices.c.id).where(devices.c.name == _DEVICE).scalar_subquery(),
        table.c.metric_id
        == select(metrics.c.id).where(metrics.c.name == _METRIC).scalar_subquery(),
        table.c.period_s == _PERIOD,
    )


def _windows() -> Subquery:
    """Windows of [start, end) from both stored forms: `readings` and `readings_packed`.

    Old hours are packed (cloud/packing.py); a window that came late for a packed hour
    sits in `readings` until the next packing run, possibly as a second part of a
    window also packed: callers count windows by distinct `ts` and merge the rest.
    """
    hot = select(readings.c.ts, *(readings.c[f] for f in _WINDOW_FIELDS)).where(
        *_ids_match(readings), readings.c.ts >= _START, readings.c.ts < _END
    )
    p = readings_packed
    arrays = func.unnest(p.c.slots, *(p.c[f] for f in _WINDOW_FIELDS))
    w = arrays.table_valued("slot", *_WINDOW_FIELDS, with_ordinality="i").render_derived()
    ts = p.c.hour + func.coalesce(w.c.slot, w.c.i - 1) * p.c.period_s * _seconds(1)
    packed = (
        select(ts.label("ts"), *(w.c[f] for f in _WINDOW_FIELDS))
        .select_from(p.join(w, true()))
        .where(
            *_ids_match(p),
            # An hour row holds windows starting up to an hour after `hour`.
            p.c.hour > _PACKED_FROM,
            p.c.hour < _END,
            ts >= _START,
            ts < _END,
        )
    )
    return hot.union_all(packed).subquery("windows")


@functools.cache
def _series_statement(source: Source) -> Select[Any]:
    """The series query of one source, with bind parameters (built and keyed once)."""
    table: Any
    if source == "windows":
        table = _windows()
        time_col = table.c.ts
        n_windows: ColumnElement[Any] = func.count(table.c.ts.distinct())
        where: tuple[ColumnElement[bool], ...] = ()
    else:
        table = rollup_hourly if source == "hourly" else rollup_daily
        time_col = table.c.bucket
        n_windows = _big(func.sum(table.c.windows))
        where = (*_ids_match(table), time_col >= _START, time_col < _END)
    bucket = func.time_bucket(_BUCKET, time_col).label("ts")
    total = func.sum(table.c["count"])
    return (
        select(
            bucket,
            (func.sum(table.c["sum"]) / cast(total, Double)).label("mean"),
            func.min(table.c["min"]).label("min"),
            func.max(table.c["max"]).label("max"),
            _big(total).label("count"),
            _big(func.sum(table.c.rejected)).label("rejected"),
            n_windows.label("windows"),
        )
        .where(*where)
        .group_by(bucket)
        .order_by(bucket)
    )


def series(
    conn: Connection,
    *,
    device: str,
    metric: str,
    resolution: Resolution,
    start: datetime,
    end: datetime,
) -> pd.DataFrame:
    """One metric of one device over [start, end) at `resolution`: mean with a min-max band.

    Only windows of `resolution.period_s` are read: an agent may window a signal at
    several periods, and mixing them would count readings twice.
    """
    params = {
        "device": device,
        "metric": metric,
        "period_s": resolution.period_s,
        "start": start,
        "end": end,
        "packed_from": start - timedelta(seconds=HOUR_SECONDS),
        "bucket": timedelta(seconds=resolution.bucket_s),
    }
    return _frame(conn, _series_statement(resolution.source), times=("ts",), params=params)


EVENT_COLUMNS: Final = ("ts", "metric", "kind", "value", "text")


def device_events(
    conn: Connection, *, device: str, start: datetime, end: datetime, limit: int = MAX_EVENTS
) -> pd.DataFrame:
    """State and enum changes of a device in [start, end), newest first."""
    stmt = (
        select(
            events.c.ts,
            metrics.c.name.label("metric"),
            events.c.kind,
            events.c.value,
            events.c.text,
        )
        .select_from(events.join(metrics, metrics.c.id == events.c.metric_id))
        .where(events.c.device_id == _device_id(device), events.c.ts >= start, events.c.ts < end)
        .order_by(events.c.ts.desc())
        .limit(limit)
    )
    return _frame(conn, stmt, times=("ts",))


# --- alerts --------------------------------------------------------------------------------

ALERT_COLUMNS: Final = (
    "id",
    "severity",
    "state",
    "device",
    "metric",
    "rule",
    "message",
    "value",
    "data_ts",
    "raised_at",
    "cleared_at",
    "acknowledged_at",
    "acknowledged_by",
    "ack_comment",
)
_ALERT_TIMES: Final = ("data_ts", "raised_at", "cleared_at", "acknowledged_at")
_SEVERITY_RANK: Final = case(
    (alerts.c.severity == "critical", 0), (alerts.c.severity == "warning", 1), else_=2
)


def _alerts_select() -> Select[Any]:
    return select(
        alerts.c.id,
        alerts.c.severity,
        alerts.c.state,
        devices.c.name.label("device"),
        alerts.c.metric,
        alerts.c.rule_name.label("rule"),
        alerts.c.message,
        alerts.c.value,
        alerts.c.data_ts,
        alerts.c.raised_at,
        alerts.c.cleared_at,
        alerts.c.acknowledged_at,
        alerts.c.acknowledged_by,
        alerts.c.ack_comment,
    ).select_from(alerts.join(devices, devices.c.id == alerts.c.device_id))


def active_alerts(conn: Connection, *, limit: int = MAX_ALERT_ROWS) -> pd.DataFrame:
    """Alerts still active, most severe and newest first."""
    stmt = (
        _alerts_select()
        .where(alerts.c.state == "active")
        .order_by(_SEVERITY_RANK, alerts.c.raised_at.desc())
        .limit(limit)
    )
    return _frame(conn, stmt, times=_ALERT_TIMES)


def alert_history(
    conn: Connection, *, start: datetime, end: datetime, limit: int = MAX_ALERT_ROWS
) -> pd.DataFrame:
    """Every alert raised in [start, end), active or cleared, newest first."""
    stmt = (
        _alerts_select()
        .where(alerts.c.raised_at >= start, alerts.c.raised_at < end)
        .order_by(alerts.c.raised_at.desc())
        .limit(limit)
    )
    return _frame(conn, stmt, times=_ALERT_TIMES)


def unacknowledged_alerts(conn: Connection, *, limit: int = MAX_ALERT_ROWS) -> pd.DataFrame:
    """Alerts nobody has acknowledged yet (active or already cleared): the ack queue."""
    stmt = (
        _alerts_select()
        .where(alerts.c.acknowledged_at.is_(None))
        .order_by(alerts.c.state, _SEVERITY_RANK, alerts.c.raised_at.desc())
        .limit(limit)
    )
    return _frame(conn, stmt, times=_ALERT_TIMES)


def acknowledge_alert(conn: Connection, alert_id: int, *, user: str, comment: str) -> None:
    """Acknowledge through cloud.alerts.lifecycle (one definition of the update and its audit row).

    Runs in the caller's transaction; raises AlertError when the alert is
    unknown or already acknowledged.
    """
    lifecycle.acknowledge(conn, alert_id, user=user, comment=comment)


AUDIT_COLUMNS: Final = ("at", "user", "action", "target", "comment")


def audit_entries(conn: Connection, *, limit: int = 50) -> pd.DataFrame:
    """The newest audit-log entries."""
    stmt = (
        select(
            audit_log.c.at,
            audit_log.c.user_name.label("user"),
            audit_log.c.action,
            audit_log.c.target,
            audit_log.c.comment,
        )
        .order_by(audit_log.c.at.desc(), audit_log.c.id.desc())
        .limit(limit)
    )
    return _frame(conn, stmt, times=("at",))


# --- data quality --------------------------------------------------------------------------


def dead_letter_counts(conn: Connection, *, start: datetime, end: datetime) -> pd.DataFrame:
    """Refused messages in [start, end) per reason code: count, devices, newest."""
    dl = dead_letters
    stmt = (
        select(
            dl.c.code,
            func.count().label("count"),
            func.count(dl.c.device.distinct()).label("devices"),
            func.max(dl.c.received_at).label("last_at"),
        )
        .where(dl.c.received_at >= start, dl.c.received_at < end)
        .group_by(dl.c.code)
        .order_by(func.count().desc(), dl.c.code)
    )
    return _frame(conn, stmt, times=("last_at",))


def dead_letter_samples(
    conn: Connection, *, start: datetime, end: datetime, per_code: int = 3
) -> pd.DataFrame:
    """The newest few refused messages of each reason code, with a payload preview."""
    dl = dead_letters
    rank = (
        func.row_number()
        .over(partition_by=dl.c.code, order_by=(dl.c.received_at.desc(), dl.c.id.desc()))
        .label("rank")
    )
    inner = (
        select(
            dl.c.code,
            dl.c.received_at,
            dl.c.device,
            dl.c.topic,
            dl.c.reason,
            dl.c.content_type,
            dl.c.payload_bytes,
            func.substring(dl.c.payload, 1, DEAD_LETTER_PREVIEW_BYTES).label("payload_head"),
            rank,
        )
        .where(dl.c.received_at >= start, dl.c.received_at < end)
        .subquery()
    )
    stmt = (
        select(*(c for c in inner.c if c.name != "rank"))
        .where(inner.c.rank <= per_code)
        .order_by(inner.c.code, inner.c.received_at.desc())
    )
    frame = _frame(conn, stmt, times=("received_at",))
    frame["payload_head"] = frame["payload_head"].map(preview_payload)
    return frame


def preview_payload(raw: bytes | memoryview | None) -> str:
    """Printable text as text, anything else as hex: safe to show in a table."""
    if raw is None:
        return ""
    data = bytes(raw)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return data.hex(" ")
    if all(c.isprintable() or c in "\n\t" for c in text):
        return text
    return data.hex(" ")


GAP_COLUMNS: Final = ("device", "boot_id", "seq_from", "seq_to", "missing", "detected_at")


def open_sequence_gaps(conn: Connection, *, limit: int = MAX_GAP_ROWS) -> pd.DataFrame:
    """Batches a device sent (by sequence number) that never arrived, newest first."""
    g = sequence_gaps
    stmt = (
        select(
            devices.c.name.label("device"),
            func.replace(cast(g.c.boot_id, Text), "-", "").label("boot_id"),
            g.c.seq_from,
            g.c.seq_to,
            (g.c.seq_to - g.c.seq_from + 1).label("missing"),
            g.c.detected_at,
        )
        .select_from(g.join(devices, devices.c.id == g.c.device_id))
        .order_by(g.c.detected_at.desc(), devices.c.name, g.c.seq_from)
        .limit(limit)
    )
    return _frame(conn, stmt, times=("detected_at",))


HOLE_COLUMNS: Final = (
    "device",
    "metric",
    "from_ts",
    "to_ts",
    "duration_s",
    "cause",
    "boot_id",
    "metrics_omitted",
)


def data_holes_in(
    conn: Connection, *, start: datetime, end: datetime, limit: int = MAX_HOLE_ROWS
) -> pd.DataFrame:
    """Holes agents reported after an unclean end that overlap [start, end), newest first.

    One row per metric: the windows of `metric` from `from_ts` to `to_ts` were lost when
    the run `boot_id` ended without its orderly stop (power cut, watchdog kill, SIGKILL).
    """
    h = data_holes
    stmt = (
        select(
            devices.c.name.label("device"),
            h.c.metric,
            h.c.from_ts,
            h.c.to_ts,
            _epoch_s(h.c.to_ts - h.c.from_ts).label("duration_s"),
            h.c.cause,
            func.replace(cast(h.c.prev_boot_id, Text), "-", "").label("boot_id"),
            h.c.metrics_omitted,
        )
        .select_from(h.join(devices, devices.c.id == h.c.device_id))
        .where(h.c.to_ts >= start, h.c.from_ts < end)
        .order_by(h.c.to_ts.desc(), devices.c.name, h.c.metric)
        .limit(limit)
    )
    return _frame(conn, stmt, times=("from_ts", "to_ts"))


def rejected_readings(conn: Connection, *, start: datetime, end: datetime) -> pd.DataFrame:
    """Readings an agent refused as invalid, per device and metric, over whole hours in range."""
    h = rollup_hourly
    first_hour = func.date_trunc("hour", literal(start, type_=h.c.bucket.type))
    rejected = _big(func.sum(h.c.rejected))
    stmt = (
        select(
            devices.c.name.label("device"),
            metrics.c.name.label("metric"),
            rejected.label("rejected"),
            _big(func.sum(h.c["count"])).label("accepted"),
        )
        .select_from(
            h.join(devices, devices.c.id == h.c.device_id).join(
                metrics, metrics.c.id == h.c.metric_id
            )
        )
        .where(h.c.bucket >= first_hour, h.c.bucket < end)
        .group_by(devices.c.name, metrics.c.name)
        .having(func.sum(h.c.rejected) > 0)
        .order_by(rejected.desc(), devices.c.name, metrics.c.name)
    )
    return _frame(conn, stmt)


def delivery_by_device(
    conn: Connection, *, start: datetime, end: datetime, late_after_s: float
) -> pd.DataFrame:
    """Per device over [start, end): batches, late ones, worst delay, unsynced clocks.

    The delay is received_at - sent_at: outbox backlog after an outage plus any
    clock skew, which is why batches from unsynced clocks are counted too.
    """
    ledger = ingest_ledger
    delay = ledger.c.received_at - ledger.c.sent_at
    stmt = (
        select(
            devices.c.name.label("device"),
            func.count().label("batches"),
            func.count().filter(delay > _seconds(late_after_s)).label("late"),
            func.max(_epoch_s(delay)).label("max_delay_s"),
            func.count().filter(ledger.c.clock_synced.is_(False)).label("unsynced"),
            func.max(ledger.c.received_at).label("last_received_at"),
        )
        .select_from(ledger.join(devices, devices.c.id == ledger.c.device_id))
        .where(ledger.c.received_at >= start, ledger.c.received_at < end)
        .group_by(devices.c.name)
        .order_by(devices.c.name)
    )
    return _frame(conn, stmt, times=("last_received_at",))


def backlog_history(
    conn: Connection, *, start: datetime, end: datetime, bucket_s: int
) -> pd.DataFrame:
    """Outbox backlog and drops per device over time, from every heartbeat."""
    hh = device_health_history
    bucket = _bucket(bucket_s, hh.c.received_at).label("ts")
    stmt = (
        select(
            bucket,
            devices.c.name.label("device"),
            func.max(hh.c.outbox_batches).label("outbox_batches"),
            func.max(hh.c.outbox_oldest_age_s).label("outbox_oldest_age_s"),
            func.max(hh.c.dropped_batches).label("dropped_batches"),
        )
        .select_from(hh.join(devices, devices.c.id == hh.c.device_id))
        .where(hh.c.received_at >= start, hh.c.received_at < end)
        .group_by(bucket, devices.c.name)
        .order_by(bucket, devices.c.name)
    )
    return _frame(conn, stmt, times=("ts",))


# --- pipeline ------------------------------------------------------------------------------


def ingest_timeline(
    conn: Connection, *, start: datetime, end: datetime, bucket_s: int
) -> pd.DataFrame:
    """Per bucket of receive time: batches, windows, events and delivery delay percentiles."""
    ledger = ingest_ledger
    bucket = _bucket(bucket_s, ledger.c.received_at).label("ts")
    delay = _epoch_s(ledger.c.received_at - ledger.c.sent_at)
    stmt = (
        select(
            bucket,
            func.count().label("batches"),
            _big(func.sum(ledger.c.windows)).label("windows"),
            _big(func.sum(ledger.c.events)).label("events"),
            func.percentile_cont(0.5).within_group(delay).label("delay_p50_s"),
            func.percentile_cont(0.95).within_group(delay).label("delay_p95_s"),
            func.max(delay).label("delay_max_s"),
        )
        .where(ledger.c.received_at >= start, ledger.c.received_at < end)
        .group_by(bucket)
        .order_by(bucket)
    )
    return _frame(conn, stmt, times=("ts",))


def commit_latency(
    conn: Connection, *, start: datetime, end: datetime, bucket_s: int
) -> pd.DataFrame:
    """Window close to stored, per bucket of window start: p50, p95 and max seconds.

    A reading row's ingested_at is its transaction's time, so this is the whole
    path from the window's end on the device to the database (edge flush,
    outbox, broker, worker batching); a backfill after an outage shows as a spike.
    Packed windows (past the packing age, cloud/packing.py) keep no ingested_at, so
    only windows still in `readings` count here.
    """
    r = readings
    latency = _epoch_s(r.c.ingested_at - r.c.ts) - r.c.period_s
    bucket = _bucket(bucket_s, r.c.ts).label("ts")
    stmt = (
        select(
            bucket,
            func.count().label("windows"),
            func.percentile_cont(0.5).within_group(latency).label("latency_p50_s"),
            func.percentile_cont(0.95).within_group(latency).label("latency_p95_s"),
            func.max(latency).label("latency_max_s"),
        )
        .where(r.c.ts >= start, r.c.ts < end)
        .group_by(bucket)
        .order_by(bucket)
    )
    return _frame(conn, stmt, times=("ts",))


def dead_letter_timeline(
    conn: Connection, *, start: datetime, end: datetime, bucket_s: int
) -> pd.DataFrame:
    """Refused messages per bucket and reason code."""
    dl = dead_letters
    bucket = _bucket(bucket_s, dl.c.received_at).label("ts")
    stmt = (
        select(bucket, dl.c.code, func.count().label("count"))
        .where(and_(dl.c.received_at >= start, dl.c.received_at < end))
        .group_by(bucket, dl.c.code)
        .order_by(bucket, dl.c.code)
    )
    return _frame(conn, stmt, times=("ts",))
