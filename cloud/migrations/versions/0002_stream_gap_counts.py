"""ingest_streams counts its open gaps and the gaps forgotten over the cap

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 03:10:00.000000

`open_gaps` lets the writer cap a stream's gaps without counting its rows;
`gaps_dropped` counts the oldest gaps forgotten over the cap; the `last_at` index
serves retention. Existing streams get their real gap count.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "ingest_streams",
        sa.Column(
            "open_gaps",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="its sequence_gaps rows",
        ),
    )
    op.add_column(
        "ingest_streams",
        sa.Column(
            "gaps_dropped",
            sa.BigInteger(),
            server_default="0",
            nullable=False,
            comment="oldest gaps forgotten over the per-stream cap",
        ),
    )
    op.create_index("ix_ingest_streams_last_at", "ingest_streams", ["last_at"], unique=False)
    op.execute(
        "UPDATE ingest_streams s SET open_gaps = g.n"
        " FROM (SELECT device_id, boot_id, count(*) AS n FROM sequence_gaps"
        "       GROUP BY device_id, boot_id) g"
        " WHERE s.device_id = g.device_id AND s.boot_id = g.boot_id"
    )


def downgrade() -> None:
    op.drop_index("ix_ingest_streams_last_at", table_name="ingest_streams")
    op.drop_column("ingest_streams", "gaps_dropped")
    op.drop_column("ingest_streams", "open_gaps")
