"""OPC UA: the edge driver against fieldsim's OPC UA server, over loopback with Basic256Sha256.

The server (fieldsim.opcua.OpcUaPlc, asyncua) serves the simulated PLC model as
variables, logging every written value to the ground truth; it only accepts
Basic256Sha256 SignAndEncrypt sessions from trusted client certificates. The
driver runs its own asyncio loop in one thread and feeds a real Pipeline, which
counts failures per signal. Faults: a server restart, every session expired by
the server, an untrusted client certificate.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from millrace.edge.agent import check_files
from millrace.edge.check import run_check
from millrace.edge.config import AgentConfig, parse_config
from millrace.edge.drivers.opcua import OpcUaSource
from millrace.edge.pipeline import Pipeline
from millrace.errors import ConfigError
from millrace.fieldsim.faults import DeviceFaults
from millrace.fieldsim.feed import Feed
from millrace.fieldsim.groundtruth import GroundTruth
from millrace.fieldsim.opcua import APPLICATION_URI, OpcUaPlc, make_app_certificate, node_id
from millrace.fieldsim.specs import load_plc_map

pytestmark = pytest.mark.integration

PLC_MAP = load_plc_map()
DEVICE = "gw0042-opc1"
ANALOG = [s.spec.name for s in PLC_MAP.signals if s.type != "bool"][:4]

HEAD = """
device_id = "gw0042"
[broker]
host = "broker.plant.example"
ca = "pki/ca.crt"
cert = "pki/gw.crt"
key = "pki/gw.key"
[outbox]
path = "outbox.sqlite"
[state]
dir = "state"
"""


class LoopThread:
    """The simulator's own asyncio loop, in a thread apart from the driver's."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        self.run(cancel_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Sim:
    plc: OpcUaPlc
    gt: GroundTruth
    loop: LoopThread
    pki: Path

    def truth(self, signal: str) -> set[float]:
        """Every value the server served for `signal` so far (as the CSV keeps it, 12 digits)."""
        self.gt.flush()
        with self.gt.path.open() as handle:
            return {
                float(row["value"])
                for row in csv.DictReader(handle)
                if row["device"] == DEVICE and row["signal"] == signal
            }


def logged(raw: object) -> float:
    """A reading as the ground truth CSV writes values (12 significant digits)."""
    assert isinstance(raw, float), raw
    return float(f"{raw:.12g}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    pki = tmp_path_factory.mktemp("opcua-pki")
    make_app_certificate(
        pki / "server.crt", pki / "server.key", common_name="sim", uri=APPLICATION_URI
    )
    make_app_certificate(
        pki / "client.crt", pki / "client.key", common_name="gw0042", uri="urn:millrace:edge:gw0042"
    )
    make_app_certificate(
        pki / "stranger.crt", pki / "stranger.key", common_name="x", uri="urn:millrace:edge:x"
    )
    gt = GroundTruth(pki / "truth.csv")
    loop = LoopThread()
    plc = OpcUaPlc(
        device_id=DEVICE,
        gateway="gw0042",
        host="127.0.0.1",
        port=_free_port(),
        plc_map=PLC_MAP,
        feed=Feed(seed=7),
        faults=DeviceFaults.pin([], device=DEVICE, gateway="gw0042", started_at=0.0),
        cert=pki / "server.crt",
        key=pki / "server.key",
        trusted_clients=(pki / "client.crt",),
        ground_truth=gt,
    )
    loop.run(plc.start())
    try:
        yield Sim(plc=plc, gt=gt, loop=loop, pki=pki)
    finally:
        loop.run(plc.stop())
        loop.close()
        gt.close()


def opcua_config(
    sim: Sim,
    *,
    signals: list[tuple[str, str, str]],
    client: str = "client",
    poll_s: float = 0.2,
    extra: str = "",
) -> AgentConfig:
    """signals: (metric, node id, mode)."""
    body = (
        f'[opcua.plc]\nendpoint = "{sim.plc.endpoint}"\n'
        f'cert = "{sim.pki / (client + ".crt")}"\nkey = "{sim.pki / (client + ".key")}"\n'
        f'server_cert = "{sim.pki / "server.crt"}"\ntimeout_s = 2.0\nreconnect_max_s = 0.5\n'
        + extra
    )
    for metric, node, mode in signals:
        body += (
            f'[[signals]]\nmetric = "{metric}"\ndriver = "opcua"\nserver = "plc"\n'
            f'node = "{node}"\nmode = "{mode}"\npoll_s = {poll_s}\n'
        )
    return parse_config(HEAD + body, base=sim.pki, source="edge.toml")


@dataclass
class Recorder:
    """A real pipeline (errors per signal) plus every reading and failure seen."""

    pipeline: Pipeline
    readings: list[tuple[int, int, object]] = field(default_factory=list)
    failures: list[tuple[int, int, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reading(self, index: int, ts_ms: int, raw: object) -> None:
        with self.lock:
            self.readings.append((index, ts_ms, raw))
        self.pipeline.reading(index, ts_ms, raw)

    def failure(self, index: int, ts_ms: int, reason: str) -> None:
        with self.lock:
            self.failures.append((index, ts_ms, reason))
        self.pipeline.failure(index, ts_ms, reason)

    def values(self, index: int) -> list[object]:
        with self.lock:
            return [raw for i, _, raw in self.readings if i == index]


def start_source(config: AgentConfig) -> tuple[OpcUaSource, Recorder]:
    rec = Recorder(Pipeline(config.signals, periods_s=[10], grace_ms=1000))
    source = OpcUaSource(
        config.opcua["plc"], list(enumerate(config.signals)), device_id="gw0042", sink=rec
    )
    source.start()
    return source, rec


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_opcua_poll_and_subscription_values_match_the_ground_truth(sim: Sim) -> None:
    signals = [(f"p_{n}", node_id(DEVICE, n), "poll") for n in ANALOG]
    signals += [(f"s_{n}", node_id(DEVICE, n), "subscribe") for n in ANALOG]
    config = opcua_config(sim, signals=signals)
    source, rec = start_source(config)
    try:
        count = len(ANALOG)
        # Subscriptions deliver changes: two each means a first value and one change.
        wait_for(lambda: all(len(rec.values(i)) >= 2 for i in range(2 * count)))
    finally:
        source.stop()
    assert source.sessions == 1 and source.subscribed == count
    assert not rec.failures
    for i, name in enumerate(ANALOG):
        truth = sim.truth(name)
        for raw in rec.values(i) + rec.values(count + i):
            assert isinstance(raw, float)
            assert logged(raw) in truth, (name, raw)
    assert rec.pipeline.errors == [0] * (2 * count)


def test_opcua_bad_node_id_fails_only_that_signal(sim: Sim) -> None:
    good = node_id(DEVICE, ANALOG[0])
    config = opcua_config(
        sim,
        signals=[
            ("good", good, "poll"),
            ("missing", f"ns=2;s={DEVICE}.no_such_signal", "poll"),
            ("missing_sub", f"ns=2;s={DEVICE}.no_such_either", "subscribe"),
            ("good_sub", good, "subscribe"),
        ],
    )
    source, rec = start_source(config)
    try:
        wait_for(lambda: rec.pipeline.errors[1] >= 3 and rec.pipeline.errors[2] >= 3)
        wait_for(lambda: len(rec.values(0)) >= 3 and len(rec.values(3)) >= 1)
    finally:
        source.stop()
    errors = rec.pipeline.errors
    assert errors[0] == 0 and errors[3] == 0
    assert "BadNodeIdUnknown" in rec.pipeline.last_error[1]
    assert "BadNodeIdUnknown" in rec.pipeline.last_error[2]
    assert source.sessions == 1  # a bad node is not a reason to reconnect


def test_opcua_rejected_client_certificate_is_a_clear_per_signal_error(sim: Sim) -> None:
    config = opcua_config(
        sim, client="stranger", signals=[("temp", node_id(DEVICE, ANALOG[0]), "poll")]
    )
    refused_before = sim.plc.refused
    report = run_check(config, mqtt_wait_s=0)
    assert report.exit_code == 1
    problem = report.signals[0].problem
    assert "refused our certificate (BadCertificateUntrusted)" in problem, problem
    assert str(sim.pki / "stranger.crt") in problem
    assert sim.plc.refused > refused_before
    # The running driver: counted per signal, retried, never a crash.
    source, rec = start_source(config)
    try:
        wait_for(lambda: rec.pipeline.errors[0] >= 3)
        assert source.alive
    finally:
        source.stop()
    assert not rec.readings
    assert "BadCertificateUntrusted" in rec.pipeline.last_error[0]


def test_opcua_edge_check_reads_the_simulator(sim: Sim) -> None:
    config = opcua_config(
        sim,
        signals=[
            ("temp", node_id(DEVICE, ANALOG[0]), "poll"),
            ("temp_sub", node_id(DEVICE, ANALOG[1]), "subscribe"),
        ],
    )
    report = run_check(config, mqtt_wait_s=0)
    assert report.exit_code == 0, report.to_text()
    assert logged(report.signals[0].value) in sim.truth(ANALOG[0])
    assert logged(report.signals[1].value) in sim.truth(ANALOG[1])


def test_opcua_session_expiry_reconnects_and_resubscribes(sim: Sim) -> None:
    config = opcua_config(
        sim,
        signals=[
            ("temp", node_id(DEVICE, ANALOG[0]), "poll"),
            ("temp_sub", node_id(DEVICE, ANALOG[0]), "subscribe"),
        ],
    )
    source, rec = start_source(config)
    try:
        wait_for(lambda: source.connected and len(rec.values(1)) >= 1)
        assert sim.loop.run(sim.plc.expire_sessions()) >= 1
        wait_for(lambda: source.sessions >= 2 and source.connected)
        seen = len(rec.values(1))
        wait_for(lambda: len(rec.values(1)) >= seen + 2)  # the new subscription delivers
        polled = len(rec.values(0))
        wait_for(lambda: len(rec.values(0)) >= polled + 2)
    finally:
        source.stop()
    assert source.errors >= 1
    assert "session on plc ended" in source.last_error
    truth = sim.truth(ANALOG[0])
    assert all(logged(raw) in truth for raw in rec.values(0) + rec.values(1))


def test_opcua_server_restart_counts_errors_then_reconnects_and_resubscribes(sim: Sim) -> None:
    config = opcua_config(
        sim,
        signals=[
            ("temp", node_id(DEVICE, ANALOG[0]), "poll"),
            ("temp_sub", node_id(DEVICE, ANALOG[1]), "subscribe"),
        ],
    )
    source, rec = start_source(config)
    try:
        wait_for(lambda: source.connected and len(rec.values(1)) >= 1)
        sim.loop.run(sim.plc.restart(down_s=2.0))
        wait_for(lambda: source.sessions >= 2 and source.connected, timeout_s=30)
        seen_poll, seen_sub = len(rec.values(0)), len(rec.values(1))
        wait_for(lambda: len(rec.values(0)) >= seen_poll + 2 and len(rec.values(1)) >= seen_sub + 2)
    finally:
        source.stop()
    errors = rec.pipeline.errors
    # Both signals failed on their schedule while the server was away (0.2 s polls, >= 2 s).
    assert errors[0] >= 3 and errors[1] >= 3, errors
    assert source.errors >= 1
    truth0, truth1 = sim.truth(ANALOG[0]), sim.truth(ANALOG[1])
    assert all(logged(raw) in truth0 for raw in rec.values(0))
    assert all(logged(raw) in truth1 for raw in rec.values(1))


def test_opcua_config_errors_name_the_key(sim: Sim) -> None:
    node = node_id(DEVICE, ANALOG[0])
    with pytest.raises(ConfigError) as exc:
        opcua_config(sim, signals=[("t", "Line1.Temp", "poll")])
    assert exc.value.key == "signals[0].node"
    with pytest.raises(ConfigError) as exc:
        parse_config(
            HEAD + '[opcua.plc]\nendpoint = "opc.tcp://plc1.plant.example:4840"\n'
            f'[[signals]]\nmetric = "t"\ndriver = "opcua"\nserver = "plc"\nnode = "{node}"\n',
            base=sim.pki,
        )
    assert exc.value.key == "opcua.plc.cert"
    with pytest.raises(ConfigError) as exc:
        parse_config(
            HEAD + '[opcua.plc]\nendpoint = "http://plc1.plant.example"\nsecurity = "none"\n',
            base=sim.pki,
        )
    assert exc.value.key == "opcua.plc.endpoint"
    with pytest.raises(ConfigError) as exc:
        opcua_config(sim, signals=[("t", node, "push")])
    assert exc.value.key == "signals[0].mode"


def test_opcua_key_readable_by_others_is_refused_naming_the_key(sim: Sim, tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_bytes((sim.pki / "client.key").read_bytes())
    os.chmod(key, 0o644)
    config = opcua_config(sim, signals=[("t", node_id(DEVICE, ANALOG[0]), "poll")])
    from dataclasses import replace

    config = replace(config, opcua={"plc": replace(config.opcua["plc"], key=key)})
    (tmp_path / "pki").mkdir()
    for name in ("ca.crt", "gw.crt", "gw.key"):
        (tmp_path / "pki" / name).write_text("x")
    config = replace(
        config,
        broker=replace(
            config.broker,
            ca=tmp_path / "pki/ca.crt",
            cert=tmp_path / "pki/gw.crt",
            key=tmp_path / "pki/gw.key",
        ),
    )
    with pytest.raises(ConfigError) as exc:
        check_files(config)
    assert exc.value.key == "opcua.plc.key"
    assert "chmod 600" in exc.value.problem
    os.chmod(key, 0o600)
    check_files(config)


def test_opcua_without_the_extra_edge_check_names_it_in_one_line(tmp_path: Path) -> None:
    from tests.edge.test_cli import run, write

    # A gateway without the opcua extra: asyncua cannot be imported.
    blocker = tmp_path / "blocked" / "asyncua"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 'asyncua'\")\n")
    config = write(
        tmp_path,
        '[opcua.plc]\nendpoint = "opc.tcp://plc1.plant.example:4840"\nsecurity = "none"\n'
        '[[signals]]\nmetric = "t"\ndriver = "opcua"\nserver = "plc"\nnode = "ns=2;s=T"\n',
    )
    done = run("edge", "check", "--config", str(config), env={"PYTHONPATH": str(blocker.parent)})
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"millrace: error: {config}: opcua.plc: ")
    assert "pip install 'millrace[opcua]'" in lines[0]


def test_opcua_username_and_password_file(sim: Sim, tmp_path: Path) -> None:
    node = node_id(DEVICE, ANALOG[0])
    good, bad = tmp_path / "good.pw", tmp_path / "bad.pw"
    good.write_text("s3cret\n")
    bad.write_text("guess\n")
    sim.plc.users["operator"] = "s3cret"  # from now on the server wants a user
    try:
        ok = opcua_config(
            sim,
            signals=[("t", node, "poll")],
            extra=f'username = "operator"\npassword_file = "{good}"\n',
        )
        report = run_check(ok, mqtt_wait_s=0)
        assert report.exit_code == 0, report.to_text()
        assert logged(report.signals[0].value) in sim.truth(ANALOG[0])
        wrong = opcua_config(
            sim,
            signals=[("t", node, "poll")],
            extra=f'username = "operator"\npassword_file = "{bad}"\n',
        )
        report = run_check(wrong, mqtt_wait_s=0)
        assert "refused user 'operator'" in report.signals[0].problem, report.to_text()
        anonymous = opcua_config(sim, signals=[("t", node, "poll")])
        assert run_check(anonymous, mqtt_wait_s=0).exit_code == 1
    finally:
        sim.plc.users.clear()


def test_opcua_sampler_runs_the_source_thread_beside_the_pollers(sim: Sim) -> None:
    from millrace.edge.sampler import Sampler

    config = opcua_config(
        sim,
        signals=[
            ("temp", node_id(DEVICE, ANALOG[0]), "poll"),
            ("temp_sub", node_id(DEVICE, ANALOG[1]), "subscribe"),
        ],
    )
    pipe = Pipeline(config.signals, periods_s=[10], grace_ms=1000)
    sampler = Sampler(config, pipe)
    sampler.start()
    try:
        wait_for(lambda: pipe.readings_total >= 4)
        assert sampler.dead_threads() == []
        assert any(t.name == "opcua-plc" for t in threading.enumerate())
    finally:
        sampler.stop()
    assert not any(t.name == "opcua-plc" for t in threading.enumerate())
    assert pipe.errors == [0, 0]


def test_opcua_set_poll_is_refused_with_the_reason(sim: Sim, tmp_path: Path) -> None:
    from millrace.edge.commands import CommandProcessor
    from millrace.edge.state import StateStore
    from millrace.wire import Command
    from tests.edge.test_commands import FakeControl

    config = opcua_config(sim, signals=[("temp", node_id(DEVICE, ANALOG[0]), "poll")])
    store = StateStore(tmp_path / "state")
    control = FakeControl()
    proc = CommandProcessor(config=config, store=store, state=store.load(), control=control)
    payload = Command(id="c1", name="set", args={"metric": "temp", "poll_s": 0.5}).to_json()
    reply = proc.handle("set", payload)
    assert not reply.ok
    assert "OPC UA session's own schedule" in json.dumps(reply.error)
    assert control.calls == []


def test_opcua_session_that_fails_at_once_backs_off(
    sim: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that opens sessions but breaks each at once is not reconnected at 2 Hz."""
    node = node_id(DEVICE, ANALOG[0])
    config = parse_config(
        HEAD
        + '[opcua.plc]\nendpoint = "opc.tcp://plc1.plant.example:4840"\nsecurity = "none"\n'
        + "reconnect_max_s = 2.0\n"
        + f'[[signals]]\nmetric = "temp"\ndriver = "opcua"\nserver = "plc"\nnode = "{node}"\n',
        base=sim.pki,
    )
    opened: list[float] = []

    async def connect(self: OpcUaSource) -> object:
        opened.append(time.monotonic())
        return object()

    async def serve(self: OpcUaSource, client: object, schedule: Any, due: Any) -> None:
        raise ConnectionError("subscription refused")

    async def close(self: OpcUaSource, client: object) -> None:
        return None

    monkeypatch.setattr(OpcUaSource, "_connect", connect)
    monkeypatch.setattr(OpcUaSource, "_serve", serve)
    monkeypatch.setattr(OpcUaSource, "_close", close)
    source, rec = start_source(config)
    try:
        wait_for(lambda: len(opened) >= 4, timeout_s=30)
    finally:
        source.stop()
    gaps = [b - a for a, b in itertools.pairwise(opened)]
    assert gaps[1] >= 0.9 and gaps[2] >= 1.9, gaps  # 0.5, 1, 2 s: doubling up to 2 s
    assert rec.pipeline.errors[0] >= 1  # the signal failed meanwhile
