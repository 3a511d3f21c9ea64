"""`millrace up | status | down`: the plant comes up, holds data, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

pytestmark = pytest.mark.e2e

GATEWAYS = 3
# Generous bounds on waiting, not performance assertions: the issue promises data within 2 min.
DATA_WAIT_SECONDS = 120.0
EXIT_WAIT_SECONDS = 90.0


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _free_block(size: int) -> int:
    """A base port with `size` free consecutive ports after it (for the simulated PLCs)."""
    for base in range(30000, 60000, 97):
        if all(_port_free(base + i) for i in range(size)):
            return base
    raise AssertionError("no block of free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _millrace(*args: str) -> list[str]:
    return [sys.executable, "-m", "millrace.cli", *args]


def _port_args() -> list[str]:
    broker, pg, dash, local_mqtt, http = _free_ports(5)
    return [
        "--broker-port",
        str(broker),
        "--postgres-port",
        str(pg),
        "--dashboard-port",
        str(dash),
        "--gateway-mqtt-port",
        str(local_mqtt),
        "--ingest-http-port",
        str(http),
        "--modbus-base-port",
        str(_free_block(GATEWAYS + 1)),  # + gw0001's OPC UA PLC
    ]


def _status(root: Path) -> dict:
    done = subprocess.run(
        _millrace("status", "--root", str(root), "--json"), capture_output=True, text=True
    )
    return json.loads(done.stdout)


def _processes_under(root: Path) -> list[str]:
    """Command lines of live processes that mention the plant's directory."""
    found = []
    needle = str(root.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != "Z":
            found.append(cmdline)
    return found


def _readings_per_gateway(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT d.name, count(*) FROM readings r JOIN devices d ON d.id = r.device_id "
            "GROUP BY d.name"
        ).fetchall()
    return {name: count for name, count in rows}


def _wait_for_rtu_readings(dsn: str, prefix: str = "rtu") -> int:
    """Readings of the one gateway that also reads a PLC over Modbus RTU (a pty bus), or
    with prefix "opcua" over OPC UA."""
    deadline = time.monotonic() + DATA_WAIT_SECONDS
    count = 0
    while time.monotonic() < deadline:
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM readings r JOIN metrics m ON m.id = r.metric_id "
                "JOIN devices d ON d.id = r.device_id WHERE m.name LIKE %s",
                (f"{prefix}.%",),
            ).fetchone()
        count = row[0] if row else 0
        if count:
            return int(count)
        time.sleep(2)
    raise AssertionError(f"no {prefix}.* readings after {DATA_WAIT_SECONDS} s")


def _assert_no_service_dsn_is_a_superuser(root: Path) -> None:
    """Every DSN the ingest worker is handed (database, retention) is a non-superuser's, 0600."""
    ingest = tomllib.loads((root / "ingest.toml").read_text())
    dsn_files = [Path(ingest["database"]["dsn_file"]), Path(ingest["retention"]["dsn_file"])]
    for dsn_file in dsn_files:
        assert dsn_file.stat().st_mode & 0o777 == 0o600, dsn_file
        with psycopg.connect(dsn_file.read_text().strip()) as conn:
            row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            assert row.fetchone() == (False,), dsn_file
    for secret in (root / "secrets").iterdir():
        assert secret.stat().st_mode & 0o777 == 0o600, secret


def _wait_for_every_gateway(dsn: str) -> dict[str, int]:
    deadline = time.monotonic() + DATA_WAIT_SECONDS
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            counts = _readings_per_gateway(dsn)
        except psycopg.OperationalError:
            counts = {}
        if len(counts) == GATEWAYS:
            return counts
        time.sleep(2)
    raise AssertionError(f"not every gateway has readings after {DATA_WAIT_SECONDS} s: {counts}")


@pytest.fixture
def plant_root() -> Iterator[Path]:
    """Not pytest's tmp_path: as root, PostgreSQL runs as `postgres`, who must reach the data."""
    base = Path(tempfile.mkdtemp(prefix="millrace-plant-"))
    base.chmod(0o755)
    try:
        yield base / "plant"
    finally:
        subprocess.run(_millrace("down", "--root", str(base / "plant")), capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _assert_issue_and_revoke_reach_the_running_broker(root: Path, status: dict) -> None:
    """`millrace up` records its broker in the PKI: issue and revoke sync it themselves."""
    pki_dir = str(root / "pki")
    where = "localhost:" + status["broker"].rsplit(":", 1)[1]
    issued = subprocess.run(
        _millrace("pki", "issue", "--pki", pki_dir, "late-gw"), capture_output=True, text=True
    )
    assert issued.returncode == 0, issued.stderr
    assert f"broker: {where} added late-gw" in issued.stdout, issued.stdout + issued.stderr
    revoked = subprocess.run(
        _millrace("pki", "revoke", "--pki", pki_dir, "late-gw"), capture_output=True, text=True
    )
    assert revoked.returncode == 0, revoked.stderr
    assert f"broker: {where} removed late-gw" in revoked.stdout, revoked.stdout + revoked.stderr
    assert "reloaded" in revoked.stdout


def test_up_status_down_leaves_nothing_and_reuses_state(plant_root: Path) -> None:
    root = plant_root
    ports = _port_args()
    up = subprocess.Popen(  # a relative --root, as `make up` uses (.millrace)
        _millrace("up", "--root", root.name, "--devices", str(GATEWAYS), "--period", "2", *ports),
        cwd=root.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        assert up.stdout is not None
        for line in up.stdout:
            lines.append(line)
            if "Ctrl-C stops the plant" in line:
                break
        assert up.poll() is None, "".join(lines)
        status = _status(root)
        assert {"dsn", "broker", "dashboard"} <= status.keys()
        assert status["status"] == "running", "".join(lines)
        assert status["broker"].startswith("mqtts://")  # TLS only
        password = Path(status["login"]["password_file"]).read_text().strip()
        assert password in "".join(lines)  # the login is printed for the person at the terminal
        assert Path(status["login"]["password_file"]).stat().st_mode & 0o777 == 0o600

        counts = _wait_for_every_gateway(status["superuser_dsn"])
        assert all(count > 0 for count in counts.values())
        assert _wait_for_rtu_readings(status["superuser_dsn"]) > 0  # `up` shows an RTU PLC
        assert _wait_for_rtu_readings(status["superuser_dsn"], "opcua") > 0  # and an OPC UA one
        # The Sparkplug B host runs in every plant and is still up once gateways have landed.
        running = {s["name"]: s["running"] for s in _status(root)["services"]}
        assert running.get("sparkplug") is True, running
        with urllib.request.urlopen(status["dashboard_health"], timeout=10) as response:
            assert response.status == 200
            assert response.read().strip() == b"ok"
        # The dashboard's DSN is its least-privilege login: it can read but not write readings.
        with psycopg.connect(status["dsn"]) as conn:
            assert conn.execute("SELECT count(*) FROM readings").fetchone()[0] > 0
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("DELETE FROM readings")
        _assert_no_service_dsn_is_a_superuser(root)
        _assert_issue_and_revoke_reach_the_running_broker(root, status)
        ca_before = (root / "pki" / "ca.crt").read_bytes()
    finally:
        up.send_signal(signal.SIGINT)  # what Ctrl-C does
        up.wait(timeout=EXIT_WAIT_SECONDS)
    assert up.returncode == 0
    assert _processes_under(root) == []
    assert _status(root)["status"] == "stopped"

    # A second `up` reuses the state: same CA, the data of the first run is still there.
    done = subprocess.run(
        _millrace("up", "--root", str(root), "--devices", str(GATEWAYS), "--detach", *ports),
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        assert (root / "pki" / "ca.crt").read_bytes() == ca_before
        status = _status(root)
        assert sum(_readings_per_gateway(status["superuser_dsn"]).values()) >= sum(counts.values())
        assert all(service["running"] for service in status["services"])
    finally:
        down = subprocess.run(
            _millrace("down", "--root", str(root)), capture_output=True, text=True
        )
    assert down.returncode == 0, down.stderr
    assert "postgres" in down.stdout
    assert _processes_under(root) == []


def test_up_refuses_a_busy_port_with_the_flag_to_change(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            _millrace(
                "up", "--root", str(tmp_path / "p"), "--detach", "--dashboard-port", str(port)
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    assert f"port {port} is in use; choose another with --dashboard-port" in done.stderr
    assert "Traceback" not in done.stderr
    assert _processes_under(tmp_path / "p") == []
