"""data_holes: what an agent lost at an unclean end (power cut, watchdog kill, SIGKILL)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 05:50:00.000000

An agent that did not reach its orderly stop names, in the births of its next run, the
run that ended and the end of the last window it closed per metric; the ingest records
one row per (device, ended run, metric) with the hole [from_ts, to_ts). Before, such a
loss left no trace: the next run has a new boot id, so no sequence gap showed it. A new
table: nothing existing is rewritten.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "data_holes",
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("prev_boot_id", sa.Uuid(), nullable=False, comment="the run that ended"),
        sa.Column("metric", sa.Text(), nullable=False),
        sa.Column(
            "from_ts",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="end of its last closed window",
        ),
        sa.Column(
            "to_ts", sa.DateTime(timezone=True), nullable=False, comment="start of the next run"
        ),
        sa.Column("boot_id", sa.Uuid(), nullable=False, comment="the run that reported it"),
        sa.Column("cause", sa.Text(), server_default="unclean end", nullable=False),
        sa.Column(
            "metrics_omitted",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="metrics of the same hole the birth could not name (over its cap)",
        ),
        sa.Column(
            "recorded_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("from_ts <= to_ts", name=op.f("ck_data_holes_range")),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_data_holes_device_id_devices")
        ),
        sa.PrimaryKeyConstraint("device_id", "prev_boot_id", "metric", name=op.f("pk_data_holes")),
    )
    op.create_index("ix_data_holes_recorded_at", "data_holes", ["recorded_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_data_holes_recorded_at", table_name="data_holes")
    op.drop_table("data_holes")
