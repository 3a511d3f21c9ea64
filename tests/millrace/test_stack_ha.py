"""`millrace up --ha`: two brokers, a Patroni pair and two workers; one start for the module.

The tests run in file order on that one plant: what status says, the commands that must
reach the primary and whichever broker a gateway is on, the failover (SIGKILL of a
broker and of the primary's postmaster) under the simulated fleet, and `down`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.millrace.test_stack import (
    _millrace,
    _port_free,
    _processes_under,
    _status,
)

pytestmark = pytest.mark.e2e

GATEWAYS = 4  # crc32 spreads gw0001-gw0003 to the first broker and gw0004 to the second
WAIT_SECONDS = 180.0  # give-up limits only


def _free_run(size: int) -> int:
    """A base port with `size` free consecutive ports."""
    for base in range(20000, 30000, 89):
        if all(_port_free(base + i) for i in range(size)):
            return base
    raise AssertionError("no block of free ports")


def _wait(predicate: Any, what: str) -> Any:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.5)
    raise AssertionError(f"gave up after {WAIT_SECONDS} s waiting for {what}")


@pytest.fixture(scope="module")
def ha_plant() -> Iterator[tuple[Path, dict]]:
    base = Path(tempfile.mkdtemp(prefix="millrace-ha-"))
    base.chmod(0o755)  # as root, PostgreSQL runs as `postgres`, who must reach the data
    root = base / "plant"
    # One run of free ports: 2 brokers, 2 workers, dashboard, local MQTT, the pair's 6, PLCs.
    b = _free_run(12 + GATEWAYS + 1)
    args = [
        "--broker-port", str(b),
        "--ingest-http-port", str(b + 2),
        "--dashboard-port", str(b + 4),
        "--gateway-mqtt-port", str(b + 5),
        "--postgres-port", str(b + 6),
        "--modbus-base-port", str(b + 12),
    ]  # fmt: skip
    try:
        done = subprocess.run(
            _millrace(
                "up", "--ha", "--detach", "--root", str(root), "--devices", str(GATEWAYS),
                "--period", "2", *args,
            ),
            capture_output=True,
            text=True,
            timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        yield root, _status(root)
    finally:
        subprocess.run(_millrace("down", "--root", str(root)), capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _superuser(status: dict) -> str:
    return str(status["superuser_dsn"])


def _latest_window_per_gateway(dsn: str) -> dict[str, datetime]:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT d.name, max(r.ts) FROM readings r JOIN devices d ON d.id = r.device_id "
            "GROUP BY d.name"
        ).fetchall()
    return {name: ts for name, ts in rows}


def _roles(root: Path) -> dict[str, str]:
    return {node["name"]: node["role"] for node in _status(root)["database_nodes"]}


def test_up_ha_status_names_the_primary_both_brokers_and_both_workers(ha_plant) -> None:
    root, status = ha_plant
    assert status["status"] == "running"
    assert status["ha"] is True
    assert len(status["brokers"]) == 2 and all(b.startswith("mqtts://") for b in status["brokers"])
    assert sorted(_roles(root).values()) == ["primary", "replica"]
    running = {s["name"] for s in status["services"] if s["running"]}
    assert {"broker", "broker-2", "etcd", "patroni-pg0", "patroni-pg1"} <= running
    assert {"ingest", "ingest-2", "dashboard"} <= running
    # Both workers consume from both brokers; each has its own identity (client id = CN).
    for name in ("ingest", "ingest-2"):
        config = (root / f"{name}.toml").read_text()
        assert all(b.removeprefix("mqtts://") in config for b in status["brokers"])
        assert f'client_id = "{name}"' in config
    # Workers and the dashboard name both database nodes and ask for the primary.
    for dsn_file in ("ingest.dsn", "dashboard.dsn", "retention.dsn"):
        dsn = (root / "secrets" / dsn_file).read_text()
        assert dsn.count("127.0.0.1:") == 2 and "target_session_attrs=read-write" in dsn
    # Every gateway knows both brokers, and the fleet is spread over them.
    on = {}
    for gateway in (f"gw{i:04d}" for i in range(1, GATEWAYS + 1)):
        assert "hosts = [" in (root / "gateways" / gateway / "config.toml").read_text()
        state = root / "gateways" / gateway / "state" / "status.json"
        on[gateway] = _wait(lambda s=state: json.loads(s.read_text()).get("broker"), "status")
    assert len(set(on.values())) == 2, on


def test_alerts_apply_through_a_standby_first_dsn_writes_on_the_primary(ha_plant) -> None:
    root, status = ha_plant
    nodes = {n["role"]: n for n in _status(root)["database_nodes"]}
    standby_first = (
        f"host=127.0.0.1,127.0.0.1 port={nodes['replica']['port']},{nodes['primary']['port']}"
        f" dbname=millrace user=postgres passfile={root / 'secrets' / 'pgpass'}"
    )
    rules = root / "ha-rules.toml"
    rules.write_text(
        '[[rule]]\nname = "ha-probe"\nmetric = "plc.oven_temp"\ndevices = "*"\n'
        'above = 500.0\nseverity = "warning"\n'
    )
    done = subprocess.run(
        _millrace("alerts", "apply", "--dsn", standby_first, str(rules)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 added" in done.stdout
    with psycopg.connect(_superuser(status)) as conn:
        row = conn.execute("SELECT count(*) FROM alert_rules WHERE name = 'ha-probe'").fetchone()
    assert row == (1,)


def _cmd_config(root: Path, status: dict) -> Path:
    """A [broker] table naming both brokers, with the operator's service identity."""
    pki = root / "pki"
    hosts = ", ".join(f'"{b.removeprefix("mqtts://")}"' for b in status["brokers"])
    path = root / "operator-cmd.toml"
    path.write_text(
        f'[broker]\nhosts = [{hosts}]\nca = "{pki / "ca.crt"}"\n'
        f'cert = "{pki / "issued" / "operator.crt"}"\nkey = "{pki / "issued" / "operator.key"}"\n'
    )
    return path


def _ping(config: Path, gateway: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _millrace("cmd", gateway, "ping", "--config", str(config), "--timeout", "30"),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cmd_reaches_each_gateway_through_whichever_broker_it_is_on(ha_plant) -> None:
    root, status = ha_plant
    config = _cmd_config(root, status)
    for gateway in (f"gw{i:04d}" for i in range(1, GATEWAYS + 1)):  # gw0004 is on broker-2
        done = _ping(config, gateway)
        assert done.returncode == 0, done.stdout + done.stderr
        reply = json.loads(done.stdout)
        assert reply["ok"] and reply["result"]["device"] == gateway
        assert reply["duplicate"] is False  # sent through both brokers, applied once


def test_windows_keep_landing_after_sigkill_of_a_broker_and_the_primary(ha_plant) -> None:
    root, status = ha_plant
    dsn = _superuser(status)
    gateways = {f"gw{i:04d}" for i in range(1, GATEWAYS + 1)}
    _wait(lambda: _latest_window_per_gateway(dsn).keys() >= gateways, "windows of every gateway")
    services = {s["name"]: s for s in status["services"]}
    nodes = {n["role"]: n for n in _status(root)["database_nodes"]}
    old_primary = nodes["primary"]
    pid = int((Path(old_primary["datadir"]) / "postmaster.pid").read_text().splitlines()[0])

    killed_at = datetime.now(UTC)
    os.kill(int(services["broker"]["pid"]), signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)

    _wait(
        lambda: _roles(root).get(nodes["replica"]["name"]) == "primary",
        "the replica to be promoted",
    )

    def all_after_kill() -> bool:
        try:
            latest = _latest_window_per_gateway(dsn)
        except psycopg.OperationalError:
            return False
        return all(gateway in latest and latest[gateway] > killed_at for gateway in gateways)

    _wait(all_after_kill, "windows that began after the kill, from every gateway")
    assert _status(root)["status"] == "degraded"  # the killed broker is shown DOWN
    # The surviving broker carries every gateway now; a command still reaches them.
    done = _ping(_cmd_config(root, status), "gw0001")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cannot reach the broker" in done.stderr  # the dead one is named, then skipped


def test_down_stops_everything_and_leaves_no_process(ha_plant) -> None:
    root, _ = ha_plant
    done = subprocess.run(
        _millrace("down", "--root", str(root)), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "patroni-pg0" in done.stdout and "etcd" in done.stdout
    assert _processes_under(root) == []
    assert _status(root)["status"] == "stopped"
