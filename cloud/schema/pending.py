"""Hourly rollup partials waiting for the drain (cloud/ingest/rollup_drain.py).

Each commit COPYs its windows merged per (device, metric, period, hour) here, in the
transaction that stores the readings: no upsert and no conflict check on the
committer's path, and exactly once by construction. A drain deletes a batch of rows
and merges them into rollup_hourly/rollup_daily in one transaction of its own.
Times stay epoch milliseconds as the writer has them; `id` orders two parts of one
split window by when they were stored (the later part gives `last`).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    Identity,
    Integer,
    PrimaryKeyConstraint,
    Table,
    func,
)

from millrace.cloud.schema.core import metadata, timestamptz

rollup_pending = Table(
    "rollup_pending",
    metadata,
    Column("id", BigInteger, Identity(), nullable=False),
    Column("device_id", Integer, nullable=False),
    Column("metric_id", Integer, nullable=False),
    Column("period_s", Integer, nullable=False),
    Column("bucket_ms", BigInteger, nullable=False, comment="UTC hour start, epoch ms"),
    Column("windows", Integer, nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("sum", Double, nullable=False),
    Column("min", Double, nullable=False),
    Column("max", Double, nullable=False),
    Column("sumsq", Double, nullable=False),
    Column("first", Double, nullable=False),
    Column("first_ms", BigInteger, nullable=False),
    Column("last", Double, nullable=False),
    Column("last_ms", BigInteger, nullable=False),
    Column("rejected", BigInteger, nullable=False),
    timestamptz("committed_at", nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("id", name="pk_rollup_pending"),
)

__all__ = ["rollup_pending"]
