"""readings_packed: windows past the packing age, one row of arrays per metric-hour

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 08:30:00.000000

cloud/packing.py moves windows older than a day here from readings (193 bytes a
window there, under 30 here once TOAST compresses the arrays). A new table:
nothing existing is rewritten; `millrace db upgrade` makes it a hypertable on
`hour` afterwards, like every hypertable.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "readings_packed",
        sa.Column(
            "hour",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="start of the UTC hour its windows begin in",
        ),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("metric_id", sa.Integer(), nullable=False),
        sa.Column("period_s", sa.Integer(), nullable=False),
        sa.Column("windows", sa.Integer(), nullable=False),
        sa.Column(
            "slots",
            postgresql.ARRAY(sa.SmallInteger()),
            nullable=True,
            comment="start = hour + slot * period_s; NULL: all",
        ),
        sa.Column("count", postgresql.ARRAY(sa.BigInteger()), nullable=False),
        sa.Column("sum", postgresql.ARRAY(sa.Double()), nullable=False),
        sa.Column("min", postgresql.ARRAY(sa.Double()), nullable=False),
        sa.Column("max", postgresql.ARRAY(sa.Double()), nullable=False),
        sa.Column("first", postgresql.ARRAY(sa.Double()), nullable=False),
        sa.Column("last", postgresql.ARRAY(sa.Double()), nullable=False),
        sa.Column("sumsq", postgresql.ARRAY(sa.Double()), nullable=False),
        sa.Column("rejected", postgresql.ARRAY(sa.Integer()), nullable=False),
        sa.CheckConstraint("cardinality(count) = windows", name=op.f("ck_readings_packed_windows")),
        sa.PrimaryKeyConstraint(
            "device_id", "metric_id", "period_s", "hour", name="pk_readings_packed"
        ),
        postgresql_with={"toast_tuple_target": 128},
    )


def downgrade() -> None:
    op.drop_table("readings_packed")
