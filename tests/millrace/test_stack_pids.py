"""`millrace down`/`status` never trust a bare pid from plant.json: a reused pid is left alone."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from millrace.ops.stack import procs
from millrace.ops.stack.layout import PlantLayout
from millrace.ops.stack.plant import down, running_services


@pytest.fixture
def unrelated() -> Iterator[subprocess.Popen[bytes]]:
    """A process that has nothing to do with any plant (it got a recorded pid after a reboot)."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _write_state(root: Path, services: list[dict[str, Any]], **extra: Any) -> None:
    state = {
        "status": "running",
        "root": str(root),
        "dsn": "postgresql://dashboard@127.0.0.1:1/millrace",
        "broker": "mqtts://localhost:1",
        "dashboard": "http://127.0.0.1:1",
        "logs": str(root / "logs"),
        "postgres": {"datadir": str(root / "postgres" / "data"), "port": 1},
        "services": services,
        **extra,
    }
    path = PlantLayout(root).state_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state))


@pytest.mark.parametrize(
    "identity",
    [None, "0f0f0f0f-other-boot:12345"],
    ids=["bare-pid", "pid-from-another-boot"],
)
def test_down_does_not_signal_a_reused_pid(
    tmp_path: Path, unrelated: subprocess.Popen[bytes], identity: str | None
) -> None:
    entry = {"name": "broker", "pid": unrelated.pid, "log": "x.log"}
    if identity is not None:
        entry["identity"] = identity
    _write_state(tmp_path, [entry], supervisor_pid=unrelated.pid, supervisor_identity=identity)
    state = json.loads(PlantLayout(tmp_path).state_file.read_text())
    assert running_services(state) == []
    assert down(tmp_path) == []
    assert unrelated.poll() is None, "down signalled a process the plant did not start"
    status = subprocess.run(
        [sys.executable, "-m", "millrace.cli", "status", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "DOWN broker" in status.stdout, status.stdout + status.stderr
    assert unrelated.poll() is None


def test_down_stops_the_process_it_recorded(tmp_path: Path) -> None:
    service = procs.start("sleeper", ["sleep", "300"], log_dir=tmp_path / "logs")
    assert service.identity and service.identity == procs.process_identity(service.pid)
    entry = {"name": "sleeper", "pid": service.pid, "identity": service.identity, "log": "l"}
    _write_state(tmp_path, [entry])
    state = json.loads(PlantLayout(tmp_path).state_file.read_text())
    assert [s["name"] for s in running_services(state)] == ["sleeper"]
    assert down(tmp_path) == ["sleeper"]
    assert not procs.is_running(service.pid)


def test_process_identity_changes_with_the_process(unrelated: subprocess.Popen[bytes]) -> None:
    mine = procs.process_identity(unrelated.pid)
    assert mine is not None and procs.is_ours(unrelated.pid, mine)
    assert not procs.is_ours(unrelated.pid, None)
    boot, _, start = mine.rpartition(":")
    assert not procs.is_ours(unrelated.pid, f"{boot}:{int(start) + 1}")
