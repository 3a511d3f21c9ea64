"""End-to-end receipts: a batch leaves the edge outbox only when the database has it.

Real mosquitto (project TLS/ACL config), real TimescaleDB, real ingest worker and edge
agents. Ground truth is every batch an agent wrote to its outbox (recorded as it is
appended); the database must hold each of their windows exactly once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from millrace import topics
from millrace.edge.agent import Agent
from millrace.edge.batching import Encoded
from millrace.edge.config import load_config
from millrace.wire import Batch, Receipt, content_type_for, decode_batch
from tests.cloud.ingest_support import (
    IngestDb,
    Publisher,
    WorkerProcess,
    aligned_now_ms,
    make_batches,
    make_config,
    prepare_database,
    query,
    running_worker,
    wait_for,
    write_config,
)
from tests.edge.agent_helpers import SIM_SIGNALS
from tests.edge.agent_helpers import write_config as write_edge_config
from tests.fixtures.fix_broker import connect_client

WAIT_SECONDS = 90.0
# Short so the tests see resends; production's default is 30 s (jittered to 30-60 s).
RECEIPT_WAIT_SECONDS = 1.0

Key = tuple[str, str, int]  # device, boot_id, seq
WindowKey = tuple[str, str, int, int]  # device, metric, start_ms, period_s


@pytest.fixture
def ingest_db(fresh_db: str) -> IngestDb:
    return prepare_database(fresh_db)


class RecordingAgent:
    """An in-process agent whose every outbox append is recorded (the ground truth)."""

    def __init__(self, config: Path) -> None:
        self.agent = Agent(load_config(config))
        self.batches: list[Batch] = []
        self._lock = threading.Lock()
        original = self.agent.outbox.append

        def append(boot_id: str, items: Sequence[Encoded], **kw: Any) -> list[int]:
            ids = original(boot_id, items, **kw)
            ctype = content_type_for(kw["encoding"])
            with self._lock:
                for item, _ in zip(items, ids, strict=False):
                    batch = decode_batch(item.payload, content_type=ctype)
                    assert isinstance(batch, Batch)
                    self.batches.append(batch)
            return ids

        self.agent.outbox.append = append  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self.agent.run, daemon=True)

    def start(self) -> RecordingAgent:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.agent.request_stop()
        self._thread.join(60)
        assert not self._thread.is_alive(), "agent did not stop"

    def produced(self) -> list[Batch]:
        with self._lock:
            return list(self.batches)

    def outbox_keys(self) -> set[Key]:
        with sqlite3.connect(self.agent.config.outbox.path) as db:
            rows = db.execute("SELECT boot_id, seq FROM batches").fetchall()
        return {(self.agent.config.device_id, b, s) for b, s in rows}


@contextlib.contextmanager
def agents(
    server: Any, test_pki: Any, tmp_path: Path, count: int, *, extra: str = ""
) -> Iterator[list[RecordingAgent]]:
    started: list[RecordingAgent] = []
    try:
        for i in range(count):
            device = f"rcpt-{i}-{uuid.uuid4().hex[:6]}"
            test_pki.issue(device)
            workdir = tmp_path / device
            workdir.mkdir()
            config = write_edge_config(
                workdir / "edge.toml",
                server=server,
                device=device,
                signals=SIM_SIGNALS,
                broker_extra=f"receipt_wait_s = {RECEIPT_WAIT_SECONDS}\n{extra}",
            )
            started.append(RecordingAgent(config).start())
        yield started
    finally:
        for agent in started:
            agent.stop()


def ledger_keys(dsn: str) -> set[Key]:
    rows = query(
        dsn,
        "SELECT d.name, l.boot_id, l.seq FROM ingest_ledger l JOIN devices d ON d.id = l.device_id",
    )
    return {(name, boot.hex, seq) for name, boot, seq in rows}


def stored_window_counts(dsn: str) -> Counter[WindowKey]:
    rows = query(
        dsn,
        "SELECT d.name, m.name, (extract(epoch FROM r.ts) * 1000)::int8, r.period_s, count(*)"
        " FROM readings r JOIN devices d ON d.id = r.device_id"
        " JOIN metrics m ON m.id = r.metric_id GROUP BY 1, 2, 3, 4",
    )
    return Counter({(d, m, ts, p): n for d, m, ts, p, n in rows})


def keys_of(batches: Sequence[Batch]) -> set[Key]:
    return {(b.device, b.boot_id, b.seq) for b in batches}


def settle_and_check_exactly_once(dsn: str, fleet: list[RecordingAgent]) -> int:
    """Wait until every batch produced so far is stored and receipted; check windows once.

    Returns how many batches were checked.
    """
    produced = [b for a in fleet for b in a.produced()]
    wanted = keys_of(produced)
    wait_for(lambda: wanted <= ledger_keys(dsn), timeout_s=WAIT_SECONDS, what="every batch")
    wait_for(
        lambda: not wanted & set().union(*(a.outbox_keys() for a in fleet)),
        timeout_s=WAIT_SECONDS,
        what="the receipts to empty the outboxes",
    )
    counts = stored_window_counts(dsn)
    windows = [(b.device, w.metric, w.start_ms, w.period_s) for b in produced for w in b.windows]
    assert len(windows) == len(set(windows)) > 0  # no agent restarts here: no split windows
    assert {w: counts[w] for w in windows} == dict.fromkeys(windows, 1)
    assert max(counts.values()) == 1, "a window is stored twice"
    return len(wanted)


def test_agent_batches_leave_the_outbox_when_the_worker_receipts_them(
    broker: Any, test_pki: Any, ingest_db: IngestDb, tmp_path: Path
) -> None:
    config = make_config(
        tmp_path, server=broker, dsn=ingest_db.ingest_dsn, client_id="rcpt-w1", group="rcpt1"
    )
    with running_worker(config) as runner, agents(broker, test_pki, tmp_path, 1) as fleet:
        (one,) = fleet
        wait_for(
            lambda: one.agent.publisher.stats.receipted >= 3,
            timeout_s=WAIT_SECONDS,
            what="three receipted batches",
        )
        checked = settle_and_check_exactly_once(ingest_db.owner_dsn, fleet)
        # What receipts cost is visible to operators (and bench/ingest.py reports it).
        assert runner.counter("millrace_ingest_receipts_published_total") >= 3
        assert runner.counter("millrace_ingest_receipt_seconds_total") > 0
    assert checked >= 3


def test_a_batch_already_in_the_ledger_is_receipted_again_by_a_restarted_worker(
    broker: Any, test_pki: Any, ingest_db: IngestDb, tmp_path: Path
) -> None:
    """An edge whose receipt was lost resends; the duplicate must be receipted, not ignored."""
    device = f"rcpt-dup-{uuid.uuid4().hex[:6]}"
    publisher = Publisher(broker, device)
    receipts: list[Receipt] = []
    arrived = threading.Condition()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        with arrived:
            receipts.append(Receipt.from_json(bytes(msg.payload)))
            arrived.notify_all()

    publisher.client.on_message = on_message
    publisher.client.subscribe(topics.receipt_topic(device), qos=1)
    batches = make_batches(device, batches=3, windows_per_batch=4, seed=5)
    boot = batches[0].boot_id

    def covered(seqs: set[int], among: int) -> bool:
        with arrived:
            got = receipts[among:]
        return all(any(r.boot_id == boot and r.covers(s) for r in got) for s in seqs)

    for client_id in ("rcpt-dup-a", "rcpt-dup-b"):  # the second is a fresh worker process
        config = make_config(
            tmp_path, server=broker, dsn=ingest_db.ingest_dsn, client_id=client_id, group=client_id
        )
        with running_worker(config):
            before = len(receipts)
            publisher.publish(batches)
            wait_for(
                lambda before=before: covered({b.seq for b in batches}, before),
                timeout_s=WAIT_SECONDS,
                what="receipts covering every batch",
            )
    assert len(ledger_keys(ingest_db.owner_dsn)) == 3
    assert all(r.device == device for r in receipts)
    publisher.close()


def _acked_fresh(agent: RecordingAgent) -> int:
    stats = agent.agent.publisher.stats
    return stats.acked - getattr(stats, "resent", 0)  # no resends before receipts


def _long_autosave(server: Any) -> None:
    """Restart `server` so it never autosaves during the test: a SIGKILL loses its queues."""
    server.stop()
    text = server.conf_path.read_text()
    lines = [
        "autosave_interval 86400" if line.startswith("autosave_interval") else line
        for line in text.splitlines()
    ]
    assert lines != text.splitlines(), "no autosave_interval in the broker config"
    server.conf_path.write_text("\n".join(lines) + "\n")
    server.start()


@pytest.mark.faults
def test_worker_and_broker_killed_before_autosave_lose_no_window_and_store_each_once(
    broker_factory: Any, test_pki: Any, ingest_db: IngestDb, tmp_path: Path
) -> None:
    """The issue's reproduction: batches PUBACKed into a dead worker's session, broker killed."""
    server = broker_factory()
    _long_autosave(server)
    path = write_config(
        tmp_path / "worker.toml",
        server=server,
        dsn=ingest_db.ingest_dsn,
        client_id="rcpt-kill",
        group="rcpt-kill",
    )
    worker = WorkerProcess(path, tmp_path / "worker.log")
    worker.mark()
    worker.start()
    try:
        worker.wait_subscribed()
        with agents(server, test_pki, tmp_path, 3) as fleet:
            wait_for(
                lambda: all(
                    len(keys_of(a.produced()) & ledger_keys(ingest_db.owner_dsn)) >= 2
                    for a in fleet
                ),
                timeout_s=WAIT_SECONDS,
                what="batches stored before the faults",
            )
            worker.kill()  # batches now queue in its session inside the broker, PUBACKed
            # First-time PUBACKs since the kill: acks minus resends (a resend is acked too).
            base = [_acked_fresh(a) for a in fleet]
            wait_for(
                lambda: all(_acked_fresh(a) >= n + 3 for a, n in zip(fleet, base, strict=True)),
                timeout_s=WAIT_SECONDS,
                what="batches PUBACKed while the worker is dead",
            )
            stored = ledger_keys(ingest_db.owner_dsn)
            for agent in fleet:
                unstored = keys_of(agent.produced()) - stored
                assert len(unstored) >= 3
                # PUBACKed by the broker is not stored: every such batch is still kept.
                assert unstored <= agent.outbox_keys()
            server.kill()  # SIGKILL, before any autosave: the session's queue is gone
            server.start()
            worker.mark()
            worker.start()
            worker.wait_subscribed()
            checked = settle_and_check_exactly_once(ingest_db.owner_dsn, fleet)
            assert checked >= 3 * 5
    finally:
        worker.close()


@pytest.mark.faults
def test_broker_restart_loses_nothing_without_the_no_subscribers_special_case(
    broker_factory: Any, test_pki: Any, ingest_db: IngestDb, tmp_path: Path
) -> None:
    """mosquitto 2.0.11 forgets shared subscriptions on restart; receipts alone cover it."""
    server = broker_factory()
    config = make_config(
        tmp_path, server=server, dsn=ingest_db.ingest_dsn, client_id="rcpt-ur", group="rcpt-ur"
    )
    with agents(server, test_pki, tmp_path, 2, extra="resend_unrouted = false") as fleet:
        with running_worker(config):
            wait_for(
                lambda: all(a.agent.publisher.stats.receipted >= 2 for a in fleet),
                timeout_s=WAIT_SECONDS,
                what="receipts before the restart",
            )
        server.restart()  # the worker is away and its shared subscription forgotten
        wait_for(
            lambda: all(a.agent.publisher.stats.unrouted >= 2 for a in fleet),
            timeout_s=WAIT_SECONDS,
            what="batches PUBACKed with no matching subscribers",
        )
        with running_worker(config):
            wait_for(
                lambda: all(a.agent.publisher.stats.resent >= 1 for a in fleet),
                timeout_s=WAIT_SECONDS,
                what="unreceipted batches sent again",
            )
            checked = settle_and_check_exactly_once(ingest_db.owner_dsn, fleet)
    assert checked >= 2 * 4


@pytest.mark.faults
def test_a_shared_group_member_that_dies_for_good_loses_nothing(
    broker_factory: Any, test_pki: Any, ingest_db: IngestDb, tmp_path: Path
) -> None:
    """The dead member's session keeps its share queued; the edges resend it to the living."""
    server = broker_factory()
    dead_path = write_config(
        tmp_path / "dead.toml",
        server=server,
        dsn=ingest_db.ingest_dsn,
        client_id="rcpt-dead",
        group="rcpt-pair",
    )
    dead = WorkerProcess(dead_path, tmp_path / "dead.log")
    dead.mark()
    dead.start()
    living = make_config(
        tmp_path, server=server, dsn=ingest_db.ingest_dsn, client_id="rcpt-live", group="rcpt-pair"
    )
    try:
        dead.wait_subscribed()
        with running_worker(living), agents(server, test_pki, tmp_path, 2) as fleet:
            wait_for(
                lambda: all(
                    len(keys_of(a.produced()) & ledger_keys(ingest_db.owner_dsn)) >= 2
                    for a in fleet
                ),
                timeout_s=WAIT_SECONDS,
                what="batches stored by the pair",
            )
            dead.kill()  # for good: its session (and its share of the batches) stays queued
            base = [_acked_fresh(a) for a in fleet]
            wait_for(
                lambda: all(_acked_fresh(a) >= n + 4 for a, n in zip(fleet, base, strict=True)),
                timeout_s=WAIT_SECONDS,
                what="batches PUBACKed after the death",
            )
            checked = settle_and_check_exactly_once(ingest_db.owner_dsn, fleet)
            assert sum(a.agent.publisher.stats.resent for a in fleet) >= 1
    finally:
        dead.close()
    assert checked >= 2 * 6


def test_a_batch_the_cloud_refuses_for_good_is_receipted_from_its_dead_letter(
    broker: Any, test_pki: Any, ingest_db: IngestDb, tmp_path: Path
) -> None:
    """Else the edge would resend it every 30-60 s for a week (a gateway with a wrong clock)."""
    device = f"rcpt-dl-{uuid.uuid4().hex[:6]}"
    publisher = Publisher(broker, device)
    receipts: list[Receipt] = []
    publisher.client.on_message = lambda _c, _u, msg: receipts.append(
        Receipt.from_json(bytes(msg.payload))
    )
    publisher.client.subscribe(topics.receipt_topic(device), qos=1)
    future_ms = aligned_now_ms(60) + 10 * 86_400_000
    (refused,) = make_batches(device, batches=1, windows_per_batch=2, end_ms=future_ms, seed=9)
    (good,) = make_batches(device, batches=1, windows_per_batch=2, seed=9, first_seq=1)
    good = dataclasses.replace(good, boot_id=refused.boot_id)
    config = make_config(
        tmp_path, server=broker, dsn=ingest_db.ingest_dsn, client_id="rcpt-dl", group="rcpt-dl"
    )
    with running_worker(config):
        publisher.publish([refused, good])
        wait_for(
            lambda: all(
                any(r.boot_id == refused.boot_id and r.covers(s) for r in list(receipts))
                for s in (0, 1)
            ),
            timeout_s=WAIT_SECONDS,
            what="receipts for the refused and the stored batch",
        )
    codes = query(ingest_db.owner_dsn, "SELECT code FROM dead_letters WHERE device = %s", [device])
    assert codes == [("in_future",)]
    assert ledger_keys(ingest_db.owner_dsn) == {(device, refused.boot_id, 1)}
    publisher.close()


TAKEOVER_SECONDS = 30.0


@pytest.mark.faults
def test_a_device_holding_the_workers_client_id_for_30s_loses_nothing(
    broker_factory: Any, test_pki: Any, ingest_db: IngestDb, tmp_path: Path
) -> None:
    """Where the broker still lets a client pick any id (not the production config, which
    binds the id to the certificate CN), a device takes over the worker's persistent
    session again and again for 30 s and acks what it is handed; receipts still carry
    every window to the database exactly once."""
    server = broker_factory()  # --any-clientid: the takeover is possible here
    worker_id = "rcpt-steal"
    config = make_config(
        tmp_path, server=server, dsn=ingest_db.ingest_dsn, client_id=worker_id, group="rcpt-st"
    )
    stolen: list[bytes] = []
    takeovers = 0
    with running_worker(config), agents(server, test_pki, tmp_path, 2) as fleet:
        wait_for(
            lambda: all(a.agent.publisher.stats.receipted >= 2 for a in fleet),
            timeout_s=WAIT_SECONDS,
            what="receipts before the takeover",
        )
        deadline = time.monotonic() + TAKEOVER_SECONDS
        while time.monotonic() < deadline:
            thief = None
            with contextlib.suppress(RuntimeError):
                thief = connect_client(
                    server,
                    worker_id,
                    "dev-a",
                    clean_start=False,
                    on_message=lambda _c, _u, msg: stolen.append(bytes(msg.payload)),
                )
                takeovers += 1
            time.sleep(2.0)  # hold the session until the worker takes it back
            if thief is not None:
                with contextlib.suppress(Exception):
                    thief.disconnect()
                thief.loop_stop()
        checked = settle_and_check_exactly_once(ingest_db.owner_dsn, fleet)
        resent = sum(a.agent.publisher.stats.resent for a in fleet)
    assert takeovers >= 5
    assert stolen, "the device never held the worker's session: the test proves nothing"
    assert resent >= 1  # the stolen batches came back from the outboxes
    assert checked >= 2 * 6
