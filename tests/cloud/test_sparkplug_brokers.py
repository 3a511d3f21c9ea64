"""The Sparkplug host on several brokers, and its memory bound while the database is down.

Two real mosquitto brokers of one PKI (project TLS + roles), nodes as raw paho clients with
their own certificates, the host in-process, real TimescaleDB read back with the
dashboards' queries (helpers of test_sparkplug_e2e)."""

from __future__ import annotations

import dataclasses
import json
import queue
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from millrace.cloud.sparkplug.host import Host
from millrace.cloud.sparkplug.schema import Payload
from tests.cloud.ingest_support import IngestDb, ingest_db, wait_for  # noqa: F401
from tests.cloud.test_sparkplug_e2e import (
    GROUP,
    WAIT_S,
    aligned_past_s,
    dead_letters,
    host_config,
    pb,
    running_host,
    status_of,
    window,
)
from tests.fixtures.fix_broker import MosquittoServer, PKIFixture, connect_client

pytestmark = pytest.mark.integration


def birth(bd_seq: int) -> bytes:
    return pb(0, [{"name": "bdSeq", "datatype": 4, "long_value": bd_seq},
                  {"name": "temp", "alias": 1, "datatype": 10, "double_value": 1.0}])  # fmt: skip


def data(seq: int, value: float, ts: int) -> bytes:
    return pb(seq, [{"alias": 1, "double_value": value, "timestamp": ts}])


def death(bd_seq: int) -> bytes:
    return pb(None, [{"name": "bdSeq", "datatype": 4, "long_value": bd_seq}])


class Node:
    """A Sparkplug edge node on one broker: publishes as itself, records its NCMDs."""

    def __init__(self, server: MosquittoServer, node: str) -> None:
        self.node, self.ncmds = node, queue.Queue[list[str]]()
        self.client = connect_client(server, node, node, on_message=self._on_message)
        self.client.subscribe(f"spBv1.0/{GROUP}/NCMD/{node}", qos=1)  # before its PUBLISHes

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        p = Payload()
        p.ParseFromString(bytes(msg.payload))
        self.ncmds.put([m.name for m in p.metrics])

    def send(self, kind: str, payload: bytes) -> None:
        info = self.client.publish(f"spBv1.0/{GROUP}/{kind}/{self.node}", payload, qos=1)
        info.wait_for_publish(WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained_state(server: MosquittoServer, host_id: str) -> dict[str, Any]:
    got: queue.Queue[dict[str, Any]] = queue.Queue()
    watcher = connect_client(
        server,
        f"svc-watch-{uuid.uuid4().hex[:6]}",
        "svc-test",
        on_message=lambda _c, _u, m: got.put(json.loads(m.payload)),
    )
    try:
        watcher.subscribe(f"spBv1.0/STATE/{host_id}", qos=1)
        return got.get(timeout=WAIT_S)
    finally:
        watcher.disconnect()
        watcher.loop_stop()


def test_host_on_two_brokers_states_on_each_rebirths_through_the_carrier_and_a_moved_node(
    broker_factory: Any,
    test_pki: PKIFixture,
    ingest_db: IngestDb,  # noqa: F811
) -> None:
    a, b = broker_factory(), broker_factory()
    names = {s: f"spm-{uuid.uuid4().hex[:6]}" for s in ("a", "b")}
    for name in names.values():
        test_pki.issue(name)
    config = host_config(a, test_pki, ingest_db.ingest_dsn)
    config = dataclasses.replace(
        config,
        broker=dataclasses.replace(config.broker, hosts=((a.host, a.port), (b.host, b.port))),
    )
    dsn = ingest_db.owner_dsn
    t = aligned_past_s(120)
    with running_host(config) as host:
        for server in (a, b):
            assert retained_state(server, "svc-test")["online"] is True
        on_a, on_b = Node(a, names["a"]), Node(b, names["b"])
        moved: Node | None = None
        try:
            for node in (on_a, on_b):
                node.send("NBIRTH", birth(0))
                node.send("NDATA", data(1, 2.0, t + 10))
            # A gap on b: the rebirth goes to b's node through b, none to a's node.
            on_b.send("NDATA", data(3, 9.0, t + 20))
            assert on_b.ncmds.get(timeout=WAIT_S) == ["Node Control/Rebirth"]
            wait_for(lambda: window(dsn, f"{GROUP}.{names['a']}", "temp", t) != [], what="a")
            assert window(dsn, f"{GROUP}.{names['a']}", "temp", t) == [(2.0, 2.0, 2.0, 1)]
            wait_for(lambda: window(dsn, f"{GROUP}.{names['b']}", "temp", t) != [], what="b")
            assert window(dsn, f"{GROUP}.{names['b']}", "temp", t) == [(2.0, 2.0, 2.0, 1)]
            assert on_a.ncmds.empty()

            # a's node moves to b: data before its new birth is not its b session.
            on_a.close()
            moved = Node(b, names["a"])
            moved.send("NDATA", data(2, 5.0, t + 30))
            assert moved.ncmds.get(timeout=WAIT_S) == ["Node Control/Rebirth"]
            moved.send("NBIRTH", birth(1))
            moved.send("NDATA", data(1, 4.0, t + 40))
            # The old connection's will arrives late through a: its bdSeq is not the birth's.
            late = Node(a, names["a"])
            late.send("NDEATH", death(0))
            late.close()
            wait_for(lambda: host.counters.refused.get("stale_death") == 1, what="stale will")
            wait_for(
                lambda: window(dsn, f"{GROUP}.{names['a']}", "temp", t) == [(3.0, 2.0, 4.0, 2)],
                what="the moved node's reading merged into its window",
            )
            assert status_of(dsn, f"{GROUP}.{names['a']}") == "online"
            letters = dead_letters(dsn)
            assert letters.get("other_broker") == 1 and letters.get("seq_gap") == 1, letters
        finally:
            on_b.close()
            if moved is not None:
                moved.close()


def test_past_max_pending_data_is_dropped_unjudged_births_still_judged_and_the_gap_shows(
    broker: MosquittoServer,
    test_pki: PKIFixture,
    ingest_db: IngestDb,  # noqa: F811
) -> None:
    good = dataclasses.replace(host_config(broker, test_pki, ingest_db.ingest_dsn), max_pending=4)
    host = Host(dataclasses.replace(good, dsn="postgresql://nobody@127.0.0.1:1/none"))
    t = aligned_past_s(60)
    at = datetime.now(UTC)
    node = f"spBv1.0/{GROUP}/{{}}/spcap"
    host.judge(node.format("NBIRTH"), birth(0), at)  # 2 pending: online, the birth's value
    host.judge(node.format("NDATA"), data(1, 4.0, t), at)
    host.judge(node.format("NDATA"), data(2, 8.0, t + 1), at)  # 4 pending: the cap
    assert not host.flush()  # the database is down
    host.judge(node.format("NDATA"), data(3, 100.0, t + 2), at)
    assert host.counters.dropped == 1
    other = f"spBv1.0/{GROUP}/{{}}/spcap2"
    host.judge(other.format("NBIRTH"), birth(0), at)  # sessions open whatever the backlog
    host.config = good
    assert host.flush(everything=True)
    dsn = ingest_db.owner_dsn
    assert window(dsn, f"{GROUP}.spcap", "temp", t) == [(6.0, 4.0, 8.0, 2)]
    assert status_of(dsn, f"{GROUP}.spcap2") == "online"
    # Stored: the cap frees; the dropped message shows as the next message's gap.
    host.judge(node.format("NDATA"), data(4, 1.0, t + 3), at)
    assert host.counters.refused.get("seq_gap") == 1 and host.counters.rebirths_asked == 1
    assert host.flush()
    assert dead_letters(dsn).get("seq_gap") == 1
