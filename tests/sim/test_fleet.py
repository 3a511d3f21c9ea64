"""The fleet launcher as a separate process: manifest, N devices served, ground truth, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from millrace.cli import main as millrace_main

REPO = Path(__file__).parents[2]
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0


def wait_for_manifest(path: Path, proc: subprocess.Popen[bytes], status: str) -> dict[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if path.exists():
            manifest: dict[str, Any] = json.loads(path.read_text())
            if manifest["status"] == status:
                return manifest
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else proc.returncode
        time.sleep(0.1)
    raise AssertionError(f"manifest never reached status {status}")


def modbus_read(port: int, address: int, count: int) -> list[int]:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(struct.pack(">HHHBBHH", 9, 0, 6, 1, 3, address, count))
        frame = sock.recv(512)
    assert frame[7] == 3 and frame[8] == 2 * count
    return list(struct.unpack(f">{count}H", frame[9 : 9 + 2 * count]))


def start_fleet(args: list[str], tmp_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "MILLRACE_LOG_LEVEL": "WARNING"}
    return subprocess.Popen(
        [sys.executable, "-m", "millrace.cli", "sim", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop_fleet(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_fleet_serves_n_devices_writes_ground_truth_and_stops_on_sigterm(
    tmp_path: Path, free_ports: Callable[[int], int]
) -> None:
    devices = 4
    base = free_ports(devices)
    manifest_path, gt_path, w1_dir = tmp_path / "m.json", tmp_path / "gt.csv", tmp_path / "w1"
    proc = start_fleet(
        [
            "--devices",
            str(devices),
            "--kinds",
            "plc,w1",
            "--base-port",
            str(base),
            "--seed",
            "3",
            "--w1-dir",
            str(w1_dir),
            "--manifest",
            str(manifest_path),
            "--ground-truth",
            str(gt_path),
            "--fault",
            "gw0004-plc:stuck",
        ],
        tmp_path,
    )
    try:
        manifest = wait_for_manifest(manifest_path, proc, "running")
        plcs = [d for d in manifest["devices"] if d["kind"] == "plc"]
        sensors = [d for d in manifest["devices"] if d["kind"] == "w1"]
        assert [d["port"] for d in plcs] == list(range(base, base + devices))
        assert [g["id"] for g in manifest["gateways"]] == ["gw0001", "gw0002", "gw0003", "gw0004"]
        assert manifest["gateways"][0]["devices"] == ["gw0001-plc", "gw0001-w1"]
        state = next(s for s in plcs[0]["signals"] if s["name"] == "machine_state")
        assert state["table"] == "holding" and state["states"]["2"] == "fault"
        assert manifest["faults"][0]["kind"] == "stuck"
        for plc in plcs:
            assert len(modbus_read(plc["port"], 0, 8)) == 8
        time.sleep(1.5)
        for w1 in sensors:
            assert Path(w1["path"]).read_text().splitlines()[0].endswith("YES")
    finally:
        code = stop_fleet(proc)
    assert code == 0, proc.stderr.read().decode() if proc.stderr else code
    stopped = json.loads(manifest_path.read_text())
    assert stopped["status"] == "stopped" and stopped["stopped_at"] >= stopped["started_at"]
    for plc in plcs:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", plc["port"]), timeout=1).close()
    rows = [line.split(",") for line in gt_path.read_text().splitlines()[1:]]
    read_devices = {r[1] for r in rows if r[1].endswith("-plc")}
    assert read_devices == {f"gw000{i}-plc" for i in range(1, devices + 1)}
    assert {r[5] for r in rows if r[1] == "gw0004-plc"} == {"stuck"}
    written = {r[1] for r in rows if r[1].endswith("-w1")}
    assert written == {f"gw000{i}-w1" for i in range(1, devices + 1)}
    assert sum(1 for r in rows if r[1] == "gw0001-w1") >= 2  # one write per second


@pytest.mark.integration
def test_fleet_with_mqtt_nodes_marks_them_offline_on_sigterm(
    tmp_path: Path, local_broker: Any, free_ports: Callable[[int], int]
) -> None:
    import paho.mqtt.client as paho

    devices = 3
    base = free_ports(devices)
    received: list[tuple[str, bytes]] = []
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2)
    sub.on_message = lambda _c, _u, msg: received.append((msg.topic, msg.payload))
    sub.connect(local_broker.host, local_broker.port)
    sub.subscribe("fleet/#", qos=1)
    sub.loop_start()
    manifest_path = tmp_path / "m.json"
    proc = start_fleet(
        [
            "--devices",
            str(devices),
            "--base-port",
            str(base),
            "--mqtt-port",
            str(local_broker.port),
            "--topic-prefix",
            "fleet",
            "--w1-dir",
            str(tmp_path / "w1"),
            "--manifest",
            str(manifest_path),
        ],
        tmp_path,
    )
    try:
        manifest = wait_for_manifest(manifest_path, proc, "running")
        nodes = [d for d in manifest["devices"] if d["kind"] == "mqtt"]
        assert [n["topic"] for n in nodes] == [f"fleet/gw000{i}-node/sensor" for i in (1, 2, 3)]
        assert {s["path"] for s in nodes[0]["signals"]} == {
            "temperature",
            "humidity",
            "battery.voltage",
        }
        deadline = time.monotonic() + 10
        while {t for t, _ in received if t.endswith("/sensor")} != {n["topic"] for n in nodes}:
            assert time.monotonic() < deadline, received
            time.sleep(0.1)
    finally:
        code = stop_fleet(proc)
        time.sleep(0.3)
        sub.loop_stop()
        sub.disconnect()
    assert code == 0
    last_status = {t: p for t, p in received if t.endswith("/status")}
    assert last_status == {n["status_topic"]: b"offline" for n in nodes}


def test_millrace_sim_is_registered_and_bad_flags_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        millrace_main(["sim", "--help"])
    assert exc.value.code == 0
    assert "--ground-truth" in capsys.readouterr().out
    assert millrace_main(["sim", "--devices", "0"]) == 2
    assert "--devices" in capsys.readouterr().err
    assert millrace_main(["sim", "--fault", "gw1:melt"]) == 2


def test_python_m_fieldsim_runs_without_the_millrace_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "millrace.fieldsim", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "--base-port" in out.stdout


def test_fleet_rtu_gateway_is_read_by_the_generated_edge_config(
    tmp_path: Path, free_ports: Callable[[int], int]
) -> None:
    """`--rtu 1`: gw0001 also has a PLC on a pty bus; the config `millrace up` writes reads it."""
    from millrace.edge.check import run_check
    from millrace.edge.config import parse_config
    from millrace.ops.stack.edgeconfig import (
        BrokerEndpoint,
        edge_config_toml,
        gateways_from_manifest,
    )

    manifest_path, gt_path = tmp_path / "m.json", tmp_path / "gt.csv"
    base = free_ports(2)
    proc = start_fleet(
        [
            "--devices",
            "2",
            "--kinds",
            "plc",
            "--rtu",
            "1",
            "--base-port",
            str(base),
            "--manifest",
            str(manifest_path),
            "--ground-truth",
            str(gt_path),
        ],
        tmp_path,
    )
    try:
        manifest = wait_for_manifest(manifest_path, proc, "running")
        assert manifest["gateways"][0]["devices"] == ["gw0001-plc", "gw0001-rtu"]
        assert manifest["gateways"][1]["devices"] == ["gw0002-plc"]
        rtu = next(d for d in manifest["devices"] if d["kind"] == "rtu")
        assert rtu["protocol"] == "modbus-rtu" and rtu["port"].startswith("/dev/pts/")
        text = edge_config_toml(
            gateway_id="gw0001",
            devices=gateways_from_manifest(manifest)["gw0001"],
            broker=BrokerEndpoint("broker.plant.example", 8883, *(tmp_path / "x",) * 3),
            state_dir=tmp_path / "gw0001",
        )
        config = parse_config(text, base=tmp_path, source="gw0001.toml")
        assert set(config.modbus_rtu) == {"gw0001-rtu"}
        report = run_check(config, mqtt_wait_s=0.0)
        assert report.failed == 0, report.to_text()
    finally:
        code = stop_fleet(proc)
    assert code == 0, proc.stderr.read().decode() if proc.stderr else code
    served: dict[str, float] = {}
    for line in gt_path.read_text().splitlines()[1:]:
        _, device, name, _, value, _ = line.split(",")
        if device == "gw0001-rtu":
            served[name] = float(value)
    rtu_results = {s.metric: s for s in report.signals if s.metric.startswith("rtu.")}
    assert len(rtu_results) == len(rtu["signals"])
    for metric, result in rtu_results.items():
        value = result.value
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, str):  # an enum's label: compare the raw state instead
            continue
        assert value == pytest.approx(served[metric.removeprefix("rtu.")], rel=1e-6), metric
