"""ingest_streams remembers where its forgotten gaps end (gaps_floor)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 05:20:00.000000

Gaps forgotten over the per-stream cap are the lowest ones, deleted one commit after
another. Lookups that walked the gap index from its low end ("the oldest gaps",
"the gap holding this late seq") crossed every deleted entry not yet vacuumed, so a
device sending every other seq made each commit slower than the last. `gaps_floor`
is the highest start of a forgotten gap: every lookup starts above it. Adding a
column with a constant default rewrites nothing; -1 (nothing forgotten yet) is right
for existing streams, whose lookups then behave as before until their next trim.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "ingest_streams",
        sa.Column(
            "gaps_floor",
            sa.BigInteger(),
            server_default="-1",
            nullable=False,
            comment="highest start of a gap forgotten over the cap; live gaps start above",
        ),
    )


def downgrade() -> None:
    op.drop_column("ingest_streams", "gaps_floor")
