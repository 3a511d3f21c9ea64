"""Sparkplug B end to end: pysparkplug (an independent implementation, in its own venv) as
an edge node with a device, through the real broker (project TLS + roles) into the host
application and TimescaleDB, read back with the dashboards' queries; the broker's roles for
Sparkplug topics."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pandas as pd
import psycopg
import pytest
from sqlalchemy import Connection, create_engine
from sqlalchemy.pool import NullPool

from millrace.cloud.alerts.rules import AlertRule, add_rule
from millrace.cloud.sparkplug.config import SparkplugConfig
from millrace.cloud.sparkplug.host import Host
from millrace.cloud.sparkplug.schema import Payload
from millrace.cloud.sparkplug.sessions import Bounds
from millrace.configfile import BrokerConnection
from millrace.dashboards import queries
from millrace.dashboards.resolution import Resolution
from tests.cloud.ingest_support import IngestDb, ingest_db, wait_for  # noqa: F401
from tests.fixtures.fix_broker import MosquittoServer, PKIFixture
from tests.millrace.test_broker_acl import NOT_AUTHORIZED, Acks

SPB_PYTHON = Path(sys.prefix) / "pysparkplug" / "bin" / "python"
GROUP, NODE, DEVICE = "plant", "spnode1", "pump1"
NODE_ID, DEVICE_ID = f"{GROUP}.{NODE}", f"{GROUP}.{NODE}.{DEVICE}"
HOSTILE = "spnode2"
WAIT_S = 60.0

# The edge node: pysparkplug driven by JSON lines on stdin, reporting on stdout.
NODE_SCRIPT = r"""
import json, sys
import pysparkplug as spb
T = spb.DataType
host, port, ca, cert, key, group, node, device = sys.argv[1:9]
def say(**kw):
    print(json.dumps(kw), flush=True)
def on_ncmd(_node, message):
    say(ncmd=[m.name for m in message.payload.metrics])
tls = spb.TLSConfig(ca_certs=ca, certfile=cert, keyfile=key)
client = spb.Client(client_id=node, transport_config=tls)
now = spb.get_current_timestamp()
supply = spb.Metric(timestamp=now, name="Supply/Voltage", datatype=T.DOUBLE, value=230.0)
edge = spb.EdgeNode(group, node, [supply], client=client, cmd_callback=on_ncmd)
kinds = {"Flow": T.DOUBLE, "Running": T.BOOLEAN, "Mode": T.STRING}
start = {"Flow": 0.0, "Running": False, "Mode": "off"}
born = [spb.Metric(timestamp=now, name=n, datatype=t, value=start[n], alias=i)
        for i, (n, t) in enumerate(kinds.items())]
edge.register(spb.Device(device, born))
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    if op == "connect":
        edge.connect(host, port=port and int(port), blocking=False)
    elif op == "ddata":
        edge.update_device(device, [spb.Metric(timestamp=ts, name=n, datatype=kinds[n], value=v)
                                    for n, v, ts in cmd["metrics"]])
    elif op == "ndata":
        edge.update([spb.Metric(timestamp=ts, name=n, datatype=T.DOUBLE, value=v)
                     for n, v, ts in cmd["metrics"]])
    elif op == "skip_seq":
        next(edge._EdgeNode__seq_cycler)
    elif op == "reconnect":
        edge.disconnect()
        edge.connect(host, port=int(port), blocking=False)
    elif op == "deregister":
        edge.deregister(device)
    say(done=op)
"""


class EdgeNodeProcess:
    """The pysparkplug edge node in its own process; `send` waits for it to act."""

    def __init__(self, broker: MosquittoServer, cert: Path, key: Path) -> None:
        if not SPB_PYTHON.exists():
            pytest.fail(f"{SPB_PYTHON} missing: run make setup (scripts/bootstrap makes it)")
        self.proc = subprocess.Popen(
            [
                str(SPB_PYTHON),
                "-c",
                NODE_SCRIPT,
                broker.host,
                str(broker.port),
                str(broker.ca),
                str(cert),
                str(key),
                GROUP,
                NODE,
                DEVICE,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.ncmds: list[list[str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            message = json.loads(line)
            if "ncmd" in message:
                self.ncmds.append(message["ncmd"])
            else:
                self.lines.put(message)

    def send(self, op: str, **kw: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        assert self.lines.get(timeout=WAIT_S) == {"done": op}

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=WAIT_S)


@contextlib.contextmanager
def running_host(config: SparkplugConfig) -> Iterator[Host]:
    host = Host(config)
    thread = threading.Thread(target=host.run, daemon=True)
    thread.start()
    try:
        assert host.ready.wait(WAIT_S), "the host never came online"
        yield host
    finally:
        host.request_stop()
        thread.join(WAIT_S)


def host_config(broker: MosquittoServer, test_pki: PKIFixture, dsn: str) -> SparkplugConfig:
    cert, key = test_pki.files("svc-test")
    return SparkplugConfig(
        dsn=dsn,
        broker=BrokerConnection(
            host=broker.host, port=broker.port, ca=broker.ca, cert=cert, key=key
        ),
        host_id="svc-test",
        groups=(GROUP,),
        periods_s=(1,),
        grace_ms=300,
        flush_ms=100,
        rebirth_interval_s=0.0,
        bounds=Bounds(max_payload_bytes=4096, max_metrics=50),
    )


def dashboard(dsn: str) -> Connection:
    engine = create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(dsn), poolclass=NullPool
    )
    return engine.connect()


def status_of(dsn: str, device: str) -> str | None:
    with dashboard(dsn) as conn:
        fleet = queries.fleet(conn, stale_after_s=3600).set_index("device")
    return str(fleet.loc[device, "status"]) if device in fleet.index else None


def window(dsn: str, device: str, metric: str, start_ms: int) -> list[tuple[Any, ...]]:
    start = datetime.fromtimestamp(start_ms / 1000, UTC)
    with dashboard(dsn) as conn:
        frame = queries.series(
            conn,
            device=device,
            metric=metric,
            resolution=Resolution("windows", 1, 1),
            start=start,
            end=start + timedelta(seconds=1),
        )
    return [(r.mean, r.min, r.max, r.count) for r in frame.itertuples()]


def dead_letters(dsn: str) -> dict[str, int]:
    now = datetime.now(UTC)
    with dashboard(dsn) as conn:
        frame = queries.dead_letter_counts(conn, start=now - timedelta(hours=1), end=now)
    return {str(r.code): int(r.count) for r in frame.itertuples()}


def reasons(dsn: str, code: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [
            r[0] for r in conn.execute("SELECT reason FROM dead_letters WHERE code = %s", (code,))
        ]


def pb(seq: int | None, metrics: list[dict[str, Any]]) -> bytes:
    p = Payload()
    p.timestamp = int(time.time() * 1000)
    if seq is not None:
        p.seq = seq
    for spec in metrics:
        m = p.metrics.add()
        for k, v in spec.items():
            setattr(m, k, v)
    return p.SerializeToString()


def hostile_birth() -> bytes:
    return pb(0, [{"name": "bdSeq", "datatype": 4, "long_value": 0},
                  {"name": "temp", "alias": 1, "datatype": 10, "double_value": 1.0}])  # fmt: skip


def aligned_past_s(seconds_ago: int) -> int:
    now = int(time.time() * 1000)
    return now - now % 1000 - seconds_ago * 1000


pytestmark = pytest.mark.integration


@pytest.mark.e2e
def test_pysparkplug_node_births_data_gap_rebirth_reconnect_hostile_and_deaths(
    broker: MosquittoServer,
    test_pki: PKIFixture,
    ingest_db: IngestDb,  # noqa: F811
    mqtt_connect: Callable[..., paho.Client],
) -> None:
    cert, key = test_pki.issue(NODE)
    test_pki.issue(HOSTILE)
    dsn = ingest_db.owner_dsn
    with running_host(host_config(broker, test_pki, ingest_db.ingest_dsn)) as host:
        # Past windows, before the node's births (whose values carry the births' times).
        base = aligned_past_s(120)
        node = EdgeNodeProcess(broker, cert, key)
        try:
            node.send("connect")
            wait_for(lambda: status_of(dsn, DEVICE_ID) == "online", what="DBIRTH online")
            assert status_of(dsn, NODE_ID) == "online"

            # Data at known times in a past window: the dashboards' numbers, exactly.
            t0 = base + 0 * 10_000
            flows = [(1.25, t0 + 100), (3.5, t0 + 200), (-0.75, t0 + 300)]
            node.send("ddata", metrics=[["Flow", v, ts] for v, ts in flows])
            node.send("ddata", metrics=[["Running", True, t0 + 150], ["Mode", "auto", t0 + 160]])
            node.send("ndata", metrics=[["Supply/Voltage", 229.5, t0 + 500]])
            wait_for(lambda: window(dsn, DEVICE_ID, "Flow", t0) != [], what="Flow window")
            assert window(dsn, DEVICE_ID, "Flow", t0) == [(4.0 / 3, -0.75, 3.5, 3)]
            wait_for(lambda: window(dsn, NODE_ID, "Supply.Voltage", t0) != [], what="node window")
            assert window(dsn, NODE_ID, "Supply.Voltage", t0) == [(229.5, 229.5, 229.5, 1)]
            start = datetime.fromtimestamp(t0 / 1000, UTC)
            with dashboard(dsn) as conn:
                events = queries.device_events(
                    conn, device=DEVICE_ID, start=start, end=start + timedelta(seconds=1)
                )
            got = sorted(
                (e.metric, e.kind, *(None if pd.isna(x) else x for x in (e.value, e.text)))
                for e in events.itertuples()
            )
            assert got == [("Mode", "text", None, "auto"), ("Running", "bool", 1.0, None)]

            # A gap: the host dead-letters it, counts it, and asks the node for a rebirth.
            t1 = base + 1 * 10_000
            node.send("skip_seq")
            node.send("ddata", metrics=[["Flow", 99.0, t1 + 100]])
            wait_for(lambda: ["Node Control/Rebirth"] in node.ncmds, what="rebirth NCMD")
            wait_for(lambda: dead_letters(dsn).get("seq_gap") == 1, what="seq_gap counted")

            # The node reconnects: pysparkplug's clean NDEATH carries the next bdSeq, not the
            # birth's, so the spec has it ignored; the new NBIRTH's bdSeq opens the session.
            node.send("reconnect")
            wait_for(lambda: dead_letters(dsn).get("stale_death") == 1, what="stale NDEATH")
            assert "bdSeq 1 is not the current birth's 0" in reasons(dsn, "stale_death")[0]
            t2 = base + 2 * 10_000
            node.send("ddata", metrics=[["Flow", 7.0, t2 + 100], ["Flow", 9.0, t2 + 600]])
            wait_for(lambda: window(dsn, DEVICE_ID, "Flow", t2) != [], what="after rebirth")
            assert window(dsn, DEVICE_ID, "Flow", t2) == [(8.0, 7.0, 9.0, 2)]
            # The refused gap message's value came back once, in the rebirth's DBIRTH
            # (a birth carries the current values), never twice.
            assert window(dsn, DEVICE_ID, "Flow", t1) == [(99.0, 99.0, 99.0, 1)]

            # Hostile payloads from another node: each dead-lettered with its reason while
            # the pysparkplug node keeps committing.
            bad = mqtt_connect(f"{HOSTILE}-x", HOSTILE)
            topic = f"spBv1.0/{GROUP}/{{}}/{HOSTILE}"
            hostile = [
                ("NBIRTH", b"\xff\xfe not protobuf"),  # undecodable
                ("NBIRTH", hostile_birth()),
                ("NDATA", pb(1, [{"alias": 42, "double_value": 1.0}])),  # unknown_alias
                ("NBIRTH", hostile_birth()),
                ("NDATA", pb(1, [{"alias": 1, "datatype": 3, "int_value": 1}])),  # wrong_datatype
                ("NBIRTH", hostile_birth()),
                ("NDATA", pb(1, [{"alias": 1, "double_value": 1.0}] * 51)),  # too_many_metrics
                ("NBIRTH", hostile_birth()),
                ("NDATA", pb(9, [{"alias": 1, "double_value": 1.0}])),  # seq_gap
                ("NDATA", pb(2, []) + b"\x00" * 5000),  # oversize
            ]
            for kind, body in hostile:
                bad.publish(topic.format(kind), body, qos=1).wait_for_publish(WAIT_S)
            t3 = base + 3 * 10_000
            node.send("ddata", metrics=[["Flow", 5.0, t3 + 100]])
            wait_for(lambda: window(dsn, DEVICE_ID, "Flow", t3) != [], what="good data after")
            assert window(dsn, DEVICE_ID, "Flow", t3) == [(5.0, 5.0, 5.0, 1)]
            counts = dead_letters(dsn)
            for code in ("undecodable", "unknown_alias", "wrong_datatype", "too_many_metrics",
                         "oversize"):  # fmt: skip
                assert counts.get(code) == 1, (code, counts)
            assert counts.get("seq_gap") == 2, counts
            assert "bad_topic" not in counts, counts  # the host's own NCMDs are not data
            with psycopg.connect(dsn) as conn:
                rows = conn.execute(
                    "SELECT code, device, reason FROM dead_letters WHERE topic LIKE %s",
                    (f"%/{HOSTILE}",),
                ).fetchall()
            assert {r[1] for r in rows} == {f"{GROUP}.{HOSTILE}"}
            assert all(r[2] for r in rows)

            # DDEATH: the device goes offline; the will NDEATH (a killed node) takes the node.
            node.send("deregister")
            wait_for(lambda: status_of(dsn, DEVICE_ID) == "offline", what="DDEATH offline")
            assert status_of(dsn, NODE_ID) == "online"
            node.kill()
            wait_for(lambda: status_of(dsn, NODE_ID) == "offline", what="will NDEATH offline")
            assert host.counters.refused.get("stale_death") == 1
        finally:
            with contextlib.suppress(Exception):
                node.kill()


@pytest.mark.security
def test_a_sparkplug_node_publishes_only_as_itself_and_never_state_or_commands(
    broker: MosquittoServer, test_pki: PKIFixture, mqtt_connect: Callable[..., paho.Client]
) -> None:
    test_pki.issue(NODE)
    test_pki.issue(HOSTILE)
    watcher = mqtt_connect("svc-spb-watch", "svc-test")
    seen: list[bytes] = []
    watcher.on_message = lambda _c, _u, m: seen.append(m.payload)
    watcher_acks = Acks(watcher)
    assert not watcher_acks.subscribe("spBv1.0/#").is_failure
    attacker = Acks(mqtt_connect(HOSTILE, HOSTILE))
    forged = b"forged"
    for topic in (
        f"spBv1.0/{GROUP}/NBIRTH/{NODE}",
        f"spBv1.0/{GROUP}/NDATA/{NODE}",
        f"spBv1.0/{GROUP}/NDEATH/{NODE}",
        f"spBv1.0/{GROUP}/DDATA/{NODE}/{DEVICE}",
        f"spBv1.0/{GROUP}/NCMD/{NODE}",
        f"spBv1.0/{GROUP}/NCMD/{HOSTILE}",
        f"spBv1.0/{GROUP}/DCMD/{NODE}/{DEVICE}",
        f"spBv1.0/STATE/{HOSTILE}",
        "spBv1.0/STATE/svc-test",
        f"spBv1.0/{GROUP}/NDATA/{HOSTILE}/extra/level",
    ):
        assert attacker.publish(topic, forged).value == NOT_AUTHORIZED, topic
    for refused in (f"spBv1.0/{GROUP}/NDATA/+", f"spBv1.0/{GROUP}/NCMD/{NODE}", "spBv1.0/#"):
        assert attacker.subscribe(refused).is_failure, refused
    assert not attacker.subscribe(f"spBv1.0/{GROUP}/NCMD/{HOSTILE}").is_failure
    assert not attacker.subscribe("spBv1.0/STATE/+").is_failure
    marker = b"own-topic"
    assert not attacker.publish(f"spBv1.0/{GROUP}/NDATA/{HOSTILE}", marker).is_failure
    assert not watcher_acks.publish("spBv1.0/STATE/svc-test", b"{}").is_failure
    assert not watcher_acks.publish(f"spBv1.0/{GROUP}/NCMD/{HOSTILE}", b"x").is_failure
    wait_for(lambda: marker in seen, what="the node's own NDATA")
    assert forged not in seen


def test_millrace_sparkplug_publishes_state_retained_and_its_will_says_offline_on_a_crash(
    broker: MosquittoServer,
    test_pki: PKIFixture,
    tmp_path: Path,
    mqtt_connect: Callable[..., paho.Client],
) -> None:
    cert, key = test_pki.files("svc-test")
    config = tmp_path / "sparkplug.toml"
    config.write_text(
        f"""
[database]
dsn = "postgresql://nobody@127.0.0.1:1/none"

[broker]
host = "{broker.host}"
port = {broker.port}
ca = "{broker.ca}"
cert = "{cert}"
key = "{key}"

[sparkplug]
host_id = "svc-test"
groups = ["{GROUP}"]
periods_s = [10, 60]
""",
        encoding="utf-8",
    )
    states: queue.Queue[dict[str, Any]] = queue.Queue()
    watcher = mqtt_connect("svc-state-watch", "svc-test")
    watcher.on_message = lambda _c, _u, m: states.put(json.loads(m.payload))
    watcher.subscribe("spBv1.0/STATE/svc-test", qos=1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "millrace.cli", "sparkplug", "--config", str(config)]
    )
    try:
        online = states.get(timeout=WAIT_S)
        while not online["online"]:  # a retained offline STATE of an earlier test's host
            online = states.get(timeout=WAIT_S)
        proc.kill()
        offline = states.get(timeout=WAIT_S)
        assert offline == {"online": False, "timestamp": online["timestamp"]}
    finally:
        proc.kill()
        proc.wait(WAIT_S)
    bad = tmp_path / "bad.toml"
    bad.write_text(config.read_text().replace("periods_s = [10, 60]", "periods_s = [7]"))
    done = subprocess.run(
        [sys.executable, "-m", "millrace.cli", "sparkplug", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "sparkplug.periods_s[0]" in done.stderr and "Traceback" not in done.stderr


def test_host_keeps_what_it_judged_while_the_database_is_down_stores_it_once_and_alerts(
    broker: MosquittoServer,
    test_pki: PKIFixture,
    ingest_db: IngestDb,  # noqa: F811
) -> None:
    good = host_config(broker, test_pki, ingest_db.ingest_dsn)
    host = Host(dataclasses.replace(good, dsn="postgresql://nobody@127.0.0.1:1/none"))
    t = aligned_past_s(60)
    at = datetime.now(UTC)
    node = f"spBv1.0/{GROUP}/{{}}/{HOSTILE}"
    host.judge(node.format("NBIRTH"), hostile_birth(), at)
    host.judge(node.format("NDATA"), pb(1, [{"alias": 1, "double_value": 4.0, "timestamp": t}]), at)
    host.judge(
        node.format("NDATA"), pb(2, [{"alias": 1, "double_value": 8.0, "timestamp": t + 1}]), at
    )
    assert not host.flush(everything=True)  # the database is down: nothing lost yet
    dsn = ingest_db.owner_dsn
    with psycopg.connect(dsn, autocommit=True) as conn:  # alert rules apply as to any device
        add_rule(conn, AlertRule("spb-hot", "temp", "above", devices=f"{GROUP}.*", high=5.0))
    host.config = good
    assert host.flush() and host.flush()
    assert window(dsn, f"{GROUP}.{HOSTILE}", "temp", t) == [(6.0, 4.0, 8.0, 2)]
    assert status_of(dsn, f"{GROUP}.{HOSTILE}") == "online"
    now = datetime.now(UTC)
    with dashboard(dsn) as conn:
        alerts = queries.alert_history(conn, start=now - timedelta(hours=1), end=now)
    # Raised by the window of 4 and 8, cleared by the later one of the birth's 1.0.
    assert [(a.device, a.metric, a.value, a.state) for a in alerts.itertuples()] == [
        (f"{GROUP}.{HOSTILE}", "temp", 8.0, "cleared")
    ]
