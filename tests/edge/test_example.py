"""edge/example.toml: its documented try-it steps pass `edge check`, and it contacts nothing."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any

from tests.edge.agent_helpers import MILLRACE

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "edge" / "example.toml"
STEP_PREFIX = "#   "


def _documented_steps() -> list[str]:
    """The shell lines of the example's "Try it" comment, in order."""
    lines = EXAMPLE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Try it"))
    steps = []
    for line in lines[start + 1 :]:
        if not line.startswith("#"):
            break
        if line.startswith(STEP_PREFIX):
            steps.append(line[len(STEP_PREFIX) :])
    return steps


def test_example_passes_edge_check_after_the_documented_steps(tmp_path: Path) -> None:
    steps = _documented_steps()
    assert steps[-1].startswith("millrace edge check --config agent.toml")
    scratch = tmp_path / "press-01"
    script = "\n".join(["set -e", *steps[:-1], steps[-1] + " || echo exit=$?"])
    script = script.replace("/tmp/press-01", str(scratch))
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": f"{MILLRACE.parent}:{os.environ['PATH']}"},
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, done.stdout + done.stderr
    assert "config ok: device press-01, 9 signal(s)" in out, out + done.stderr
    # Only the field devices that do not exist fail; the config and its certificates pass.
    assert out.rstrip().endswith("exit=1"), out
    for ok in ("gateway.load1", "demo.sine"):
        assert next(line for line in out.splitlines() if line.startswith(ok)).endswith("ok")
    assert "file not found" not in done.stderr and "Traceback" not in done.stderr
    assert (scratch / "pki" / "device.key").stat().st_mode & 0o077 == 0


def _hosts(node: Any, where: str = "") -> list[tuple[str, str]]:
    if isinstance(node, dict):
        found = [(f"{where}.host", node["host"])] if isinstance(node.get("host"), str) else []
        for key, value in node.items():
            found += _hosts(value, f"{where}.{key}")
        return found
    if isinstance(node, list):
        return [h for i, item in enumerate(node) for h in _hosts(item, f"{where}[{i}]")]
    return []


def test_example_names_hosts_under_dot_example_only() -> None:
    hosts = _hosts(tomllib.loads(EXAMPLE.read_text()))
    assert len(hosts) == 3, hosts  # broker, modbus.plc1, local_mqtt.nodes
    for key, host in hosts:
        assert host.endswith(".example"), (key, host)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            continue
        raise AssertionError(f"{key} is an address: {host}")
