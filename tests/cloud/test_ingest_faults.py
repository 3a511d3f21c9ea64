"""Ingest under faults: the worker killed with SIGKILL, stopped with SIGTERM, the database down.

Ground truth is the list of batches published (each PUBACKed by the broker); the database
must hold exactly those windows, once each, with rollups to match.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from millrace.wire import Batch
from tests.cloud.ingest_support import (
    Publisher,
    WorkerProcess,
    assert_stored_exactly,
    make_batches,
    make_config,
    prepare_database,
    publishers,
    running_worker,
    scalar,
    wait_for,
    wait_ledger,
    write_config,
)

__all__ = ["publishers"]

pytestmark = pytest.mark.faults

OUTAGE_SECONDS = 20.0  # what the issue asks for


class PacedPublisher:
    """Publishes batches from a thread at a steady rate, so faults land mid-stream."""

    def __init__(self, pub: Publisher, batches: Sequence[Batch], *, per_second: float) -> None:
        self.pub = pub
        self.batches = batches
        self.interval_s = 1.0 / per_second
        self.sent = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"pace-{pub.device}")

    def _run(self) -> None:
        try:
            next_at = time.monotonic()
            for batch in self.batches:
                self.pub.publish([batch])
                self.sent += 1
                next_at += self.interval_s
                time.sleep(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:
            self.error = exc

    def start(self) -> PacedPublisher:
        self._thread.start()
        return self

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "publisher did not finish"
        assert self.error is None, self.error


def test_sigkill_mid_stream_loses_nothing_and_doubles_nothing(
    broker_factory: Callable[..., Any],
    fresh_db: str,
    publishers: Callable[..., Publisher],
    tmp_path: Path,
) -> None:
    db = prepare_database(fresh_db)
    server = broker_factory()
    path = write_config(
        tmp_path / "worker.toml",
        server=server,
        dsn=db.ingest_dsn,
        client_id="kill-w1",
        group=f"g{uuid.uuid4().hex[:8]}",
    )
    batches = make_batches("kill-a", batches=240, windows_per_batch=40, seed=11)
    worker = WorkerProcess(path, tmp_path / "worker.log")
    worker.mark()
    worker.start()
    try:
        worker.wait_subscribed()
        paced = PacedPublisher(publishers(server, "kill-a"), batches, per_second=60).start()
        wait_for(
            lambda: scalar(db.owner_dsn, "SELECT count(*) FROM ingest_ledger") >= 60,
            what="a quarter of the stream to be stored",
        )
        worker.kill()
        stored_at_kill = scalar(db.owner_dsn, "SELECT count(*) FROM ingest_ledger")
        assert 0 < stored_at_kill < len(batches), "the kill did not land mid-stream"
        time.sleep(1.0)  # the stream goes on while the worker is dead: the session queues it
        worker.mark()
        worker.start()
        worker.wait_subscribed()
        paced.join(60)
        wait_ledger(db.owner_dsn, len(batches))
        assert worker.terminate() == 0
    finally:
        worker.close()
    assert_stored_exactly(db.owner_dsn, batches)
    assert "session resumed: True" in worker.log_path.read_text().split("=== start")[-1]


def test_sigterm_commits_and_acks_the_current_batch(
    broker_factory: Callable[..., Any],
    fresh_db: str,
    publishers: Callable[..., Publisher],
    tmp_path: Path,
) -> None:
    db = prepare_database(fresh_db)
    server = broker_factory()
    # A long batch delay: at SIGTERM there is always a batch open in the worker.
    path = write_config(
        tmp_path / "worker.toml",
        server=server,
        dsn=db.ingest_dsn,
        client_id="term-w1",
        group=f"g{uuid.uuid4().hex[:8]}",
        max_delay_ms=60_000,
    )
    batches = make_batches("term-a", batches=20, windows_per_batch=10, seed=12)
    worker = WorkerProcess(path, tmp_path / "worker.log")
    worker.start()
    try:
        worker.wait_subscribed()
        publishers(server, "term-a").publish(batches)
        time.sleep(0.5)  # delivered to the worker, waiting in its open batch
        assert scalar(db.owner_dsn, "SELECT count(*) FROM ingest_ledger") == 0
        assert worker.terminate() == 0
    finally:
        worker.close()
    # Committed before exit, not left to redelivery.
    assert scalar(db.owner_dsn, "SELECT count(*) FROM ingest_ledger") == len(batches)
    assert "stopping: committed and acked the last 20 messages" in worker.log_tail()
    assert_stored_exactly(db.owner_dsn, batches)


def test_database_down_for_20_s_mid_stream_recovers_by_itself(
    broker_factory: Callable[..., Any],
    pg_factory: Callable[..., Any],
    publishers: Callable[..., Publisher],
    tmp_path: Path,
) -> None:
    pg = pg_factory()
    dsn = pg.create_database("outage")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    db = prepare_database(dsn)
    server = broker_factory()
    config = make_config(
        tmp_path,
        server=server,
        dsn=db.ingest_dsn,
        client_id="down-w1",
        group=f"g{uuid.uuid4().hex[:8]}",
    )
    # About 30 s of stream at 12 batches/s; the outage covers 20 s of it.
    batches = make_batches("down-a", batches=360, windows_per_batch=20, seed=13)
    with running_worker(config) as runner:
        paced = PacedPublisher(publishers(server, "down-a"), batches, per_second=12).start()
        wait_for(
            lambda: scalar(db.owner_dsn, "SELECT count(*) FROM ingest_ledger") >= 30,
            what="the stream to be flowing",
        )
        pg.stop()
        down_at = time.monotonic()
        wait_for(
            lambda: runner.counter("millrace_ingest_db_up") == 0,
            what="the worker to notice the outage",
        )
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
        sent_during_outage = paced.sent
        pg.start()
        paced.join(60)
        wait_ledger(db.owner_dsn, len(batches), timeout_s=90)
        assert runner.counter("millrace_ingest_db_up") == 1
        assert runner.counter("millrace_ingest_db_errors_total", kind="connect") > 0
    assert sent_during_outage < len(batches), "the outage did not land mid-stream"
    assert_stored_exactly(db.owner_dsn, batches)
