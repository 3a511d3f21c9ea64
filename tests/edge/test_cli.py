"""`millrace edge check|run` as a user runs them: clear one-line errors, exit codes, values."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.edge.agent_helpers import MILLRACE
from tests.edge.test_drivers import w1_text

BASE = """
device_id = "dev-cli"
[broker]
host = "localhost"
port = {port}
ca = "ca.crt"
cert = "dev.crt"
key = "dev.key"
[windows]
period_s = 1
grace_s = 0.2
[outbox]
path = "outbox.sqlite"
[heartbeat]
interval_s = 1
[state]
dir = "state"
"""


def run(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MILLRACE), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def write(tmp_path: Path, signals: str, *, port: int = 1) -> Path:
    for name in ("ca.crt", "dev.crt", "dev.key"):
        (tmp_path / name).write_text("placeholder\n")
    path = tmp_path / "edge.toml"
    path.write_text(BASE.format(port=port) + signals)
    return path


@pytest.mark.parametrize("action", ["run", "check"])
def test_malformed_config_gives_one_line_naming_the_key_and_exit_2(
    tmp_path: Path, action: str
) -> None:
    config = write(
        tmp_path,
        """
[[signals]]
metric = "a"
driver = "sim"
[[signals]]
metric = "b"
driver = "sim"
scale = "ten"
""",
    )
    done = run("edge", action, "--config", str(config))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "signals[1].scale: expected a number" in lines[0]
    assert "Traceback" not in done.stderr + done.stdout


def test_missing_certificate_is_a_config_error(tmp_path: Path) -> None:
    config = write(tmp_path, '[[signals]]\nmetric = "a"\ndriver = "sim"\n')
    (tmp_path / "dev.key").unlink()
    done = run("edge", "run", "--config", str(config))
    assert done.returncode == 2
    assert "broker.key: file not found" in done.stderr
    assert "Traceback" not in done.stderr


def test_check_reads_every_signal_once_and_prints_value_and_unit(tmp_path: Path) -> None:
    (tmp_path / "w1_slave").write_text(w1_text(21.5))
    (tmp_path / "bad_w1").write_text(w1_text(21.5, corrupt=True))
    config = write(
        tmp_path,
        """
[[signals]]
metric = "room.temp"
driver = "file"
path = "w1_slave"
format = "w1_slave"
unit = "degC"

[[signals]]
metric = "cpu.temp"
driver = "command"
command = ["echo", "48312"]
scale = 0.001
unit = "degC"

[[signals]]
metric = "demo.level"
driver = "sim"
wave = "constant"
center = 3.5
unit = "m"

[[signals]]
metric = "bad.temp"
driver = "file"
path = "bad_w1"
format = "w1_slave"
""",
    )
    # The plant broker is another test's subject (tests/edge/test_check_broker.py).
    done = run("edge", "check", "--config", str(config), "--no-broker")
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert "room.temp" in out and "21.5 degC  ok" in out
    assert "48.312 degC  ok" in out
    assert "3.5 m  ok" in out
    assert "bad.temp" in out and "FAILED: w1_slave: CRC mismatch" in out
    assert "1 of 4 signal(s) could not be read" in out
    (tmp_path / "bad_w1").write_text(w1_text(20.0))
    assert run("edge", "check", "--config", str(config), "--no-broker").returncode == 0


def test_systemd_readiness_watchdog_and_stopping(tmp_path: Path) -> None:
    config = write(tmp_path, '[[signals]]\nmetric = "a"\ndriver = "sim"\n')
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(15)
    # No broker listens on port 1: the agent must still become ready and keep sampling.
    proc = subprocess.Popen(
        [str(MILLRACE), "edge", "run", "--config", str(config)],
        env={**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        messages = [sock.recv(4096).decode() for _ in range(3)]
        assert messages[0].startswith("READY=1")
        assert messages[1:] == ["WATCHDOG=1", "WATCHDOG=1"]
        proc.terminate()
        deadline = time.monotonic() + 20
        while "STOPPING=1" not in messages and time.monotonic() < deadline:
            messages.append(sock.recv(4096).decode())
        assert "STOPPING=1" in messages
        assert proc.wait(20) == 0
        assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()


def test_a_second_agent_on_the_same_state_directory_is_refused(tmp_path: Path) -> None:
    config = write(tmp_path, '[[signals]]\nmetric = "a"\ndriver = "sim"\n')
    first = subprocess.Popen(
        [str(MILLRACE), "edge", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while not (tmp_path / "outbox.sqlite").exists():
            assert time.monotonic() < deadline, "first agent did not start"
            time.sleep(0.05)
        second = run("edge", "run", "--config", str(config))
        assert second.returncode == 2
        assert "another edge agent is running" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.terminate()
        assert first.wait(20) == 0


@pytest.mark.parametrize("wait", ["-1", "nan", "inf", "soon", "99999"])
def test_mqtt_wait_nonsense_is_a_usage_error(wait: str, tmp_path: Path) -> None:
    config = write(tmp_path, '[[signals]]\nmetric = "a"\ndriver = "sim"\n')
    done = run("edge", "check", "--config", str(config), f"--mqtt-wait={wait}")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "argument --mqtt-wait" in done.stderr
    assert "config ok" not in done.stdout


LOCAL_MQTT = """
[local_mqtt.nodes]
host = "localhost"
port = 1
username = "gw"
{extra}
[[signals]]
metric = "plug.power"
driver = "mqtt"
source = "nodes"
topic = "tele/plug/SENSOR"
"""


@pytest.mark.parametrize("action", ["run", "check"])
@pytest.mark.parametrize(
    ("extra", "key", "problem"),
    [
        ('password_file = "nope.pw"', "local_mqtt.nodes.password_file", "file not found"),
        ('ca = "nope-ca.crt"', "local_mqtt.nodes.ca", "file not found"),
        ('password_file = "empty.pw"', "local_mqtt.nodes.password_file", "/empty.pw is empty"),
        ('ca = "garbage.crt"', "local_mqtt.nodes.ca", "cannot use it"),
    ],
)
def test_local_mqtt_missing_or_bad_file_is_a_one_line_config_error(
    action: str, extra: str, key: str, problem: str, tmp_path: Path
) -> None:
    (tmp_path / "empty.pw").write_text("")
    (tmp_path / "garbage.crt").write_text("not a certificate\n")
    config = write(tmp_path, LOCAL_MQTT.format(extra=extra))
    done = run("edge", action, "--config", str(config), timeout=30)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"millrace: error: {config}: {key}: ")
    assert problem in lines[0]
    assert "Traceback" not in done.stderr


SIM_SIGNAL = '[[signals]]\nmetric = "a"\ndriver = "sim"\n'


def test_config_discovery_from_the_environment_variable(tmp_path: Path) -> None:
    config = write(tmp_path, SIM_SIGNAL)
    done = run("edge", "check", "--no-broker", env={"MILLRACE_EDGE_CONFIG": str(config)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "config ok: device dev-cli, 1 signal(s)" in done.stdout
    missing = run("edge", "check", env={"MILLRACE_EDGE_CONFIG": str(tmp_path / "nope.toml")})
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        f"millrace: error: MILLRACE_EDGE_CONFIG: file not found: {tmp_path / 'nope.toml'}"
    )


def test_config_discovery_flag_wins_over_the_environment(tmp_path: Path) -> None:
    config = write(tmp_path, SIM_SIGNAL)
    done = run(
        "edge",
        "check",
        "--config",
        str(config),
        "--no-broker",
        env={"MILLRACE_EDGE_CONFIG": "/nonexistent"},
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_config_discovery_default_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import millrace.edge.cli as edge_cli
    from millrace.cli import main

    monkeypatch.delenv("MILLRACE_EDGE_CONFIG", raising=False)
    monkeypatch.setattr(edge_cli, "DEFAULT_CONFIG_PATH", tmp_path / "agent.toml")
    assert main(["edge", "check"]) == 2
    err = capsys.readouterr().err
    assert "--config: not given, $MILLRACE_EDGE_CONFIG is not set" in err
    assert str(tmp_path / "agent.toml") in err
    write(tmp_path, SIM_SIGNAL).rename(tmp_path / "agent.toml")
    assert main(["edge", "check", "--no-broker"]) == 0
    assert "config ok: device dev-cli" in capsys.readouterr().out


def test_check_json_reports_every_check_and_signal(tmp_path: Path) -> None:
    (tmp_path / "bad_w1").write_text(w1_text(21.5, corrupt=True))
    config = write(
        tmp_path,
        """
[[signals]]
metric = "cpu.temp"
driver = "command"
command = ["echo", "48312"]
scale = 0.001
unit = "degC"

[[signals]]
metric = "door.open"
driver = "sim"
kind = "state"
wave = "constant"
center = 1

[[signals]]
metric = "bad.temp"
driver = "file"
path = "bad_w1"
format = "w1_slave"
""",
    )
    done = run("edge", "check", "--config", str(config), "--json", "--no-broker")
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is False and report["exit_code"] == 1
    assert report["device_id"] == "dev-cli" and report["config"] == str(config)
    assert report["checks"] == [
        {"check": "config", "ok": True, "problem": None},
        {"check": "broker", "ok": True, "mode": "skipped", "problem": None},
        {"check": "signals", "ok": False, "problem": "1 of 3 signal(s) could not be read"},
    ]
    cpu, door, bad = report["signals"]
    assert cpu == {
        "metric": "cpu.temp",
        "driver": "command",
        "kind": "numeric",
        "unit": "degC",
        "value": 48.312,
        "ok": True,
        "problem": None,
    }
    assert door["value"] is True and door["ok"] is True
    assert bad["ok"] is False and bad["value"] is None
    assert bad["problem"] == "w1_slave: CRC mismatch"


def test_check_json_config_error(tmp_path: Path) -> None:
    config = write(tmp_path, '[[signals]]\nmetric = "a"\ndriver = "sim"\nscale = "x"\n')
    done = run("edge", "check", "--config", str(config), "--json")
    assert done.returncode == 2
    report = json.loads(done.stdout)
    assert report["ok"] is False and report["exit_code"] == 2 and report["signals"] == []
    assert report["checks"] == [
        {
            "check": "config",
            "ok": False,
            "key": "signals[0].scale",
            "problem": "expected a number, got the string 'x'",
        }
    ]
    assert len(done.stderr.strip().splitlines()) == 1
