"""Fixtures shared by the cloud tests that run as the retention role (retention, packing).

Each module keeps its own `db` (an upgraded fresh database) and `conn`; these resolve
against it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from millrace.cloud import dbupgrade


@pytest.fixture
def retention_login(db: str) -> str:
    """A login in db upgrade's millrace_retention group, as the plant and Ansible make one."""
    login = f"retention_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                sql.Identifier(login), sql.Identifier(dbupgrade.RETENTION_ROLE)
            )
        )
    return login


@pytest.fixture
def retention_conn(db: str, retention_login: str) -> Iterator[psycopg.Connection]:
    """A session of that login: what the retention schedule, and so packing, runs as."""
    with psycopg.connect(db, user=retention_login, autocommit=True) as connection:
        yield connection
