"""device_metrics (the per-device metric cap) and dead_letter_overflow (rate-limited letters)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 03:20:00.000000

`device_metrics` records which metrics each device has sent, so the writer can cap
them per device; `dead_letter_overflow` counts, per device, the dead letters not
stored because the device was over its rate. Existing devices get the metrics
they already have readings or events for.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dead_letter_overflow",
        sa.Column("device", sa.Text(), nullable=False, comment="topic device id; '' when none"),
        sa.Column("suppressed", sa.BigInteger(), nullable=False),
        sa.Column("first_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device", name=op.f("pk_dead_letter_overflow")),
    )
    op.create_table(
        "device_metrics",
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("metric_id", sa.Integer(), nullable=False),
        sa.Column(
            "first_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_device_metrics_device_id_devices")
        ),
        sa.ForeignKeyConstraint(
            ["metric_id"], ["metrics.id"], name=op.f("fk_device_metrics_metric_id_metrics")
        ),
        sa.PrimaryKeyConstraint("device_id", "metric_id", name=op.f("pk_device_metrics")),
    )
    op.execute(
        "INSERT INTO device_metrics (device_id, metric_id)"
        " SELECT DISTINCT device_id, metric_id FROM rollup_daily"
        " UNION SELECT DISTINCT device_id, metric_id FROM events"
        " ON CONFLICT DO NOTHING"
    )


def downgrade() -> None:
    op.drop_table("device_metrics")
    op.drop_table("dead_letter_overflow")
