"""Device registry: who exists, who is online, and each device's last heartbeat.

Status comes from the retained state topic (birth = online, last will =
offline) and is refined by the data itself: an online device that has sent no
data for `stale_after_s` seconds is *stale* (connected but not delivering, e.g.
a hung driver). The worker calls `apply_state` / `apply_heartbeat` inside its
transaction; the dashboard reads `status_select()` (SQLAlchemy) or calls
`device_statuses()` (psycopg).

Ordering: messages are applied in arrival order (`received_at`), and a last
will that names an older boot than the device's current online boot is ignored
(it is the previous session's will, delivered late by another worker).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from sqlalchemy import ARRAY, Interval, Select, Text, any_, case, func, literal, select
from sqlalchemy.dialects import postgresql

from millrace.cloud.opsevents import note_broker
from millrace.cloud.schema.core import devices
from millrace.wire import DeviceState, Heartbeat

logger = logging.getLogger(__name__)

DerivedStatus = Literal["online", "offline", "stale"]
# A window is typically 1-60 s and the agent flushes every few seconds: five minutes
# without data from a connected device means something is wrong, not merely slow.
DEFAULT_STALE_AFTER_SECONDS: Final = 300.0


def ensure_device(conn: psycopg.Connection[Any], name: str) -> int:
    """The id of device `name`, registering it on first sight (safe under concurrency)."""
    row = conn.execute("SELECT id FROM devices WHERE name = %s", (name,)).fetchone()
    if row is None:
        row = conn.execute(
            "INSERT INTO devices (name) VALUES (%s) ON CONFLICT (name) DO NOTHING RETURNING id",
            (name,),
        ).fetchone()
    if row is None:  # another worker inserted it between our SELECT and INSERT
        row = conn.execute("SELECT id FROM devices WHERE name = %s", (name,)).fetchone()
    assert row is not None
    return int(row[0])


def _ms_to_datetime(ts_ms: int) -> datetime | None:
    try:
        return datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _record_units(conn: psycopg.Connection[Any], device_id: int, units: Mapping[str, str]) -> None:
    """Keep the units of this device's birth (the dashboard labels its charts with them).

    Per device: another device's birth never relabels this one's data. A metric the
    birth no longer names keeps its unit while the device has data of it (history
    stays labelled) and is forgotten otherwise, so a device's rows stay bounded.
    """
    known = dict(
        conn.execute(
            "SELECT metric, unit FROM device_units WHERE device_id = %s", (device_id,)
        ).fetchall()
    )
    changed = dict(sorted((m, u) for m, u in units.items() if known.get(m) != u))
    gone = sorted(set(known) - set(units))
    if changed:  # the usual rebirth changes nothing: touch (and lock) nothing
        conn.execute(
            """
            INSERT INTO device_units (device_id, metric, unit)
            SELECT %(device)s, * FROM unnest(%(metrics)s::text[], %(units)s::text[])
            ON CONFLICT (device_id, metric) DO UPDATE SET unit = excluded.unit, updated_at = now()
            """,
            {"device": device_id, "metrics": list(changed), "units": list(changed.values())},
        )
    if gone:
        conn.execute(
            """
            DELETE FROM device_units u
             WHERE u.device_id = %(device)s AND u.metric = ANY(%(gone)s)
               AND NOT EXISTS (SELECT 1 FROM device_metrics dm JOIN metrics m ON m.id = dm.metric_id
                                WHERE dm.device_id = u.device_id AND m.name = u.metric)
            """,
            {"device": device_id, "gone": gone},
        )


# A device restarting uncleanly over and over (or a hostile one inventing runs) records
# at most this many hole rows a day: ten births naming 256 metrics each.
MAX_HOLE_ROWS_PER_DEVICE_DAY: Final = 2560


def _record_holes(conn: psycopg.Connection[Any], device_id: int, state: DeviceState) -> None:
    """Record the hole the device's previous run left by ending uncleanly, one row a metric.

    Keyed by (device, ended run, metric): the birth is repeated at every reconnect and
    redelivered after a worker restart, and each records nothing new.
    """
    metrics = sorted(state.prev_closed_ms)
    if not metrics:
        return
    recent = conn.execute(
        "SELECT count(*) FROM data_holes WHERE device_id = %s"
        " AND recorded_at > now() - interval '1 day'",
        (device_id,),
    ).fetchone()
    if recent is not None and recent[0] >= MAX_HOLE_ROWS_PER_DEVICE_DAY:
        logger.warning(
            "device %s reports an unclean end of boot %s but has %d hole rows in the last"
            " day (cap %d); not recorded",
            state.device,
            state.prev_boot_id,
            recent[0],
            MAX_HOLE_ROWS_PER_DEVICE_DAY,
        )
        return
    cur = conn.execute(
        """
        INSERT INTO data_holes
            (device_id, prev_boot_id, metric, from_ts, to_ts, boot_id, metrics_omitted)
        SELECT %(device)s, %(prev)s::uuid, m.metric,
               to_timestamp(m.from_ms / 1000.0), to_timestamp(%(to_ms)s / 1000.0),
               %(boot)s::uuid, %(omitted)s
          FROM unnest(%(metrics)s::text[], %(from_ms)s::bigint[]) AS m(metric, from_ms)
        ON CONFLICT (device_id, prev_boot_id, metric) DO NOTHING
        """,
        {
            "device": device_id,
            "prev": state.prev_boot_id,
            "boot": state.boot_id,
            "to_ms": state.started_ms,
            "omitted": state.prev_metrics_omitted,
            "metrics": metrics,
            "from_ms": [state.prev_closed_ms[m] for m in metrics],
        },
    )
    if cur.rowcount == 0:  # a repeated birth
        return
    logger.warning(
        "device %s reports an unclean end of boot %s: %d metric(s) lost data until %s",
        state.device,
        state.prev_boot_id,
        len(metrics) + state.prev_metrics_omitted,
        _ms_to_datetime(state.started_ms),
    )


def apply_state(
    conn: psycopg.Connection[Any],
    state: DeviceState,
    *,
    received_at: datetime,
    broker: str | None = None,
) -> None:
    """Apply a birth (online) or last will (offline) from the device's state topic.

    `broker` (host:port) carried a birth: the device is on it. A will is the broker's own
    message about the device, so it says nothing about where the device is.
    """
    device_id = ensure_device(conn, state.device)
    if broker and state.status == "online":
        note_broker(conn, device_id, broker, received_at=received_at)
    if state.status == "online":
        cur = conn.execute(
            """
            UPDATE devices
               SET status = 'online',
                   last_state_at = %(at)s,
                   last_seen_at = GREATEST(last_seen_at, %(at)s),
                   boot_id = NULLIF(%(boot)s, ''),
                   agent_version = NULLIF(%(version)s, ''),
                   config_hash = NULLIF(%(hash)s, '')
             WHERE id = %(id)s AND (last_state_at IS NULL OR last_state_at <= %(at)s)
            """,
            {
                "id": device_id,
                "at": received_at,
                "boot": state.boot_id,
                "version": state.agent_version,
                "hash": state.config_hash,
            },
        )
        if cur.rowcount and state.units:  # an outdated birth does not relabel either
            _record_units(conn, device_id, state.units)
        if state.prev_boot_id:  # a fact about the past: recorded even from an outdated birth
            _record_holes(conn, device_id, state)
    else:
        cur = conn.execute(
            """
            UPDATE devices
               SET status = 'offline',
                   last_state_at = %(at)s,
                   last_seen_at = GREATEST(last_seen_at, %(at)s)
             WHERE id = %(id)s AND (last_state_at IS NULL OR last_state_at <= %(at)s)
               AND NOT (status = 'online' AND %(boot)s <> ''
                        AND boot_id IS NOT NULL AND boot_id <> %(boot)s)
            """,
            {"id": device_id, "at": received_at, "boot": state.boot_id},
        )
    if cur.rowcount == 0:
        logger.info(
            "state ignored as outdated: device=%s status=%s boot_id=%s",
            state.device,
            state.status,
            state.boot_id,
        )


_HEALTH_COLUMNS: Final = (
    "device_id",
    "received_at",
    "reported_at",
    "boot_id",
    "outbox_batches",
    "outbox_bytes",
    "outbox_oldest_age_s",
    "dropped_batches",
    "rejected_readings",
    "driver_errors",
    "cpu_percent",
    "rss_bytes",
    "disk_free_bytes",
    "cert_days_left",
    "clock_synced",
    "agent_version",
)
_COLS: Final = sql.SQL(", ").join(map(sql.Identifier, _HEALTH_COLUMNS))
_VALUES: Final = sql.SQL(", ").join(map(sql.Placeholder, _HEALTH_COLUMNS))
_INSERT_HISTORY: Final = sql.SQL(
    "INSERT INTO device_health_history ({}) VALUES ({}) ON CONFLICT DO NOTHING"
).format(_COLS, _VALUES)
_UPSERT_LATEST: Final = sql.SQL(
    "INSERT INTO device_health ({}) VALUES ({}) ON CONFLICT (device_id) DO UPDATE SET {}"
    " WHERE device_health.received_at <= EXCLUDED.received_at"
).format(
    _COLS,
    _VALUES,
    sql.SQL(", ").join(
        sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c))
        for c in _HEALTH_COLUMNS
        if c != "device_id"
    ),
)


def apply_heartbeat(
    conn: psycopg.Connection[Any],
    hb: Heartbeat,
    *,
    received_at: datetime,
    broker: str | None = None,
) -> None:
    """Store a heartbeat: the latest row per device, one row of history, its broker."""
    device_id = ensure_device(conn, hb.device)
    params = {
        "device_id": device_id,
        "received_at": received_at,
        "reported_at": _ms_to_datetime(hb.ts_ms),
        "boot_id": hb.boot_id,
        "outbox_batches": hb.outbox_batches,
        "outbox_bytes": hb.outbox_bytes,
        "outbox_oldest_age_s": float(hb.outbox_oldest_age_s),
        "dropped_batches": hb.dropped_batches,
        "rejected_readings": hb.rejected_readings,
        "driver_errors": Jsonb(hb.driver_errors),
        "cpu_percent": float(hb.cpu_percent),
        "rss_bytes": hb.rss_bytes,
        "disk_free_bytes": hb.disk_free_bytes,
        "cert_days_left": float(hb.cert_days_left),
        "clock_synced": hb.clock_synced,
        "agent_version": hb.agent_version,
    }
    conn.execute(_INSERT_HISTORY, params)
    conn.execute(_UPSERT_LATEST, params)
    # Only when it advances: an UPDATE that matches no row takes no row lock.
    conn.execute(
        "UPDATE devices SET last_seen_at = %s"
        " WHERE id = %s AND (last_seen_at IS NULL OR last_seen_at < %s)",
        (received_at, params["device_id"], received_at),
    )
    if broker:
        note_broker(conn, device_id, broker, received_at=received_at)


# --- status -----------------------------------------------------------------------------


def derive_status(
    *,
    reported: str,
    last_data_at: datetime | None,
    last_state_at: datetime | None,
    now: datetime,
    stale_after_s: float = DEFAULT_STALE_AFTER_SECONDS,
) -> DerivedStatus:
    """online/offline/stale from the state topic's status and when data last came.

    A device that never sent a birth ("unknown") counts as connected when data
    arrives. Freshness is measured from the later of the last data and the
    last birth, so a device that has just come online gets a full grace period.
    """
    if reported == "offline":
        return "offline"
    marks = [t for t in (last_data_at, last_state_at if reported == "online" else None) if t]
    if not marks:
        return "stale" if reported == "online" else "offline"
    fresh = max(marks) >= now - timedelta(seconds=stale_after_s)
    return "online" if fresh else "stale"


def status_select(
    *, stale_after_s: float = DEFAULT_STALE_AFTER_SECONDS, now: datetime | None = None
) -> Select[Any]:
    """SQLAlchemy query of every device with its derived `status` (see `derive_status`).

    Columns: id, name, status (online|offline|stale), reported_status, last_seen_at,
    last_data_at, last_state_at, boot_id, agent_version, config_hash.
    `now` defaults to the database's now().
    """
    ref = func.now() if now is None else literal(now, type_=devices.c.last_seen_at.type)
    cutoff = ref - literal(timedelta(seconds=stale_after_s), type_=Interval())
    online_mark = case((devices.c.status == "online", devices.c.last_state_at), else_=None)
    freshest = func.greatest(devices.c.last_data_at, online_mark)
    derived = case(
        (devices.c.status == "offline", literal("offline")),
        (freshest.is_(None), case((devices.c.status == "online", "stale"), else_="offline")),
        (freshest >= cutoff, literal("online")),
        else_=literal("stale"),
    )
    return select(
        devices.c.id,
        devices.c.name,
        derived.label("status"),
        devices.c.status.label("reported_status"),
        devices.c.last_seen_at,
        devices.c.last_data_at,
        devices.c.last_state_at,
        devices.c.boot_id,
        devices.c.agent_version,
        devices.c.config_hash,
    ).order_by(devices.c.name)


@dataclass(frozen=True, slots=True)
class DeviceStatusRow:
    """One device as the fleet view shows it."""

    id: int
    name: str
    status: DerivedStatus
    reported_status: str
    last_seen_at: datetime | None
    last_data_at: datetime | None
    last_state_at: datetime | None
    boot_id: str | None
    agent_version: str | None
    config_hash: str | None


def device_statuses(
    conn: psycopg.Connection[Any],
    *,
    stale_after_s: float = DEFAULT_STALE_AFTER_SECONDS,
    now: datetime | None = None,
    names: Sequence[str] | None = None,
) -> list[DeviceStatusRow]:
    """Every device (or those in `names`) with its derived status, via psycopg."""
    stmt = status_select(stale_after_s=stale_after_s, now=now)
    if names is not None:
        stmt = stmt.where(devices.c.name == any_(literal(list(names), type_=ARRAY(Text))))
    compiled = stmt.compile(dialect=postgresql.psycopg.dialect())  # type: ignore[attr-defined]
    rows = conn.execute(str(compiled), compiled.params).fetchall()  # type: ignore[call-overload]
    return [DeviceStatusRow(*row) for row in rows]
