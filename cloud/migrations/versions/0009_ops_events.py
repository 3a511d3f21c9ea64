"""ops_events and devices.broker: failovers operators can see, and each gateway's broker

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 09:05:00.000000

With two brokers and a Patroni pair the dashboard's Pipeline page shows which broker each
gateway is on (devices.broker, set from births and heartbeats when it changes), records a
gateway's move and a change of database primary as rows of ops_events, and reads the
primary's replication state through millrace_replication(). That function is SECURITY
DEFINER so the dashboard role needs no pg_monitor/pg_read_all_stats (which would also show
it every session's query text): it returns the replication columns and nothing else, and
only the dashboard role may run it (`millrace db upgrade` grants it). Its owner (the
upgrading user) must be a superuser or hold pg_read_all_stats for the state columns to be
filled. New columns are nullable: nothing existing is rewritten.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# On the primary one row per standby; on a standby one row for its upstream (the primary
# it streams from), with the age of the last replayed commit.
REPLICATION_FUNCTION = """
CREATE OR REPLACE FUNCTION millrace_replication()
RETURNS TABLE (role text, name text, address text, state text, sync_state text,
               replay_lag_s double precision, lag_bytes numeric)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT 'standby', r.application_name, host(r.client_addr), r.state, r.sync_state,
           extract(epoch FROM r.replay_lag)::float8,
           pg_wal_lsn_diff(pg_current_wal_lsn(), r.replay_lsn)
      FROM pg_stat_replication r
     WHERE NOT pg_is_in_recovery()
    UNION ALL
    SELECT 'upstream', NULL, w.sender_host || ':' || w.sender_port, w.status, NULL,
           extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8,
           pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())
      FROM pg_stat_wal_receiver w
     WHERE pg_is_in_recovery()
     ORDER BY 1, 2
$$
"""


def upgrade() -> None:
    op.add_column(
        "devices",
        sa.Column(
            "broker",
            sa.Text(),
            nullable=True,
            comment="host:port of the broker its last birth/heartbeat came through",
        ),
    )
    op.add_column(
        "devices",
        sa.Column(
            "broker_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="when that message was received",
        ),
    )
    op.create_table(
        "ops_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column(
            "at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=True, comment="broker_move only"),
        sa.Column(
            "from_value", sa.Text(), nullable=True, comment="host:port before; NULL when first seen"
        ),
        sa.Column("to_value", sa.Text(), nullable=False, comment="host:port after"),
        sa.CheckConstraint(
            "kind IN ('broker_move', 'db_primary')", name=op.f("ck_ops_events_kind")
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_ops_events_device_id_devices")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ops_events")),
    )
    op.create_index("ix_ops_events_at", "ops_events", [sa.literal_column("at DESC")], unique=False)
    op.execute(REPLICATION_FUNCTION)
    op.execute("REVOKE ALL ON FUNCTION millrace_replication() FROM PUBLIC")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS millrace_replication()")
    op.drop_index("ix_ops_events_at", table_name="ops_events")
    op.drop_table("ops_events")
    op.drop_column("devices", "broker_at")
    op.drop_column("devices", "broker")
