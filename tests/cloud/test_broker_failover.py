"""Broker failover: two brokers with one authorization, gateways on both, a worker on both.

Real mosquitto brokers built by `millrace broker config` from one PKI (so one
authorization), real TimescaleDB, a real ingest worker subscribed to both brokers,
and real edge agents that know both (`[broker] hosts`). Ground truth is every batch
an agent wrote to its outbox; after each fault the database must hold each of their
windows exactly once (0 lost, 0 doubled) and the outboxes must be empty.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from millrace import topics
from millrace.cloud.config import IngestConfig
from millrace.edge.brokers import preferred_index
from millrace.wire import Receipt
from tests.cloud.ingest_support import (
    IngestDb,
    Publisher,
    make_batches,
    make_config,
    prepare_database,
    running_worker,
)
from tests.cloud.ingest_support import wait_for as _wait_for
from tests.cloud.test_receipts import RecordingAgent, settle_and_check_exactly_once
from tests.edge.agent_helpers import SIM_SIGNALS

WAIT_SECONDS = 90.0
# Short so the tests see resends and failbacks; production's defaults are 30 s and 60 s.
RECEIPT_WAIT_SECONDS = 1.0
FAILBACK_SECONDS = 1.0
AGENTS_PER_BROKER = 2


@pytest.fixture
def ingest_db(fresh_db: str) -> IngestDb:
    return prepare_database(fresh_db)


def wait_for(predicate: Any, what: str) -> None:
    _wait_for(predicate, timeout_s=WAIT_SECONDS, what=what)


def endpoint(server: Any) -> str:
    return f"{server.host}:{server.port}"


def worker_config(tmp_path: Path, servers: list[Any], dsn: str, name: str) -> IngestConfig:
    """A worker of group `name` subscribed to every server in `servers`."""
    config = make_config(tmp_path, server=servers[0], dsn=dsn, client_id=name, group=name)
    hosts = tuple((s.host, s.port) for s in servers)
    return dataclasses.replace(config, broker=dataclasses.replace(config.broker, hosts=hosts))


def device_names(count_per_broker: int, brokers: int) -> list[str]:
    """Device ids whose preferred broker (crc32 spread) covers each broker equally."""
    wanted = {i: count_per_broker for i in range(brokers)}
    names: list[str] = []
    while any(wanted.values()):
        name = f"fo-{uuid.uuid4().hex[:8]}"
        index = preferred_index(name, brokers, spread=True)
        if wanted[index]:
            wanted[index] -= 1
            names.append(name)
    return names


def write_agent_config(path: Path, servers: list[Any], device: str) -> Path:
    cert, key = servers[0].pki.files(device)
    hosts = ", ".join(f'"{endpoint(s)}"' for s in servers)
    path.write_text(
        f"""
device_id = "{device}"
[broker]
hosts = [{hosts}]
ca = "{servers[0].ca}"
cert = "{cert}"
key = "{key}"
keepalive_s = 5
reconnect_min_s = 0.2
reconnect_max_s = 1.0
receipt_wait_s = {RECEIPT_WAIT_SECONDS}
failback_s = {FAILBACK_SECONDS}
[windows]
period_s = 1
grace_s = 0.2
[outbox]
path = "{path.parent / "outbox.sqlite"}"
[heartbeat]
interval_s = 1.0
[state]
dir = "{path.parent / "state"}"
{SIM_SIGNALS}
"""
    )
    return path


@contextlib.contextmanager
def fleet(servers: list[Any], test_pki: Any, tmp_path: Path) -> Iterator[list[RecordingAgent]]:
    started: list[RecordingAgent] = []
    try:
        for device in device_names(AGENTS_PER_BROKER, len(servers)):
            test_pki.issue(device)
            workdir = tmp_path / device
            workdir.mkdir()
            config = write_agent_config(workdir / "edge.toml", servers, device)
            started.append(RecordingAgent(config).start())
        yield started
    finally:
        for agent in started:
            agent.stop()


def on(agent: RecordingAgent, server: Any) -> bool:
    publisher = agent.agent.publisher
    return publisher.connected and publisher.broker == endpoint(server)


def receipted(agent: RecordingAgent) -> int:
    return agent.agent.publisher.stats.receipted_own


def test_a_receipt_goes_back_only_through_the_broker_that_carried_the_batch(
    broker_factory: Any, ingest_db: IngestDb, tmp_path: Path
) -> None:
    a, b = broker_factory(), broker_factory()
    config = worker_config(tmp_path, [a, b], ingest_db.ingest_dsn, "fo-route")
    device = f"fo-route-{uuid.uuid4().hex[:6]}"
    first, second = make_batches(device, batches=2, windows_per_batch=3, seed=19)
    got: dict[str, list[Receipt]] = {"a": [], "b": []}
    lock = threading.Lock()
    pubs = {name: Publisher(server, device) for name, server in (("a", a), ("b", b))}
    for name, pub in pubs.items():

        def on_message(_c: Any, _u: Any, msg: Any, name: str = name) -> None:
            with lock:
                got[name].append(Receipt.from_json(bytes(msg.payload)))

        pub.client.on_message = on_message
        pub.client.subscribe(topics.receipt_topic(device), qos=1)

    def covered(name: str, seq: int) -> bool:
        with lock:
            return any(r.covers(seq) for r in got[name])

    try:
        with running_worker(config):
            pubs["a"].publish([first])
            wait_for(lambda: covered("a", first.seq), "the receipt of the batch a carried")
            pubs["b"].publish([second])
            wait_for(lambda: covered("b", second.seq), "the receipt of the batch b carried")
    finally:
        for pub in pubs.values():
            pub.close()
    # In order on one broker: a receipt of the first batch on b would have come before.
    with lock:
        assert not any(r.covers(first.seq) and not r.covers(second.seq) for r in got["b"])
        assert not any(r.covers(second.seq) for r in got["a"])


@pytest.mark.faults
def test_gateways_move_to_the_surviving_broker_on_sigkill_and_spread_again_when_it_returns(
    broker_factory: Any, test_pki: Any, ingest_db: IngestDb, tmp_path: Path
) -> None:
    a, b = broker_factory(), broker_factory()
    config = worker_config(tmp_path, [a, b], ingest_db.ingest_dsn, "fo-kill")
    with running_worker(config), fleet([a, b], test_pki, tmp_path) as agents:
        wait_for(lambda: all(receipted(x) >= 2 for x in agents), "receipts on both brokers")
        on_a = [x for x in agents if on(x, a)]
        on_b = [x for x in agents if on(x, b)]
        assert len(on_a) == len(on_b) == AGENTS_PER_BROKER, "the fleet is not spread"

        before = {id(x): receipted(x) for x in on_b}
        killed = time.monotonic()
        b.kill()
        wait_for(lambda: all(on(x, a) for x in on_b), "the gateways of b to connect to a")
        moved_s = time.monotonic() - killed
        wait_for(lambda: all(receipted(x) > before[id(x)] for x in on_b), "receipts through a only")
        receipted_s = time.monotonic() - killed
        print(
            f"\nbroker SIGKILL: gateways on a after {moved_s:.2f} s, receipted {receipted_s:.2f} s"
        )
        assert all(on(x, a) for x in on_a), "a gateway of a moved"

        b.start()
        restarted = time.monotonic()
        wait_for(lambda: all(on(x, b) for x in on_b), "the gateways of b to move back")
        back_s = time.monotonic() - restarted
        again = {id(x): receipted(x) for x in on_b}
        wait_for(lambda: all(receipted(x) > again[id(x)] for x in on_b), "receipts through b")
        print(f"broker back: gateways on b again after {back_s:.2f} s")
        assert all(on(x, a) for x in on_a) and all(on(x, b) for x in on_b), "not spread again"
        assert all(x.agent.publisher.stats.failbacks == 1 for x in on_b)
        checked = settle_and_check_exactly_once(ingest_db.owner_dsn, agents)
    print(f"reconciled {checked} batches: 0 lost, 0 doubled")
