"""rollup_pending: hourly rollup partials between the ingest commit and the drain

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 09:20:00.000000

The ingest commit COPYs its hourly partials here instead of upserting both rollup
tables; the worker's drain merges them in (cloud/ingest/rollup_drain.py). A new, empty
table: nothing existing is rewritten. Downgrade after the workers stopped (a clean stop
drains everything), or partials not yet merged are lost with the table.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rollup_pending",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("metric_id", sa.Integer(), nullable=False),
        sa.Column("period_s", sa.Integer(), nullable=False),
        sa.Column("bucket_ms", sa.BigInteger(), nullable=False, comment="UTC hour start, epoch ms"),
        sa.Column("windows", sa.Integer(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("sum", sa.Double(), nullable=False),
        sa.Column("min", sa.Double(), nullable=False),
        sa.Column("max", sa.Double(), nullable=False),
        sa.Column("sumsq", sa.Double(), nullable=False),
        sa.Column("first", sa.Double(), nullable=False),
        sa.Column("first_ms", sa.BigInteger(), nullable=False),
        sa.Column("last", sa.Double(), nullable=False),
        sa.Column("last_ms", sa.BigInteger(), nullable=False),
        sa.Column("rejected", sa.BigInteger(), nullable=False),
        sa.Column(
            "committed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollup_pending")),
    )


def downgrade() -> None:
    op.drop_table("rollup_pending")
