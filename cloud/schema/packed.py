"""The packed form of old windows: one row of arrays per (device, metric, period, hour).

A `readings` row costs about 190 bytes on disk (heap tuple plus its primary-key
entry) for 60 bytes of aggregate. Past the packing age (cloud/packing.py) an hour
of one metric's windows becomes one row here: each aggregate field is one array in
window order, which TOAST compresses (pglz) because neighbouring windows of a slowly
varying signal repeat their bytes, and the key and tuple header are paid once per
hour instead of once per window. The dashboard reads both forms (docs/retention.md).

`slots[i]` is window i's start as a multiple of `period_s` after `hour`; NULL when
the hour holds every window in order (the common case costs nothing). `ingested_at`
is not kept: commit latency is a question about recent data.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Double,
    Integer,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
)
from sqlalchemy.dialects.postgresql import ARRAY

from millrace.cloud.schema.core import HypertableSpec, metadata, timestamptz

# Below the default 2 kB, so even an hour of 60 s windows is compressed (or moved out
# of line) instead of stored as raw doubles in the heap.
TOAST_TUPLE_TARGET = 128

readings_packed = Table(
    "readings_packed",
    metadata,
    timestamptz("hour", nullable=False, comment="start of the UTC hour its windows begin in"),
    Column("device_id", Integer, nullable=False),
    Column("metric_id", Integer, nullable=False),
    Column("period_s", Integer, nullable=False),
    Column("windows", Integer, nullable=False),
    Column("slots", ARRAY(SmallInteger), comment="start = hour + slot * period_s; NULL: all"),
    Column("count", ARRAY(BigInteger), nullable=False),
    Column("sum", ARRAY(Double), nullable=False),
    Column("min", ARRAY(Double), nullable=False),
    Column("max", ARRAY(Double), nullable=False),
    Column("first", ARRAY(Double), nullable=False),
    Column("last", ARRAY(Double), nullable=False),
    Column("sumsq", ARRAY(Double), nullable=False),
    Column("rejected", ARRAY(Integer), nullable=False),
    CheckConstraint("cardinality(count) = windows", name="windows"),
    PrimaryKeyConstraint("device_id", "metric_id", "period_s", "hour", name="pk_readings_packed"),
    postgresql_with={"toast_tuple_target": TOAST_TUPLE_TARGET},
    info={"hypertable": HypertableSpec("hour", "1 day", default_indexes=False)},
)

__all__ = ["TOAST_TUPLE_TARGET", "readings_packed"]
