"""`millrace sim --opcua 1`: gw0001 also has a PLC on an OPC UA server; the config
`millrace up` writes reads it (Basic256Sha256 SignAndEncrypt, the fleet's certificates)."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.sim.test_fleet import start_fleet, stop_fleet, wait_for_manifest

pytestmark = pytest.mark.integration


def test_fleet_opcua_gateway_is_read_by_the_generated_edge_config(
    tmp_path: Path, free_ports: Callable[[int], int]
) -> None:
    from millrace.edge.check import run_check
    from millrace.edge.config import parse_config
    from millrace.ops.stack.edgeconfig import (
        BrokerEndpoint,
        edge_config_toml,
        gateways_from_manifest,
    )

    manifest_path, gt_path = tmp_path / "m.json", tmp_path / "gt.csv"
    base = free_ports(3)
    proc = start_fleet(
        [
            "--devices",
            "2",
            "--kinds",
            "plc",
            "--opcua",
            "1",
            "--opcua-base-port",
            str(base + 2),
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
        assert manifest["gateways"][0]["devices"] == ["gw0001-plc", "gw0001-opc"]
        assert manifest["gateways"][1]["devices"] == ["gw0002-plc"]
        opc = next(d for d in manifest["devices"] if d["kind"] == "opcua")
        assert opc["endpoint"] == f"opc.tcp://127.0.0.1:{base + 2}/millrace"
        assert stat.S_IMODE(Path(opc["key"]).stat().st_mode) == 0o600
        text = edge_config_toml(
            gateway_id="gw0001",
            devices=gateways_from_manifest(manifest)["gw0001"],
            broker=BrokerEndpoint("broker.plant.example", 8883, *(tmp_path / "x",) * 3),
            state_dir=tmp_path / "gw0001",
        )
        config = parse_config(text, base=tmp_path, source="gw0001.toml")
        assert set(config.opcua) == {"gw0001-opc"}
        assert config.opcua["gw0001-opc"].security == "sign_encrypt"
        report = run_check(config, mqtt_wait_s=0.0)
        assert report.failed == 0, report.to_text()
    finally:
        code = stop_fleet(proc)
    assert code == 0, proc.stderr.read().decode() if proc.stderr else code
    served: dict[str, set[float]] = {}
    for line in gt_path.read_text().splitlines()[1:]:
        _, device, name, _, value, _ = line.split(",")
        if device == "gw0001-opc":
            served.setdefault(name, set()).add(float(value))
    results = {s.metric: s for s in report.signals if s.metric.startswith("opcua.")}
    assert len(results) == len(opc["signals"])
    for metric, result in results.items():
        value = result.value
        if isinstance(value, str):  # an enum's label
            continue
        assert float(f"{float(value):.12g}") in served[metric.removeprefix("opcua.")], metric
