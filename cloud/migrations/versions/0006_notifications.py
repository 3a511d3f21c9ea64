"""notifications: the alert notification outbox and ledger

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 05:40:00.000000

One row per (alert transition, channel), written in the transaction that records
the transition and delivered after commit (cloud/alerts/notify.py). A new table:
nothing existing is rewritten.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "notifications",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column(
            "delivery_id",
            sa.Uuid(),
            server_default=sa.text("gen_random_uuid()"),
            nullable=False,
            comment="idempotency key sent with the message",
        ),
        sa.Column("alert_id", sa.BigInteger(), nullable=False),
        sa.Column("transition", sa.Text(), nullable=False, comment="active (raised) or cleared"),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("state", sa.Text(), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "sent_as",
            sa.Uuid(),
            nullable=True,
            comment="delivery id of the message that carried it",
        ),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'delivered', 'failed')", name=op.f("ck_notifications_state")
        ),
        sa.CheckConstraint(
            "transition IN ('active', 'cleared')", name=op.f("ck_notifications_transition")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
        sa.UniqueConstraint("delivery_id", name=op.f("uq_notifications_delivery_id")),
    )
    op.create_index(
        "uq_notifications_transition",
        "notifications",
        ["alert_id", "transition", "channel"],
        unique=True,
    )
    op.create_index(
        "ix_notifications_due",
        "notifications",
        ["channel", "next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.create_index(
        "ix_notifications_channel_created",
        "notifications",
        ["channel", "created_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_table("notifications")
