"""The Pipeline page's database view on a real Patroni pair (one pair for the module).

As the dashboard's least-privilege role: which node is primary, the standby's state and
lag (through millrace_replication(), migration 0009), the view from the standby, and a
SIGKILLed primary becoming a failover event the page lists once the worker reconnects.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
import pytest
from sqlalchemy import Engine, create_engine

from millrace import topics
from millrace.cloud import dbupgrade
from millrace.dashboards import redundancy
from millrace.wire import Heartbeat
from tests.cloud.ingest_support import Publisher, make_config, running_worker
from tests.dashboards.conftest import Plant, write_config
from tests.dashboards.test_app import _app, _login, _no_errors
from tests.fixtures.fix_patroni import PatroniCluster, wait_until

GIVE_UP_SECONDS = 180.0
DASH_LOGIN = "dash_pipeline"
INGEST_LOGIN = "ingest_pipeline"
DB = "pipeline"


@pytest.fixture(scope="module")
def pair() -> Iterator[PatroniCluster]:
    """One pair for the module, migrated, with a dashboard and an ingest login."""
    cluster = PatroniCluster()
    try:
        cluster.wait_synchronous(timeout_s=GIVE_UP_SECONDS)
        dsn = cluster.create_database(DB)
        dbupgrade.upgrade(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {DASH_LOGIN} LOGIN IN ROLE {dbupgrade.DASHBOARD_ROLE}")
            conn.execute(f"CREATE ROLE {INGEST_LOGIN} LOGIN IN ROLE {dbupgrade.INGEST_ROLE}")
        yield cluster
    finally:
        cluster.close()


def _as(dsn: str, user: str) -> str:
    return dsn.replace("user=postgres", f"user={user}")


def _engine(dsn: str) -> Engine:
    return create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))


def _state(dsn: str) -> redundancy.DatabaseState:
    engine = _engine(_as(dsn, DASH_LOGIN))
    try:
        with engine.connect() as conn:
            return redundancy.database_state(conn)
    finally:
        engine.dispose()


def test_the_dashboard_role_sees_the_primary_and_the_standbys_state_and_lag(
    pair: PatroniCluster,
) -> None:
    primary = pair.primary()
    standby = pair.other(primary)
    with psycopg.connect(primary.dsn(DB), autocommit=True) as conn:
        conn.execute("CREATE TABLE touched (x int)")  # a commit for the standby to replay
    # The role alone may not read the replication columns: why the function exists.
    with psycopg.connect(_as(primary.dsn(DB), DASH_LOGIN)) as conn:
        plain = conn.execute("SELECT state FROM pg_stat_replication").fetchall()
    assert plain == [(None,)]

    on_primary = _state(pair.dsn(DB))
    assert on_primary.primary and on_primary.server == f"127.0.0.1:{primary.pg_port}"
    rows = on_primary.replication.to_dict("records")
    assert [(r["role"], r["name"], r["state"], r["sync_state"]) for r in rows] == [
        ("standby", standby.name, "streaming", "sync")
    ]
    assert rows[0]["lag_bytes"] is not pd.NA and rows[0]["lag_bytes"] >= 0

    on_standby = _state(standby.dsn(DB))
    assert not on_standby.primary and on_standby.server == f"127.0.0.1:{standby.pg_port}"
    up = on_standby.replication.to_dict("records")
    assert [(r["role"], r["address"], r["state"]) for r in up] == [
        ("upstream", f"127.0.0.1:{primary.pg_port}", "streaming")
    ]
    assert up[0]["replay_lag_s"] is not None and up[0]["replay_lag_s"] >= 0


def _primaries(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT from_value, to_value FROM ops_events WHERE kind = 'db_primary' ORDER BY id"
        ).fetchall()


@pytest.mark.faults
def test_a_sigkilled_primary_is_a_failover_event_on_the_pipeline_page(
    pair: PatroniCluster, broker_factory: Any, tmp_path: Path
) -> None:
    old = pair.primary()
    new = pair.other(old)
    check = pair.dsn(DB)
    server = broker_factory()
    config = make_config(
        tmp_path,
        server=server,
        dsn=_as(pair.dsn(DB, attrs=None, first=old), INGEST_LOGIN),
        client_id="pipe-w1",
        group=f"g{uuid.uuid4().hex[:8]}",
    )
    before = f"127.0.0.1:{old.pg_port}"
    after = f"127.0.0.1:{new.pg_port}"
    device = f"pipe-{uuid.uuid4().hex[:6]}"
    with running_worker(config):
        assert _primaries(check)[-1] == (None, before)
        pub = Publisher(server, device)
        try:
            old.kill_postmaster()
            wait_until(lambda: new.role() == "primary", what=f"{new.name} promoted")

            def moved() -> bool:
                # A message makes the worker find the dead connection and reconnect.
                beat = Heartbeat(device, "d" * 32, int(time.time() * 1000), 0, 0, 0.0, 0, 0)
                pub.publish_raw(beat.to_json(), topic=topics.health_topic(device), wait=False)
                time.sleep(0.5)
                with psycopg.connect(new.dsn(DB), autocommit=True) as conn:
                    return (
                        conn.execute(
                            "SELECT 1 FROM ops_events WHERE to_value = %s", [after]
                        ).fetchone()
                        is not None
                    )

            wait_until(
                moved, what="the worker to record the new primary", timeout_s=GIVE_UP_SECONDS
            )
        finally:
            pub.close()
    engine = _engine(_as(new.dsn(DB), DASH_LOGIN))
    try:
        with engine.connect() as conn:
            now = datetime.now(UTC)
            events = redundancy.ops_events_in(conn, start=now - timedelta(hours=1), end=now)
    finally:
        engine.dispose()
    lines = [
        redundancy.describe_event(*row)
        for row in events[["kind", "device", "from_value", "to_value"]].itertuples(index=False)
    ]
    assert lines == [
        f"database primary moved from {before} to {after}",
        f"database primary is {before}",
    ]


@pytest.mark.integration
def test_the_pipeline_page_renders_the_primary_the_brokers_and_the_failovers(
    plant_factory: Callable[..., Plant],
    users_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    private = plant_factory(hours=0.5)
    monkeypatch.setenv(
        "MILLRACE_DASH_CONFIG", str(write_config(tmp_path, dsn=private.dash_dsn, users=users_file))
    )
    a, b = "a.plant.example:8883", "b.plant.example:8883"
    with psycopg.connect(private.dsn, autocommit=True) as conn:
        device, device_id = conn.execute("SELECT name, id FROM devices ORDER BY name").fetchone()
        conn.execute(
            "UPDATE devices SET broker = %s, broker_at = now() WHERE id = %s", [b, device_id]
        )
        conn.execute(
            "INSERT INTO ops_events (kind, device_id, from_value, to_value)"
            " VALUES ('broker_move', %s, %s, %s)",
            [device_id, a, b],
        )
        server = f"{conn.info.host}:{conn.info.port}"
    at = _login(_app(), "vera")
    at.switch_page("views/pipeline.py").run()
    _no_errors(at)
    text = [m.value for m in at.markdown]
    assert f"**Database primary:** `{server}` (the node this dashboard reads)" in text
    assert any(t.startswith("**Gateways per broker:**") and f"`{b}` 1" in t for t in text)
    shown = [frame.value for frame in at.dataframe]
    failovers = next(f for f in shown if "event" in f.columns)
    assert list(failovers["event"]) == [f"{device} moved from broker {a} to {b}"]
