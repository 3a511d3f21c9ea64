"""Operations tables: alert rules and alerts, the audit log, device health, ops events.

They live on the shared `metadata` of cloud/schema/core.py so Alembic sees one
schema. `device_health` keeps the latest heartbeat per device (one row, cheap
for the fleet page); `device_health_history` keeps every heartbeat for the
backlog-over-time chart and is a hypertable pruned by retention.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    PrimaryKeyConstraint,
    Table,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from millrace.cloud.schema.core import HypertableSpec, metadata, timestamptz

ALERT_CONDITIONS = ("above", "below", "outside", "no_data")
ALERT_AGGREGATES = ("extreme", "mean", "last")
ALERT_SEVERITIES = ("info", "warning", "critical")
ALERT_STATES = ("active", "cleared")


alert_rules = Table(
    "alert_rules",
    metadata,
    Column("id", Integer, Identity(), primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    Column("metric", Text, nullable=False, comment="metric name; '*' = any (no_data only)"),
    Column("devices", Text, nullable=False, server_default="*", comment="device id or glob"),
    Column("condition", Text, nullable=False),
    Column("low", Double),
    Column("high", Double),
    Column("no_data_s", Integer),
    Column("severity", Text, nullable=False, server_default="warning"),
    Column("hysteresis", Double, nullable=False, server_default="0"),
    Column("aggregate", Text, nullable=False, server_default="extreme"),
    Column("enabled", Boolean, nullable=False, server_default="true"),
    Column("description", Text, nullable=False, server_default=""),
    timestamptz("created_at", nullable=False, server_default=func.now()),
    timestamptz("updated_at", nullable=False, server_default=func.now()),
    CheckConstraint(f"condition IN {ALERT_CONDITIONS!r}", name="condition"),
    CheckConstraint(f"severity IN {ALERT_SEVERITIES!r}", name="severity"),
    CheckConstraint(f"aggregate IN {ALERT_AGGREGATES!r}", name="aggregate"),
    CheckConstraint("hysteresis >= 0", name="hysteresis"),
)

alerts = Table(
    "alerts",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("rule_id", Integer, ForeignKey("alert_rules.id", ondelete="SET NULL")),
    Column("rule_name", Text, nullable=False, comment="kept if the rule is deleted"),
    Column("device_id", Integer, ForeignKey("devices.id"), nullable=False),
    Column("metric", Text, nullable=False),
    Column("severity", Text, nullable=False),
    Column("state", Text, nullable=False, server_default="active"),
    Column("message", Text, nullable=False, server_default=""),
    Column("value", Double, comment="the value that raised it"),
    timestamptz("data_ts", comment="time of the data that raised it"),
    timestamptz("raised_at", nullable=False, server_default=func.now()),
    Column("clear_value", Double),
    timestamptz("clear_data_ts"),
    timestamptz("cleared_at"),
    timestamptz("acknowledged_at"),
    Column("acknowledged_by", Text),
    Column("ack_comment", Text),
    CheckConstraint(f"state IN {ALERT_STATES!r}", name="state"),
    CheckConstraint(f"severity IN {ALERT_SEVERITIES!r}", name="severity"),
    # At most one active alert per (rule, device, metric): concurrent workers cannot
    # raise the same alert twice (INSERT ... ON CONFLICT DO NOTHING relies on it).
    Index(
        "uq_alerts_active",
        "rule_id",
        "device_id",
        "metric",
        unique=True,
        postgresql_where=text("state = 'active'"),
    ),
    # The latest alert of a (rule, device, metric): the engine's state lookup.
    Index("ix_alerts_rule_device_metric", "rule_id", "device_id", "metric", text("id DESC")),
    Index("ix_alerts_raised_at", text("raised_at DESC")),
    Index("ix_alerts_device_raised_at", "device_id", text("raised_at DESC")),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    timestamptz("at", nullable=False, server_default=func.now()),
    Column("user_name", Text, nullable=False),
    Column("action", Text, nullable=False, comment="e.g. alert.acknowledge"),
    Column("target", Text, nullable=False, comment="e.g. alert:42"),
    Column("comment", Text, nullable=False, server_default=""),
    Column("details", JSONB),
    Index("ix_audit_log_at", text("at DESC")),
)


def _health_columns() -> list[Column[object]]:
    return [
        Column("device_id", Integer, ForeignKey("devices.id"), nullable=False),
        timestamptz("received_at", nullable=False),
        timestamptz("reported_at", comment="the agent's own clock"),
        Column("boot_id", Text, nullable=False),
        Column("outbox_batches", BigInteger, nullable=False),
        Column("outbox_bytes", BigInteger, nullable=False),
        Column("outbox_oldest_age_s", Double, nullable=False),
        Column("dropped_batches", BigInteger, nullable=False),
        Column("rejected_readings", BigInteger, nullable=False),
        Column("driver_errors", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
        Column("cpu_percent", Double, nullable=False),
        Column("rss_bytes", BigInteger, nullable=False),
        Column("disk_free_bytes", BigInteger, nullable=False),
        Column("cert_days_left", Double, nullable=False),
        Column("clock_synced", Boolean, nullable=False),
        Column("agent_version", Text, nullable=False, server_default=""),
    ]


# The latest heartbeat per device.
device_health = Table(
    "device_health",
    metadata,
    *_health_columns(),
    PrimaryKeyConstraint("device_id", name="pk_device_health"),
)

# Every heartbeat, for charts over time; pruned by retention (30 days by default).
device_health_history = Table(
    "device_health_history",
    metadata,
    *_health_columns(),
    PrimaryKeyConstraint("device_id", "received_at", name="pk_device_health_history"),
    info={"hypertable": HypertableSpec("received_at", "7 days")},
)

# When each (device, metric) watched by a no_data rule was last received; metric '*'
# stands for any data of the device. Kept by the alert engine, read by its no-data check.
metric_freshness = Table(
    "metric_freshness",
    metadata,
    Column("device_id", Integer, ForeignKey("devices.id"), nullable=False),
    Column("metric", Text, nullable=False),
    timestamptz("last_received_at", nullable=False),
    timestamptz("last_data_ts", nullable=False, comment="start of the newest window seen"),
    PrimaryKeyConstraint("device_id", "metric", name="pk_metric_freshness"),
)

# One row per (alert transition, channel): the notification outbox and its ledger
# (cloud/alerts/notify.py). Written in the transaction that records the transition,
# delivered after commit; `failed` rows keep the last error. `sent_as` is the
# delivery id of the message that carried it (its own, or a digest's).
NOTIFICATION_STATES = ("pending", "delivered", "failed")
notifications = Table(
    "notifications",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column(
        "delivery_id",
        Uuid(as_uuid=True),
        nullable=False,
        unique=True,
        server_default=text("gen_random_uuid()"),
        comment="idempotency key sent with the message",
    ),
    Column("alert_id", BigInteger, nullable=False),
    Column("transition", Text, nullable=False, comment="active (raised) or cleared"),
    Column("channel", Text, nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("state", Text, nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    timestamptz("created_at", nullable=False, server_default=func.now()),
    timestamptz("next_attempt_at", nullable=False, server_default=func.now()),
    timestamptz("last_attempt_at"),
    timestamptz("delivered_at"),
    Column("sent_as", Uuid(as_uuid=True), comment="delivery id of the message that carried it"),
    Column("last_error", Text),
    CheckConstraint(f"state IN {NOTIFICATION_STATES!r}", name="state"),
    CheckConstraint(f"transition IN {ALERT_STATES!r}", name="transition"),
    # Exactly one intent per transition per channel.
    Index("uq_notifications_transition", "alert_id", "transition", "channel", unique=True),
    Index(
        "ix_notifications_due",
        "channel",
        "next_attempt_at",
        postgresql_where=text("state = 'pending'"),
    ),
    Index("ix_notifications_channel_created", "channel", "created_at"),
)

__all__ = [
    "ALERT_AGGREGATES",
    "ALERT_CONDITIONS",
    "ALERT_SEVERITIES",
    "ALERT_STATES",
    "alert_rules",
    "alerts",
    "audit_log",
    "device_health",
    "device_health_history",
    "metric_freshness",
    "notifications",
]


OPS_EVENT_KINDS = ("broker_move", "db_primary")

# Failovers operators should see: a gateway moving to another broker, the database
# primary changing (as an ingest worker finds it when it connects). Rare: one row a move.
ops_events = Table(
    "ops_events",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    timestamptz("at", nullable=False, server_default=func.now()),
    Column("kind", Text, nullable=False),
    Column("device_id", Integer, ForeignKey("devices.id"), comment="broker_move only"),
    Column("from_value", Text, comment="host:port before; NULL when first seen"),
    Column("to_value", Text, nullable=False, comment="host:port after"),
    CheckConstraint(f"kind IN {OPS_EVENT_KINDS!r}", name="kind"),
    Index("ix_ops_events_at", text("at DESC")),
)
