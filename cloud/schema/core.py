"""Core ingest tables: the single source of the schema Alembic migrates.

Identity of stored data is (device, boot_id, seq): the ingest ledger holds one
row per committed batch and is written in the same transaction as the
batch's rows, so a redelivered batch is recognised and skipped.

Tables that `millrace db upgrade` turns into TimescaleDB hypertables carry
`info["hypertable"] = HypertableSpec(...)`; other modules (cloud/schema/ops.py)
may mark their own tables the same way on this `metadata`.

The hypertables (readings, events, rollups) carry device_id/metric_id without
foreign keys: a foreign key is a trigger fired per row, which would halve COPY
throughput, and the writer registers devices and metrics in the same
transaction as their rows (and nothing deletes them).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    Uuid,
    func,
    text,
)

# Stable constraint names so Alembic migrations can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

DEVICE_STATUSES = ("unknown", "online", "offline")
EVENT_KINDS = ("num", "bool", "text")


@dataclass(frozen=True, slots=True)
class HypertableSpec:
    """How `db upgrade` makes a table a hypertable (see docs/cloud.md for the intervals)."""

    time_column: str
    chunk_interval: str  # a PostgreSQL interval literal, e.g. "1 day"
    # TimescaleDB's own index on the time column; off where the table's key already
    # leads with (device, metric) and ends in time, because every index slows COPY.
    default_indexes: bool = True


def timestamptz(name: str, *, nullable: bool = True, **kw: object) -> Column[object]:
    """A `timestamptz` column: every time in the schema is zone-aware."""
    return Column(name, DateTime(timezone=True), nullable=nullable, **kw)  # type: ignore[arg-type]


devices = Table(
    "devices",
    metadata,
    Column("id", Integer, Identity(), primary_key=True),
    Column("name", Text, nullable=False, unique=True, comment="device id = certificate CN"),
    Column("status", Text, nullable=False, server_default="unknown"),
    timestamptz("last_seen_at", comment="last message of any kind"),
    timestamptz("last_data_at", comment="last data batch committed"),
    timestamptz("last_state_at", comment="last birth/will on the state topic"),
    Column("boot_id", Text),
    Column("agent_version", Text),
    Column("config_hash", Text),
    timestamptz("created_at", nullable=False, server_default=func.now()),
    Column("broker", Text, comment="host:port of the broker its last birth/heartbeat came through"),
    timestamptz("broker_at", comment="when that message was received"),
    CheckConstraint(f"status IN {DEVICE_STATUSES!r}", name="status"),
)

metrics = Table(
    "metrics",
    metadata,
    Column("id", Integer, Identity(), primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    timestamptz("created_at", nullable=False, server_default=func.now()),
)

# One row per closed window; ts is the window start (aligned to the period).
readings = Table(
    "readings",
    metadata,
    timestamptz("ts", nullable=False),
    Column("device_id", Integer, nullable=False),
    Column("metric_id", Integer, nullable=False),
    Column("period_s", Integer, nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("sum", Double, nullable=False),
    Column("min", Double, nullable=False),
    Column("max", Double, nullable=False),
    Column("first", Double, nullable=False),
    Column("last", Double, nullable=False),
    Column("sumsq", Double, nullable=False),
    Column("rejected", Integer, nullable=False, server_default="0"),
    timestamptz("ingested_at", nullable=False, server_default=func.now()),
    # Serves the dashboard's "one device, one metric, a time range" query and makes a
    # window stored twice under different (boot_id, seq) an error instead of a double count.
    PrimaryKeyConstraint("device_id", "metric_id", "ts", "period_s", name="pk_readings"),
    info={"hypertable": HypertableSpec("ts", "1 day", default_indexes=False)},
)

events = Table(
    "events",
    metadata,
    timestamptz("ts", nullable=False),
    Column("device_id", Integer, nullable=False),
    Column("metric_id", Integer, nullable=False),
    Column("kind", Text, nullable=False, comment="num, bool (value 0/1) or text"),
    Column("value", Double, comment="numeric and boolean events"),
    Column("text", Text, comment="text events"),
    timestamptz("ingested_at", nullable=False, server_default=func.now()),
    CheckConstraint(f"kind IN {EVENT_KINDS!r}", name="kind"),
    Index("ix_events_device_metric_ts", "device_id", "metric_id", text("ts DESC")),
    info={"hypertable": HypertableSpec("ts", "7 days", default_indexes=False)},
)


def _rollup(name: str, chunk_interval: str) -> Table:
    """Exact-merge aggregates of a bucket's windows; first/last kept with their times.

    Keyed by the source period too: an agent may window one signal at several periods
    (edge `extra_periods_s`), and merging those would count every reading twice.
    """
    return Table(
        name,
        metadata,
        timestamptz("bucket", nullable=False),
        Column("device_id", Integer, nullable=False),
        Column("metric_id", Integer, nullable=False),
        Column("period_s", Integer, nullable=False, comment="period of the source windows"),
        Column("windows", Integer, nullable=False, comment="windows merged in"),
        Column("count", BigInteger, nullable=False),
        Column("sum", Double, nullable=False),
        Column("min", Double, nullable=False),
        Column("max", Double, nullable=False),
        Column("sumsq", Double, nullable=False),
        Column("first", Double, nullable=False),
        timestamptz("first_ts", nullable=False),
        Column("last", Double, nullable=False),
        timestamptz("last_ts", nullable=False),
        Column("rejected", BigInteger, nullable=False, server_default="0"),
        PrimaryKeyConstraint("device_id", "metric_id", "period_s", "bucket", name=f"pk_{name}"),
        info={"hypertable": HypertableSpec("bucket", chunk_interval, default_indexes=False)},
    )


rollup_hourly = _rollup("rollup_hourly", "30 days")
rollup_daily = _rollup("rollup_daily", "365 days")

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigInteger, Identity(), nullable=False),
    timestamptz("received_at", nullable=False),
    Column("topic", Text, nullable=False),
    Column("device", Text, comment="device id from the topic when the topic parses"),
    Column("code", Text, nullable=False, comment="short reason class for grouping"),
    Column("reason", Text, nullable=False),
    Column("content_type", Text),
    Column("payload", LargeBinary, nullable=False, comment="truncated to a cap"),
    Column("payload_bytes", Integer, nullable=False, comment="size before truncation"),
    PrimaryKeyConstraint("id", "received_at", name="pk_dead_letters"),
    Index("ix_dead_letters_device_received_at", "device", text("received_at DESC")),
    info={"hypertable": HypertableSpec("received_at", "7 days")},
)

# One row per committed batch: the exactly-once key.
ingest_ledger = Table(
    "ingest_ledger",
    metadata,
    Column("device_id", Integer, ForeignKey("devices.id"), nullable=False),
    Column("boot_id", Uuid(as_uuid=True), nullable=False),
    Column("seq", BigInteger, nullable=False),
    timestamptz("sent_at", nullable=False),
    timestamptz("received_at", nullable=False),
    Column("windows", Integer, nullable=False),
    Column("events", Integer, nullable=False),
    Column("dropped", BigInteger, nullable=False, comment="device outbox drops so far"),
    Column("rejected", BigInteger, nullable=False, comment="device rejected readings so far"),
    Column("clock_synced", Boolean, nullable=False),
    PrimaryKeyConstraint("device_id", "boot_id", "seq", name="pk_ingest_ledger"),
    Index("ix_ingest_ledger_received_at", "received_at"),
)

# Per (device, boot_id): the sequence high-water mark. Its row lock orders concurrent
# workers touching the same stream, so gap detection sees a consistent maximum.
ingest_streams = Table(
    "ingest_streams",
    metadata,
    Column("device_id", Integer, ForeignKey("devices.id"), nullable=False),
    Column("boot_id", Uuid(as_uuid=True), nullable=False),
    Column("first_seq", BigInteger, nullable=False),
    Column("max_seq", BigInteger, nullable=False),
    Column("batches", BigInteger, nullable=False),
    timestamptz("first_at", nullable=False),
    timestamptz("last_at", nullable=False),
    Column(
        "open_gaps", Integer, nullable=False, server_default="0", comment="its sequence_gaps rows"
    ),
    Column(
        "gaps_dropped",
        BigInteger,
        nullable=False,
        server_default="0",
        comment="oldest gaps forgotten over the per-stream cap",
    ),
    Column(
        "gaps_floor",
        BigInteger,
        nullable=False,
        server_default="-1",
        comment="highest start of a gap forgotten over the cap; live gaps start above",
    ),
    PrimaryKeyConstraint("device_id", "boot_id", name="pk_ingest_streams"),
    Index("ix_ingest_streams_last_at", "last_at"),
)

# Open gaps: seq_from..seq_to (inclusive) not yet received. Late arrivals shrink them.
sequence_gaps = Table(
    "sequence_gaps",
    metadata,
    Column("device_id", Integer, ForeignKey("devices.id"), nullable=False),
    Column("boot_id", Uuid(as_uuid=True), nullable=False),
    Column("seq_from", BigInteger, nullable=False),
    Column("seq_to", BigInteger, nullable=False),
    timestamptz("detected_at", nullable=False),
    PrimaryKeyConstraint("device_id", "boot_id", "seq_from", name="pk_sequence_gaps"),
    CheckConstraint("seq_from <= seq_to", name="range"),
    Index("ix_sequence_gaps_detected_at", "detected_at"),
)

# Holes an agent reported after an unclean end of its previous run (power cut, watchdog
# kill, SIGKILL): the windows of `metric` in [from_ts, to_ts) were lost. One row per
# (device, ended boot, metric), so a redelivered or repeated birth records nothing twice.
data_holes = Table(
    "data_holes",
    metadata,
    Column("device_id", Integer, ForeignKey("devices.id"), nullable=False),
    Column("prev_boot_id", Uuid(as_uuid=True), nullable=False, comment="the run that ended"),
    Column("metric", Text, nullable=False),
    timestamptz("from_ts", nullable=False, comment="end of its last closed window"),
    timestamptz("to_ts", nullable=False, comment="start of the next run"),
    Column("boot_id", Uuid(as_uuid=True), nullable=False, comment="the run that reported it"),
    Column("cause", Text, nullable=False, server_default="unclean end"),
    Column(
        "metrics_omitted",
        Integer,
        nullable=False,
        server_default="0",
        comment="metrics of the same hole the birth could not name (over its cap)",
    ),
    timestamptz("recorded_at", nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("device_id", "prev_boot_id", "metric", name="pk_data_holes"),
    CheckConstraint("from_ts <= to_ts", name="range"),
    Index("ix_data_holes_recorded_at", "recorded_at"),
)

# The metrics each device has sent: the per-device metric cap counts these rows.
device_metrics = Table(
    "device_metrics",
    metadata,
    Column("device_id", Integer, ForeignKey("devices.id"), nullable=False),
    Column("metric_id", Integer, ForeignKey("metrics.id"), nullable=False),
    timestamptz("first_at", nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("device_id", "metric_id", name="pk_device_metrics"),
)

# The unit each device's birth gives a metric: per device, since one device's birth must
# never relabel another's data. Keyed by the metric's name (a birth creates no metric).
device_units = Table(
    "device_units",
    metadata,
    Column("device_id", Integer, ForeignKey("devices.id"), nullable=False),
    Column("metric", Text, nullable=False),
    Column("unit", Text, nullable=False, comment="as the device sent it; shown escaped"),
    timestamptz("updated_at", nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("device_id", "metric", name="pk_device_units"),
)

# Dead letters not stored because their device was over its rate, counted per device.
dead_letter_overflow = Table(
    "dead_letter_overflow",
    metadata,
    Column("device", Text, nullable=False, comment="topic device id; '' when none"),
    Column("suppressed", BigInteger, nullable=False),
    timestamptz("first_at", nullable=False),
    timestamptz("last_at", nullable=False),
    PrimaryKeyConstraint("device", name="pk_dead_letter_overflow"),
)

__all__ = [
    "DEVICE_STATUSES",
    "EVENT_KINDS",
    "HypertableSpec",
    "data_holes",
    "dead_letter_overflow",
    "dead_letters",
    "device_metrics",
    "device_units",
    "devices",
    "events",
    "ingest_ledger",
    "ingest_streams",
    "metadata",
    "metrics",
    "readings",
    "rollup_daily",
    "rollup_hourly",
    "sequence_gaps",
]
