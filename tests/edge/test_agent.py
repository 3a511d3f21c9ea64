"""The agent against the real TLS broker: batches, birth/will, heartbeat, commands, SIGTERM."""

from __future__ import annotations

import signal
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from millrace.edge.batching import SeqCounter, build_batches
from millrace.edge.outbox import Outbox
from millrace.topics import cmd_topic
from millrace.wire import (
    CONTENT_TYPE_JSON,
    CONTENT_TYPE_MSGPACK,
    Batch,
    Command,
    Window,
    decode_batch,
)
from tests.edge.agent_helpers import (
    SIM_SIGNALS,
    AgentProcess,
    Collector,
    agent_thread,
    write_config,
)

pytestmark = pytest.mark.integration


def device_for(test_pki: Any, name: str) -> str:
    device = f"edge-{name}-{uuid.uuid4().hex[:6]}"
    test_pki.issue(device)
    return device


def test_agent_publishes_contiguous_windows_birth_and_heartbeat(
    broker: Any, test_pki: Any, mqtt_connect: Any, tmp_path: Path
) -> None:
    device = device_for(test_pki, "basic")
    collector = Collector(device)
    collector.attach(mqtt_connect, broker, f"svc-{device}")
    config = write_config(tmp_path / "edge.toml", server=broker, device=device, signals=SIM_SIGNALS)
    with agent_thread(config) as agent:
        collector.wait(lambda c: len(c.of("/data")) >= 3, 15, "three batches")
        collector.wait(lambda c: len(c.of("/health")) >= 1, 10, "a heartbeat")
        boot_id = agent.boot_id
    collector.wait(lambda c: c.states()[-1].status == "offline", 10, "the offline state")

    data = collector.of("/data")
    assert {m.content_type for m in data} == {CONTENT_TYPE_MSGPACK}
    batches = collector.batches()
    assert {b.boot_id for b in batches} == {boot_id}
    assert [b.seq for b in batches] == list(range(len(batches)))
    starts = sorted(w.start_ms for b in batches for w in b.windows if w.period_s == 1)
    assert starts == list(range(starts[0], starts[-1] + 1000, 1000)), "a window is missing"
    assert all(w.count >= 1 and w.metric == "sim.temp" for b in batches for w in b.windows)

    states = collector.states()
    assert states[0].status == "online" and states[0].boot_id == boot_id
    assert states[0].config_hash and states[0].agent_version
    assert all(m.content_type == CONTENT_TYPE_JSON for m in collector.of("/state"))
    beat = collector.heartbeats()[0]
    assert beat.boot_id == boot_id and beat.rss_bytes > 0 and beat.disk_free_bytes > 0
    assert beat.cert_days_left > 300 and beat.dropped_batches == 0
    with sqlite3.connect(tmp_path / "outbox.sqlite") as db:
        assert db.execute("SELECT count(*) FROM batches").fetchone()[0] == 0


def test_birth_is_retained_and_the_will_is_set(
    broker: Any, test_pki: Any, mqtt_connect: Any, tmp_path: Path
) -> None:
    device = device_for(test_pki, "retained")
    config = write_config(tmp_path / "edge.toml", server=broker, device=device, signals=SIM_SIGNALS)
    proc = AgentProcess(config)
    proc.start()
    try:
        early = Collector(device)
        early.attach(mqtt_connect, broker, f"svc-early-{device}")
        early.wait(lambda c: bool(c.of("/data")), 15, "data")
        late = Collector(device)  # subscribes after the birth: gets it retained
        late.attach(mqtt_connect, broker, f"svc-late-{device}")
        late.wait(lambda c: bool(c.of("/state")), 10, "the retained birth")
        first = late.of("/state")[0]
        assert first.retain and late.states()[0].status == "online"
        assert late.states()[0].units == {"sim.temp": "degC"}  # the cloud labels charts with it
        proc.kill9()  # no clean goodbye: the broker publishes the will
        late.wait(lambda c: c.states()[-1].status == "offline", 60, "the last will after kill -9")
    finally:
        proc.stop()


def test_json_encoding_is_announced_by_content_type(
    broker: Any, test_pki: Any, mqtt_connect: Any, tmp_path: Path
) -> None:
    device = device_for(test_pki, "json")
    collector = Collector(device)
    collector.attach(mqtt_connect, broker, f"svc-{device}")
    config = write_config(
        tmp_path / "edge.toml",
        server=broker,
        device=device,
        signals=SIM_SIGNALS,
        broker_extra='encoding = "json"',
    )
    with agent_thread(config):
        collector.wait(lambda c: bool(c.of("/data")), 15, "a batch")
    message = collector.of("/data")[0]
    assert message.content_type == CONTENT_TYPE_JSON and message.payload.startswith(b"{")
    assert collector.batches()[0].windows


def send(client: Any, device: str, name: str, id_: str, **args: Any) -> None:
    payload = Command(id=id_, name=name, args=args).to_json()
    client.publish(cmd_topic(device, name), payload, qos=1).wait_for_publish(5)


def test_commands_ping_set_flush_rebirth_idempotent(
    broker: Any, test_pki: Any, mqtt_connect: Any, tmp_path: Path
) -> None:
    device = device_for(test_pki, "cmd")
    collector = Collector(device)
    client = collector.attach(mqtt_connect, broker, f"svc-{device}")
    config = write_config(tmp_path / "edge.toml", server=broker, device=device, signals=SIM_SIGNALS)
    with agent_thread(config) as agent:
        collector.wait(lambda c: bool(c.of("/data")), 15, "first batch")
        send(client, device, "ping", "p-1")
        collector.wait(lambda c: any(r.id == "p-1" for r in c.replies()), 10, "pong")
        pong = next(r for r in collector.replies() if r.id == "p-1")
        assert pong.ok and pong.result["boot_id"] == agent.boot_id

        send(client, device, "set", "s-1", period_s=2)
        send(client, device, "set", "s-1", period_s=2)  # a retry of the same command
        send(client, device, "set", "s-2", metric="sim.temp", poll_s=0.5)
        send(client, device, "set", "s-3", period_s=0)
        collector.wait(lambda c: {"s-2", "s-3"} <= {r.id for r in c.replies()}, 10, "set replies")
        replies = [r for r in collector.replies() if r.id == "s-1"]
        assert [(r.ok, r.duplicate) for r in replies] == [(True, False), (True, True)]
        bad = next(r for r in collector.replies() if r.id == "s-3")
        assert not bad.ok and "period_s" in bad.error
        collector.wait(
            lambda c: any(w.period_s == 2 for b in c.batches() for w in b.windows),
            15,
            "a 2 s window",
        )
        two_s = [w for b in collector.batches() for w in b.windows if w.period_s == 2]
        assert all(w.start_ms % 2000 == 0 for w in two_s)
        # At 0.5 s polling a full 2 s window holds 4 readings.
        collector.wait(
            lambda c: any(w.period_s == 2 and w.count == 4 for b in c.batches() for w in b.windows),
            15,
            "a window polled at 0.5 s",
        )
        assert agent.config.windows.period_s == 2

        births = len(collector.of("/state"))
        send(client, device, "rebirth", "r-1")
        send(client, device, "flush", "f-1")
        collector.wait(lambda c: len(c.of("/state")) > births, 10, "a rebirth")
        collector.wait(lambda c: any(r.id == "f-1" and r.ok for r in c.replies()), 10, "flush")
    saved = (tmp_path / "state" / "state.json").read_text()
    assert '"period_s":2' in saved and '"sim.temp":0.5' in saved

    # The settings survive a restart.
    with agent_thread(config) as agent:
        assert agent.config.windows.period_s == 2
        assert agent.config.signals[0].poll_s == 0.5


def test_sigterm_closes_open_windows_into_the_outbox_and_publishes_them(
    broker: Any, test_pki: Any, mqtt_connect: Any, tmp_path: Path
) -> None:
    device = device_for(test_pki, "term")
    collector = Collector(device)
    collector.attach(mqtt_connect, broker, f"svc-{device}")
    # A 1 h window never closes on its own during this test.
    config = write_config(
        tmp_path / "edge.toml",
        server=broker,
        device=device,
        signals=SIM_SIGNALS,
        period_s=3600,
        grace_s=1,
    )
    proc = AgentProcess(config)
    proc.start()
    try:
        collector.wait(lambda c: bool(c.of("/state")), 15, "birth")
        time.sleep(1.5)
        assert not collector.of("/data")
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.stop()
    collector.wait(lambda c: bool(c.of("/data")), 10, "the closed partial window")
    (batch,) = collector.batches()
    (window,) = batch.windows
    assert window.period_s == 3600 and window.count >= 10
    assert collector.states()[-1].status == "offline"
    log = proc.log()
    assert "closed open windows" in log and "Traceback" not in log
    with sqlite3.connect(tmp_path / "outbox.sqlite") as db:
        assert db.execute("SELECT count(*) FROM batches").fetchone()[0] == 0


def test_backlog_drains_oldest_first_at_a_bounded_rate_without_starving_live_data(
    broker: Any, test_pki: Any, mqtt_connect: Any, tmp_path: Path
) -> None:
    device = device_for(test_pki, "drain")
    collector = Collector(device)
    collector.attach(mqtt_connect, broker, f"svc-{device}")
    config = write_config(
        tmp_path / "edge.toml",
        server=broker,
        device=device,
        signals=SIM_SIGNALS,
        broker_extra="backlog_batches_per_s = 5.0",
    )
    # A previous run left 30 batches behind.
    old_boot, backlog = "f" * 32, 30
    box = Outbox(tmp_path / "outbox.sqlite", max_bytes=10**7, max_age_s=3600)
    seqs = SeqCounter()
    start = (int(time.time()) - 3600) * 1000
    for i in range(backlog):
        window = Window("sim.temp", start + i * 1000, 1, 1, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
        items = build_batches(
            device=device,
            boot_id=old_boot,
            seqs=seqs,
            sent_at_ms=start,
            windows=[window],
            events=[],
            rejected=0,
            dropped=0,
            clock_synced=True,
        )
        box.append(old_boot, items, encoding="msgpack")
    box.close()
    with agent_thread(config) as agent:
        collector.wait(
            lambda c: {b.seq for b in c.batches() if b.boot_id == old_boot} == set(range(backlog)),
            30,
            "the backlog",
        )
        boot_id = agent.boot_id
    order: list[tuple[str, int]] = []
    arrived: dict[int, float] = {}
    for message in collector.of("/data"):
        batch = decode_batch(message.payload, content_type=message.content_type)
        assert isinstance(batch, Batch)
        if (batch.boot_id, batch.seq) not in order:
            order.append((batch.boot_id, batch.seq))
            if batch.boot_id == old_boot:
                arrived[batch.seq] = message.at
    old = [seq for boot, seq in order if boot == old_boot]
    assert old == list(range(backlog)), "backlog not drained oldest first"
    # Live batches went out while the backlog was still draining.
    first_live = next(i for i, (boot, _) in enumerate(order) if boot == boot_id)
    assert first_live < order.index((old_boot, backlog - 1))
    # 5 batches/s with a burst of 5: 30 batches cannot drain in under 5 s.
    assert arrived[backlog - 1] - arrived[0] >= (backlog - 5) / 5.0 - 0.5
