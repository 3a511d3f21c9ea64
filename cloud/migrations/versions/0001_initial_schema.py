"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-26 02:49:29.526950

Every table of cloud.schema.metadata (core and ops). Tables only: hypertables,
grants and roles are made by `millrace db upgrade` afterwards (cloud/dbupgrade.py),
so this revision stays plain PostgreSQL.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "alert_rules",
        sa.Column("id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column(
            "metric", sa.Text(), nullable=False, comment="metric name; '*' = any (no_data only)"
        ),
        sa.Column(
            "devices", sa.Text(), server_default="*", nullable=False, comment="device id or glob"
        ),
        sa.Column("condition", sa.Text(), nullable=False),
        sa.Column("low", sa.Double(), nullable=True),
        sa.Column("high", sa.Double(), nullable=True),
        sa.Column("no_data_s", sa.Integer(), nullable=True),
        sa.Column("severity", sa.Text(), server_default="warning", nullable=False),
        sa.Column("hysteresis", sa.Double(), server_default="0", nullable=False),
        sa.Column("aggregate", sa.Text(), server_default="extreme", nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default="true", nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "aggregate IN ('extreme', 'mean', 'last')", name=op.f("ck_alert_rules_aggregate")
        ),
        sa.CheckConstraint(
            "condition IN ('above', 'below', 'outside', 'no_data')",
            name=op.f("ck_alert_rules_condition"),
        ),
        sa.CheckConstraint(
            "severity IN ('info', 'warning', 'critical')", name=op.f("ck_alert_rules_severity")
        ),
        sa.CheckConstraint("hysteresis >= 0", name=op.f("ck_alert_rules_hysteresis")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_rules")),
        sa.UniqueConstraint("name", name=op.f("uq_alert_rules_name")),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column(
            "at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("user_name", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False, comment="e.g. alert.acknowledge"),
        sa.Column("target", sa.Text(), nullable=False, comment="e.g. alert:42"),
        sa.Column("comment", sa.Text(), server_default="", nullable=False),
        sa.Column("details", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index("ix_audit_log_at", "audit_log", [sa.literal_column("at DESC")], unique=False)
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column(
            "device",
            sa.Text(),
            nullable=True,
            comment="device id from the topic when the topic parses",
        ),
        sa.Column("code", sa.Text(), nullable=False, comment="short reason class for grouping"),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("content_type", sa.Text(), nullable=True),
        sa.Column("payload", sa.LargeBinary(), nullable=False, comment="truncated to a cap"),
        sa.Column("payload_bytes", sa.Integer(), nullable=False, comment="size before truncation"),
        sa.PrimaryKeyConstraint("id", "received_at", name="pk_dead_letters"),
    )
    op.create_index(
        "ix_dead_letters_device_received_at",
        "dead_letters",
        ["device", sa.literal_column("received_at DESC")],
        unique=False,
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("name", sa.Text(), nullable=False, comment="device id = certificate CN"),
        sa.Column("status", sa.Text(), server_default="unknown", nullable=False),
        sa.Column(
            "last_seen_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="last message of any kind",
        ),
        sa.Column(
            "last_data_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="last data batch committed",
        ),
        sa.Column(
            "last_state_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="last birth/will on the state topic",
        ),
        sa.Column("boot_id", sa.Text(), nullable=True),
        sa.Column("agent_version", sa.Text(), nullable=True),
        sa.Column("config_hash", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "status IN ('unknown', 'online', 'offline')", name=op.f("ck_devices_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
        sa.UniqueConstraint("name", name=op.f("uq_devices_name")),
    )
    op.create_table(
        "events",
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("metric_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False, comment="num, bool (value 0/1) or text"),
        sa.Column("value", sa.Double(), nullable=True, comment="numeric and boolean events"),
        sa.Column("text", sa.Text(), nullable=True, comment="text events"),
        sa.Column(
            "ingested_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("kind IN ('num', 'bool', 'text')", name=op.f("ck_events_kind")),
    )
    op.create_index(
        "ix_events_device_metric_ts",
        "events",
        ["device_id", "metric_id", sa.literal_column("ts DESC")],
        unique=False,
    )
    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("unit", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metrics")),
        sa.UniqueConstraint("name", name=op.f("uq_metrics_name")),
    )
    op.create_table(
        "readings",
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("metric_id", sa.Integer(), nullable=False),
        sa.Column("period_s", sa.Integer(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("sum", sa.Double(), nullable=False),
        sa.Column("min", sa.Double(), nullable=False),
        sa.Column("max", sa.Double(), nullable=False),
        sa.Column("first", sa.Double(), nullable=False),
        sa.Column("last", sa.Double(), nullable=False),
        sa.Column("sumsq", sa.Double(), nullable=False),
        sa.Column("rejected", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "ingested_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("device_id", "metric_id", "ts", "period_s", name="pk_readings"),
    )
    op.create_table(
        "rollup_daily",
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("metric_id", sa.Integer(), nullable=False),
        sa.Column("period_s", sa.Integer(), nullable=False, comment="period of the source windows"),
        sa.Column("windows", sa.Integer(), nullable=False, comment="windows merged in"),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("sum", sa.Double(), nullable=False),
        sa.Column("min", sa.Double(), nullable=False),
        sa.Column("max", sa.Double(), nullable=False),
        sa.Column("sumsq", sa.Double(), nullable=False),
        sa.Column("first", sa.Double(), nullable=False),
        sa.Column("first_ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last", sa.Double(), nullable=False),
        sa.Column("last_ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rejected", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint(
            "device_id", "metric_id", "period_s", "bucket", name="pk_rollup_daily"
        ),
    )
    op.create_table(
        "rollup_hourly",
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("metric_id", sa.Integer(), nullable=False),
        sa.Column("period_s", sa.Integer(), nullable=False, comment="period of the source windows"),
        sa.Column("windows", sa.Integer(), nullable=False, comment="windows merged in"),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("sum", sa.Double(), nullable=False),
        sa.Column("min", sa.Double(), nullable=False),
        sa.Column("max", sa.Double(), nullable=False),
        sa.Column("sumsq", sa.Double(), nullable=False),
        sa.Column("first", sa.Double(), nullable=False),
        sa.Column("first_ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last", sa.Double(), nullable=False),
        sa.Column("last_ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rejected", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint(
            "device_id", "metric_id", "period_s", "bucket", name="pk_rollup_hourly"
        ),
    )
    op.create_table(
        "alerts",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("rule_id", sa.Integer(), nullable=True),
        sa.Column("rule_name", sa.Text(), nullable=False, comment="kept if the rule is deleted"),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("metric", sa.Text(), nullable=False),
        sa.Column("severity", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), server_default="active", nullable=False),
        sa.Column("message", sa.Text(), server_default="", nullable=False),
        sa.Column("value", sa.Double(), nullable=True, comment="the value that raised it"),
        sa.Column(
            "data_ts",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="time of the data that raised it",
        ),
        sa.Column(
            "raised_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("clear_value", sa.Double(), nullable=True),
        sa.Column("clear_data_ts", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cleared_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acknowledged_by", sa.Text(), nullable=True),
        sa.Column("ack_comment", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "severity IN ('info', 'warning', 'critical')", name=op.f("ck_alerts_severity")
        ),
        sa.CheckConstraint("state IN ('active', 'cleared')", name=op.f("ck_alerts_state")),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_alerts_device_id_devices")
        ),
        sa.ForeignKeyConstraint(
            ["rule_id"],
            ["alert_rules.id"],
            name=op.f("fk_alerts_rule_id_alert_rules"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
    )
    op.create_index(
        "ix_alerts_device_raised_at",
        "alerts",
        ["device_id", sa.literal_column("raised_at DESC")],
        unique=False,
    )
    op.create_index(
        "ix_alerts_raised_at", "alerts", [sa.literal_column("raised_at DESC")], unique=False
    )
    op.create_index(
        "ix_alerts_rule_device_metric",
        "alerts",
        ["rule_id", "device_id", "metric", sa.literal_column("id DESC")],
        unique=False,
    )
    op.create_index(
        "uq_alerts_active",
        "alerts",
        ["rule_id", "device_id", "metric"],
        unique=True,
        postgresql_where=sa.text("state = 'active'"),
    )
    op.create_table(
        "device_health",
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "reported_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="the agent's own clock",
        ),
        sa.Column("boot_id", sa.Text(), nullable=False),
        sa.Column("outbox_batches", sa.BigInteger(), nullable=False),
        sa.Column("outbox_bytes", sa.BigInteger(), nullable=False),
        sa.Column("outbox_oldest_age_s", sa.Double(), nullable=False),
        sa.Column("dropped_batches", sa.BigInteger(), nullable=False),
        sa.Column("rejected_readings", sa.BigInteger(), nullable=False),
        sa.Column(
            "driver_errors",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("cpu_percent", sa.Double(), nullable=False),
        sa.Column("rss_bytes", sa.BigInteger(), nullable=False),
        sa.Column("disk_free_bytes", sa.BigInteger(), nullable=False),
        sa.Column("cert_days_left", sa.Double(), nullable=False),
        sa.Column("clock_synced", sa.Boolean(), nullable=False),
        sa.Column("agent_version", sa.Text(), server_default="", nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_device_health_device_id_devices")
        ),
        sa.PrimaryKeyConstraint("device_id", name="pk_device_health"),
    )
    op.create_table(
        "device_health_history",
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "reported_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="the agent's own clock",
        ),
        sa.Column("boot_id", sa.Text(), nullable=False),
        sa.Column("outbox_batches", sa.BigInteger(), nullable=False),
        sa.Column("outbox_bytes", sa.BigInteger(), nullable=False),
        sa.Column("outbox_oldest_age_s", sa.Double(), nullable=False),
        sa.Column("dropped_batches", sa.BigInteger(), nullable=False),
        sa.Column("rejected_readings", sa.BigInteger(), nullable=False),
        sa.Column(
            "driver_errors",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("cpu_percent", sa.Double(), nullable=False),
        sa.Column("rss_bytes", sa.BigInteger(), nullable=False),
        sa.Column("disk_free_bytes", sa.BigInteger(), nullable=False),
        sa.Column("cert_days_left", sa.Double(), nullable=False),
        sa.Column("clock_synced", sa.Boolean(), nullable=False),
        sa.Column("agent_version", sa.Text(), server_default="", nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_device_health_history_device_id_devices")
        ),
        sa.PrimaryKeyConstraint("device_id", "received_at", name="pk_device_health_history"),
    )
    op.create_table(
        "ingest_ledger",
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("boot_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("windows", sa.Integer(), nullable=False),
        sa.Column("events", sa.Integer(), nullable=False),
        sa.Column("dropped", sa.BigInteger(), nullable=False, comment="device outbox drops so far"),
        sa.Column(
            "rejected", sa.BigInteger(), nullable=False, comment="device rejected readings so far"
        ),
        sa.Column("clock_synced", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_ingest_ledger_device_id_devices")
        ),
        sa.PrimaryKeyConstraint("device_id", "boot_id", "seq", name="pk_ingest_ledger"),
    )
    op.create_index("ix_ingest_ledger_received_at", "ingest_ledger", ["received_at"], unique=False)
    op.create_table(
        "ingest_streams",
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("boot_id", sa.Uuid(), nullable=False),
        sa.Column("first_seq", sa.BigInteger(), nullable=False),
        sa.Column("max_seq", sa.BigInteger(), nullable=False),
        sa.Column("batches", sa.BigInteger(), nullable=False),
        sa.Column("first_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_ingest_streams_device_id_devices")
        ),
        sa.PrimaryKeyConstraint("device_id", "boot_id", name="pk_ingest_streams"),
    )
    op.create_table(
        "metric_freshness",
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("metric", sa.Text(), nullable=False),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "last_data_ts",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="start of the newest window seen",
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_metric_freshness_device_id_devices")
        ),
        sa.PrimaryKeyConstraint("device_id", "metric", name="pk_metric_freshness"),
    )
    op.create_table(
        "sequence_gaps",
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("boot_id", sa.Uuid(), nullable=False),
        sa.Column("seq_from", sa.BigInteger(), nullable=False),
        sa.Column("seq_to", sa.BigInteger(), nullable=False),
        sa.Column("detected_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("seq_from <= seq_to", name=op.f("ck_sequence_gaps_range")),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_sequence_gaps_device_id_devices")
        ),
        sa.PrimaryKeyConstraint("device_id", "boot_id", "seq_from", name="pk_sequence_gaps"),
    )
    op.create_index("ix_sequence_gaps_detected_at", "sequence_gaps", ["detected_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_sequence_gaps_detected_at", table_name="sequence_gaps")
    op.drop_table("sequence_gaps")
    op.drop_table("metric_freshness")
    op.drop_table("ingest_streams")
    op.drop_index("ix_ingest_ledger_received_at", table_name="ingest_ledger")
    op.drop_table("ingest_ledger")
    op.drop_table("device_health_history")
    op.drop_table("device_health")
    op.drop_index(
        "uq_alerts_active", table_name="alerts", postgresql_where=sa.text("state = 'active'")
    )
    op.drop_index("ix_alerts_rule_device_metric", table_name="alerts")
    op.drop_index("ix_alerts_raised_at", table_name="alerts")
    op.drop_index("ix_alerts_device_raised_at", table_name="alerts")
    op.drop_table("alerts")
    op.drop_table("rollup_hourly")
    op.drop_table("rollup_daily")
    op.drop_table("readings")
    op.drop_table("metrics")
    op.drop_index("ix_events_device_metric_ts", table_name="events")
    op.drop_table("events")
    op.drop_table("devices")
    op.drop_index("ix_dead_letters_device_received_at", table_name="dead_letters")
    op.drop_table("dead_letters")
    op.drop_index("ix_audit_log_at", table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_table("alert_rules")
