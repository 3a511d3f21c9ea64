"""device_units: a metric's unit per device, not one per metric name for the whole fleet

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 05:10:00.000000

Before, a birth wrote `metrics.unit`, so one device's birth relabelled every device's
data of that metric. Each device now keeps the units of its own births. Existing
labels are copied to the devices that have sent the metric (read from
`device_metrics`, a small plain table: no hypertable is scanned), then the
fleet-wide column goes (dropping a column rewrites nothing in PostgreSQL). A label
of a metric no device has data of has no device to go to and is dropped; the
devices' next births set their units again.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "device_units",
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("metric", sa.Text(), nullable=False),
        sa.Column(
            "unit", sa.Text(), nullable=False, comment="as the device sent it; shown escaped"
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_device_units_device_id_devices")
        ),
        sa.PrimaryKeyConstraint("device_id", "metric", name=op.f("pk_device_units")),
    )
    op.execute(
        "INSERT INTO device_units (device_id, metric, unit)"
        " SELECT dm.device_id, m.name, m.unit"
        " FROM device_metrics dm JOIN metrics m ON m.id = dm.metric_id"
        " WHERE m.unit IS NOT NULL"
    )
    op.drop_column("metrics", "unit")


def downgrade() -> None:
    op.add_column("metrics", sa.Column("unit", sa.Text(), nullable=True))
    # One label per name again: the most common one among the devices.
    op.execute(
        "UPDATE metrics m SET unit = u.unit FROM ("
        " SELECT DISTINCT ON (metric) metric, unit FROM device_units"
        " GROUP BY metric, unit ORDER BY metric, count(*) DESC, unit) u"
        " WHERE u.metric = m.name"
    )
    op.drop_table("device_units")
