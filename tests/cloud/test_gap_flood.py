"""One device floods the worker with 5,000 gap-making batches while 10 gateways commit.

The issue "The guarantee must not end at the broker" measured gap bookkeeping as
quadratic (each late seq rewrote every gap of its stream on the single committer
thread), so one device sending seq 0, 2, 4, ... then 1, 3, 5, ... slowed every device.
Here, through the real broker and TimescaleDB: every window of every device is stored
exactly once, the flooding stream never holds more gaps than the cap and ends with none
open, and the other gateways' publish-to-commit latency during the flood is printed
beside their latency before it and during a flood of the same size in sequence order
(figures for the record, not thresholds: the flood's volume alone delays a single
worker's queue; the gaps must add nothing to that).
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from millrace.cloud.ingest.streams import DEFAULT_MAX_GAPS_PER_STREAM
from millrace.wire import Batch
from tests.cloud.ingest_support import (
    IngestDb,
    Publisher,
    assert_stored_exactly,
    ingest_db,
    make_batches,
    make_config,
    publishers,
    query,
    running_worker,
    scalar,
    wait_for,
)

__all__ = ["ingest_db", "publishers"]

pytestmark = pytest.mark.faults

GATEWAYS = 10
ROUNDS = 10  # one batch per gateway per round; the flood runs during the second half
FLOOD_BATCHES = 5000
FLOOD_METRICS = tuple(f"m{i:02d}" for i in range(50))
ROUND_PAUSE_S = 0.5

Key = tuple[str, str, int]


class CommitWatcher:
    """Polls the ledger and records when each batch of interest first became visible."""

    def __init__(self, dsn: str, prefix: str, keys: set[Key]) -> None:
        self.dsn = dsn
        self.prefix = prefix
        self.pending = set(keys)
        self.seen_at: dict[Key, float] = {}
        self.max_open_gaps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> CommitWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set() and self.pending:
            rows = query(
                self.dsn,
                "SELECT d.name, replace(l.boot_id::text, '-', ''), l.seq"
                " FROM ingest_ledger l JOIN devices d ON d.id = l.device_id"
                " WHERE d.name LIKE %s",
                [self.prefix + "%"],
            )
            now = time.monotonic()
            for key in set(rows) & self.pending:
                self.seen_at[key] = now
                self.pending.discard(key)
            gaps = scalar(self.dsn, "SELECT count(*) FROM sequence_gaps")
            self.max_open_gaps = max(self.max_open_gaps, int(gaps))
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def _latencies(published: dict[Key, float], seen: dict[Key, float]) -> list[float]:
    return [seen[k] - t for k, t in published.items() if k in seen]


def _flood_phase(
    server: Any,
    dsn: str,
    publishers: Callable[..., Publisher],
    *,
    flooder_name: str,
    calm_prefix: str,
    gaps: bool,
    seed: int,
) -> tuple[list[Batch], list[float], list[float]]:
    """10 gateways publish ROUNDS batches; halfway, one device publishes FLOOD_BATCHES.

    Returns the batches published and the gateways' publish-to-commit latencies before
    and during the flood.
    """
    calm = {
        f"{calm_prefix}{i:02d}": make_batches(
            f"{calm_prefix}{i:02d}", batches=ROUNDS, windows_per_batch=3, seed=seed + i
        )
        for i in range(GATEWAYS)
    }
    flood = make_batches(
        flooder_name, batches=FLOOD_BATCHES, windows_per_batch=1, metrics=FLOOD_METRICS, seed=seed
    )
    if gaps:
        # Every even seq first (each opens a gap), then every odd one (each closes
        # one): the pattern that was quadratic.
        flood = [b for b in flood if b.seq % 2 == 0] + [b for b in flood if b.seq % 2 == 1]
    pubs = {name: publishers(server, name) for name in calm}
    flooder = publishers(server, flooder_name)
    watcher = CommitWatcher(
        dsn, calm_prefix, {(b.device, b.boot_id, b.seq) for bs in calm.values() for b in bs}
    ).start()
    flood_thread = threading.Thread(target=flooder.publish, args=(flood,), daemon=True)
    published: dict[Key, float] = {}
    flooding: set[Key] = set()
    try:
        for round_no in range(ROUNDS):
            if round_no == ROUNDS // 2:
                flood_thread.start()
            for name, batches in calm.items():
                batch = batches[round_no]
                key = (name, batch.boot_id, batch.seq)
                published[key] = time.monotonic()
                if flood_thread.is_alive():
                    flooding.add(key)
                pubs[name].publish([batch])
            time.sleep(ROUND_PAUSE_S)
        flood_thread.join(300)
        assert not flood_thread.is_alive(), "the flood was not PUBACKed"
        wait_for(lambda: not watcher.pending, timeout_s=300, what="every gateway batch")
    finally:
        watcher.stop()
    assert watcher.max_open_gaps <= DEFAULT_MAX_GAPS_PER_STREAM
    assert len(flooding) >= GATEWAYS, "no gateway batch was published during the flood"
    before = _latencies({k: t for k, t in published.items() if k not in flooding}, watcher.seen_at)
    during = _latencies({k: t for k, t in published.items() if k in flooding}, watcher.seen_at)
    assert before and during
    return [b for bs in calm.values() for b in bs] + flood, before, during


def _ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms"


def test_5000_gap_making_batches_from_one_device_while_10_gateways_keep_committing(
    broker_factory: Callable[..., Any],
    ingest_db: IngestDb,
    publishers: Callable[..., Publisher],
    tmp_path: Path,
) -> None:
    server = broker_factory()
    dsn = ingest_db.owner_dsn
    config = make_config(
        tmp_path,
        server=server,
        dsn=ingest_db.ingest_dsn,
        client_id="flood-w1",
        group=f"g{uuid.uuid4().hex[:8]}",
        max_delay_ms=200,
    )
    with running_worker(config) as runner:
        # The same volume in sequence order first: the cost of 5,000 batches alone.
        in_order, _, during_in_order = _flood_phase(
            server, dsn, publishers, flooder_name="gw-order", calm_prefix="gw-a-",
            gaps=False, seed=100,
        )  # fmt: skip
        assert runner.counter("millrace_ingest_sequence_gaps_total") == 0
        with_gaps, before, during = _flood_phase(
            server, dsn, publishers, flooder_name="gw-gaps", calm_prefix="gw-b-",
            gaps=True, seed=200,
        )  # fmt: skip
        all_batches = in_order + with_gaps
        wait_for(
            lambda: scalar(dsn, "SELECT count(*) FROM ingest_ledger") == len(all_batches),
            timeout_s=300,
            what="every batch of every device",
        )
        assert runner.counter("millrace_ingest_db_errors_total", kind="down") == 0
        gaps_opened = runner.counter("millrace_ingest_sequence_gaps_total")
        gaps_forgotten = runner.counter("millrace_ingest_sequence_gaps_dropped_total")

    assert_stored_exactly(dsn, all_batches)
    assert query(dsn, "SELECT count(*) FROM dead_letters") == [(0,)]
    # Bounded while it lasted (checked by the watcher), all closed at the end, the
    # forgotten ones counted.
    assert query(dsn, "SELECT count(*) FROM sequence_gaps") == [(0,)]
    assert gaps_opened == FLOOD_BATCHES // 2 - 1
    # At most the cap stays recorded; odd seqs committed together with the last even
    # ones close some gaps before the cap is applied, so fewer may be forgotten.
    assert 0 < gaps_forgotten <= gaps_opened - DEFAULT_MAX_GAPS_PER_STREAM
    (open_gaps, dropped) = query(
        dsn,
        "SELECT s.open_gaps, s.gaps_dropped FROM ingest_streams s"
        " JOIN devices d ON d.id = s.device_id WHERE d.name = 'gw-gaps'",
    )[0]
    assert (open_gaps, dropped) == (0, gaps_forgotten)
    print(
        f"\ngateway publish->commit before a flood: {_ms(before)};"
        f" during 5,000 in-order batches: {_ms(during_in_order)};"
        f" during 5,000 gap-making batches: {_ms(during)}"
    )
