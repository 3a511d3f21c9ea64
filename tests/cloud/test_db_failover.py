"""Database failover under load: the Patroni pair's primary killed with SIGKILL mid-stream.

A simulated fleet publishes through the real broker into an ingest worker whose DSN names
both nodes; the primary's postmaster is SIGKILLed, Patroni promotes the synchronous standby,
the worker reconnects to it, and Patroni brings the old primary back as the new standby.
Ground truth is the list of batches published (each PUBACKed by the broker): the database
must hold exactly those windows, once each, with rollups to match (docs/operations.md
"Database failover"; figures in docs/benchmarks.md).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from millrace.cloud import dbupgrade
from millrace.cloud.ingest.store import error_kind
from millrace.cloud.ingest.worker import Worker, connect_db
from tests.cloud.ingest_support import (
    Publisher,
    WorkerThread,
    assert_stored_exactly,
    make_batches,
    make_config,
    publishers,
    scalar,
    wait_for,
    wait_ledger,
)
from tests.cloud.test_ingest_faults import PacedPublisher
from tests.fixtures.fix_patroni import PatroniCluster, patroni_pair, wait_until

__all__ = ["patroni_pair", "publishers"]

DEVICES = 4
BATCHES_PER_DEVICE = 200
PER_SECOND = 8.0  # per device: 32 batches/s of 20 windows, about 25 s of stream
GIVE_UP_SECONDS = 180.0


def _commit_times_after(dsn: str, since_epoch_s: float) -> Any:
    """The first ledger commit at or after `since` (track_commit_timestamp is on)."""
    return scalar(
        dsn,
        "SELECT extract(epoch FROM min(pg_xact_commit_timestamp(xmin)))::float8"
        " FROM ingest_ledger WHERE pg_xact_commit_timestamp(xmin) >= to_timestamp(%s)",
        [since_epoch_s],
    )


@pytest.mark.faults
def test_primary_killed_under_load_fails_over_and_loses_and_doubles_nothing(
    patroni_pair: PatroniCluster,
    broker_factory: Callable[..., Any],
    publishers: Callable[..., Publisher],
    tmp_path: Path,
) -> None:
    pair = patroni_pair
    old = pair.primary()
    new = pair.other(old)
    check_dsn = pair.create_database("failover")  # read-write: the test's own checks
    # The standby first and no target_session_attrs: migrations and the worker must find
    # the primary themselves (cloud/dsn.py), before the failover and after it.
    writer_dsn = pair.dsn("failover", attrs=None, first=new)
    dbupgrade.upgrade(writer_dsn)
    login = f"ingest_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(check_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {login} LOGIN IN ROLE {dbupgrade.INGEST_ROLE}")
    server = broker_factory()
    config = make_config(
        tmp_path,
        server=server,
        dsn=writer_dsn.replace("user=postgres", f"user={login}"),
        client_id="dbfo-w1",
        group=f"g{uuid.uuid4().hex[:8]}",
    )
    connects: list[tuple[float, int]] = []  # (wall time, port) of every database connection

    def connect() -> psycopg.Connection[Any]:
        conn = connect_db(config.dsn, application_name="millrace-ingest dbfo-w1")
        connects.append((time.time(), conn.info.port))
        return conn

    runner = WorkerThread(config)
    runner.worker = Worker(config, connect=connect)
    fleet = [
        make_batches(f"dbfo-{i}", batches=BATCHES_PER_DEVICE, windows_per_batch=20, seed=40 + i)
        for i in range(DEVICES)
    ]
    everything = [b for batches in fleet for b in batches]
    runner.start()
    try:
        assert connects and connects[0][1] == old.pg_port, "the worker is not on the primary"
        paced = [
            PacedPublisher(publishers(server, batches[0].device), batches, per_second=PER_SECOND)
            for batches in fleet
        ]
        for p in paced:
            p.start()
        wait_for(
            lambda: scalar(check_dsn, "SELECT count(*) FROM ingest_ledger") >= len(everything) / 4,
            what="a quarter of the stream to be stored",
            timeout_s=GIVE_UP_SECONDS,
        )
        sent_before_kill = sum(p.sent for p in paced)
        killed_at = time.time()
        old.kill_postmaster()
        wait_until(lambda: new.role() == "primary", what=f"{new.name} promoted")
        promoted_seen_s = time.time() - killed_at
        # Patroni restarts the old primary as the new one's standby (pg_rewind if needed),
        # while the stream goes on.
        primary = pair.wait_synchronous(timeout_s=GIVE_UP_SECONDS)
        rejoined_s = time.time() - killed_at
        assert primary is new, f"{primary.name} is primary, expected {new.name}\n{pair.logs()}"
        assert old.role() == "replica"
        for p in paced:
            p.join(GIVE_UP_SECONDS)
        wait_ledger(check_dsn, len(everything), timeout_s=GIVE_UP_SECONDS)
        assert runner.counter("millrace_ingest_db_up") == 1
        # What was in flight at the kill came back from the broker's session (not acked).
        redelivered = runner.counter("millrace_ingest_redeliveries_total")
        deduped = runner.counter("millrace_ingest_duplicates_total")
        assert redelivered > 0
    finally:
        runner.stop()
    assert sent_before_kill < len(everything), "the kill did not land mid-stream"
    stored_before = [t for t, port in connects if port == old.pg_port and t < killed_at]
    reconnected = [t for t, port in connects if port == new.pg_port and t > killed_at]
    assert stored_before and reconnected, f"connections: {connects}"
    resumed_at = _commit_times_after(check_dsn, reconnected[0])
    assert resumed_at is not None, "no commit on the new primary"
    assert (old.name, "streaming", "sync") in pair.streaming(new)
    assert_stored_exactly(check_dsn, everything)
    print(
        f"\ndb failover: {len(everything)} batches, {DEVICES} devices at {PER_SECOND}/s each;"
        f" promoted seen after {promoted_seen_s:.1f} s; worker reconnected after"
        f" {reconnected[0] - killed_at:.1f} s; commits resumed after"
        f" {resumed_at - killed_at:.1f} s; old primary streaming as sync standby after"
        f" {rejoined_s:.1f} s; {redelivered:.0f} messages redelivered, {deduped:.0f} of them"
        " already stored; lost 0, doubled 0"
    )


@pytest.mark.integration
def test_a_standby_refusing_a_write_is_an_outage_not_the_messages_fault(fresh_db: str) -> None:
    # A demoted primary or a replica the DSN reached says 25006; the worker must reconnect
    # (and find the primary), not charge the batch's messages toward dead letters.
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = on")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as caught:
            conn.execute("CREATE TABLE refused (x int)")
        assert error_kind(conn, caught.value) == "down"


@pytest.mark.faults
def test_with_the_standby_down_the_primary_goes_on_alone_and_the_standby_catches_up(
    patroni_pair: PatroniCluster,
) -> None:
    # synchronous_mode_strict is off: a dead standby (its machine gone: Patroni and
    # postmaster SIGKILLed) stalls commits only until Patroni drops it from
    # synchronous_standby_names; back, it catches up and is synchronous again.
    pair = patroni_pair
    primary = pair.primary()
    standby = pair.other(primary)
    dsn = pair.create_database("alone")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        standby.kill()
        started = time.monotonic()
        # Until Patroni drops the standby, a commit may wait for it; after, none does.
        wait_until(
            lambda: conn.execute("SHOW synchronous_standby_names").fetchone() == ("",),
            what="Patroni to drop the dead standby from synchronous_standby_names",
        )
        dropped_s = time.monotonic() - started
        conn.execute("INSERT INTO t VALUES (1)")
    standby.start()
    assert pair.wait_synchronous() is primary
    with psycopg.connect(standby.dsn("alone"), autocommit=True) as conn:
        wait_until(
            lambda: conn.execute("SELECT count(*) FROM t").fetchone() == (1,),
            what="the commit made alone to reach the standby",
        )
    print(f"\nstandby killed: Patroni let the primary go on alone after {dropped_s:.1f} s")


@pytest.mark.faults
def test_the_dashboard_pool_follows_the_primary_after_a_failover(
    patroni_pair: PatroniCluster,
) -> None:
    # The dashboard's own engine (pool with pre-ping) on a two-host URL: after the primary
    # dies, the next checkout replaces the dead pooled connection with one to the new one.
    from millrace.dashboards import data

    pair = patroni_pair
    old = pair.primary()
    new = pair.other(old)
    hosts = ",".join(f"127.0.0.1:{n.pg_port}" for n in (new, old))  # the standby first
    engine = data.engine(f"postgresql://postgres@{hosts}/postgres?target_session_attrs=read-write")
    port = "SELECT inet_server_port()"
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql(port).scalar() == old.pg_port
        old.kill_postmaster()
        wait_until(lambda: new.role() == "primary", what=f"{new.name} promoted")
        with engine.connect() as conn:
            assert conn.exec_driver_sql(port).scalar() == new.pg_port
            conn.exec_driver_sql("CREATE TABLE acknowledged (x int)")  # it writes there
            conn.commit()
    finally:
        engine.dispose()
