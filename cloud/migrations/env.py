"""Alembic environment: always online, on the connection `millrace db upgrade` hands in.

`millrace.cloud.dbupgrade` holds an advisory lock on that connection, so concurrent
upgrades run one after the other. Objects TimescaleDB creates itself (the
default time index of a hypertable, `<table>_<column>_idx`) are not part of
the metadata and are ignored when comparing.
"""

from __future__ import annotations

from alembic import context

from millrace.cloud.dbupgrade import include_object
from millrace.cloud.schema import metadata


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations through `millrace db upgrade --dsn DSN`")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        include_object=include_object,
        compare_type=True,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
