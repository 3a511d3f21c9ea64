"""`edge check` asks the plant broker whether it accepts the device's credentials.

issue 14: the check never connected to the plant broker, so a canary with a mismatched
key, a wrong CA or a wrong broker name passed the rollout's health gate. Each failure
below is one the check must catch (exit 1, one line naming the fix); the broker is the
project's own TLS + ACL config with the production client id rule (id = certificate CN).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from millrace.ops import pki
from tests.edge.agent_helpers import MILLRACE, SIM_SIGNALS, AgentProcess, Forwarder
from tests.fixtures.fix_broker import MosquittoServer, PKIFixture, free_port

pytestmark = pytest.mark.integration

DEVICE = "dev-chk"
REVOKED = "dev-chk-revoked"


@pytest.fixture(scope="module")
def plant(
    test_pki: PKIFixture, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MosquittoServer]:
    """A broker with the production setting: the client id is the certificate's name."""
    test_pki.issue(DEVICE)
    test_pki.issue(REVOKED)
    pki.revoke(test_pki.dir, REVOKED)
    server = MosquittoServer(
        test_pki, tmp_path_factory.mktemp("plant"), clientid_from_certificate=True
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> PKIFixture:
    """Another plant's CA, with a certificate for the same device name."""
    other = PKIFixture(tmp_path_factory.mktemp("other-pki"))
    other.issue(DEVICE)
    return other


def write(
    tmp_path: Path,
    plant: MosquittoServer,
    *,
    host: str | None = None,
    port: int | None = None,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
) -> Path:
    own_cert, own_key = plant.pki.files(DEVICE)
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""
device_id = "{DEVICE}"
[broker]
host = "{host or plant.host}"
port = {port or plant.port}
ca = "{ca or plant.ca}"
cert = "{cert or own_cert}"
key = "{key or own_key}"
reconnect_min_s = 0.2
reconnect_max_s = 1.0
[windows]
period_s = 1
grace_s = 0.2
[outbox]
path = "{tmp_path / "outbox.sqlite"}"
[heartbeat]
interval_s = 1
[state]
dir = "{tmp_path / "state"}"
{SIM_SIGNALS}
"""
    )
    return path


def check(config: Path, *extra: str, prefix: tuple[str, ...] = ()) -> tuple[int, dict[str, Any]]:
    """Run `millrace edge check --json` as a user does; (exit code, the broker check)."""
    done = subprocess.run(
        [*prefix, str(MILLRACE), "edge", "check", "--config", str(config), "--json", *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    report = json.loads(done.stdout)
    assert report["exit_code"] == done.returncode
    broker = next(c for c in report["checks"] if c["check"] == "broker")
    return done.returncode, broker


def failed_with(result: tuple[int, dict[str, Any]], *words: str) -> str:
    code, broker = result
    assert code == 1 and broker["ok"] is False, broker
    problem = broker["problem"]
    assert "\n" not in problem and all(w in problem for w in words), problem
    return str(problem)


def test_check_connects_with_the_devices_credentials_and_gets_a_connack(
    tmp_path: Path, plant: MosquittoServer
) -> None:
    code, broker = check(write(tmp_path, plant))
    assert code == 0, broker
    assert broker["mode"] == "mqtt" and broker["why"] == "the agent is not running"
    assert broker["proven"] == "TLS handshake and CONNACK with the device's certificate"
    # The same session settings as the agent's own connection (clean start), then gone.
    log = plant.log_text()
    assert f"as {DEVICE} (p5, c1," in log
    assert f"Client {DEVICE} disconnected." in log


def test_check_fails_on_a_key_that_does_not_match_the_certificate(
    tmp_path: Path, plant: MosquittoServer
) -> None:
    _, other_key = plant.pki.files("dev-b")
    problem = failed_with(check(write(tmp_path, plant, key=other_key)), "broker.key")
    assert "does not belong to broker.cert" in problem


def test_check_fails_on_a_certificate_from_another_ca(
    tmp_path: Path, plant: MosquittoServer, other_pki: PKIFixture
) -> None:
    cert, key = other_pki.files(DEVICE)
    problem = failed_with(check(write(tmp_path, plant, cert=cert, key=key)), "broker.cert")
    assert "issued by the broker's CA" in problem


def test_check_fails_on_a_revoked_certificate(tmp_path: Path, plant: MosquittoServer) -> None:
    cert, key = plant.pki.files(REVOKED)
    config = write(tmp_path, plant, cert=cert, key=key)
    failed_with(check(config), "refused the device certificate", "not revoked")


def test_check_fails_on_a_ca_file_that_did_not_sign_the_broker(
    tmp_path: Path, plant: MosquittoServer, other_pki: PKIFixture
) -> None:
    config = write(tmp_path, plant, ca=other_pki.ca)
    failed_with(check(config), "not signed by the CA in broker.ca", "ca.crt")


def test_check_fails_on_a_broker_name_not_on_its_certificate(
    tmp_path: Path, plant: MosquittoServer
) -> None:
    # 127.0.0.2 is loopback, but not a name on the broker's certificate.
    forwarder = Forwarder("127.0.0.2", ("127.0.0.1", plant.port))
    try:
        config = write(tmp_path, plant, host="127.0.0.2", port=forwarder.port)
        failed_with(check(config), "not for '127.0.0.2' ([broker] host)")
    finally:
        forwarder.close()


def test_check_fails_on_a_broker_host_that_does_not_resolve(
    tmp_path: Path, plant: MosquittoServer
) -> None:
    # In a network namespace of its own (loopback down) no resolver can be reached.
    config = write(tmp_path, plant, host="mqtt.plant.example")
    result = check(config, prefix=("unshare", "--net"))
    failed_with(result, "'mqtt.plant.example' ([broker] host) does not resolve", "/etc/hosts")


def test_check_fails_when_the_broker_is_unreachable(tmp_path: Path, plant: MosquittoServer) -> None:
    failed_with(check(write(tmp_path, plant, port=free_port())), "cannot reach the broker")


def test_check_with_no_broker_skips_the_broker_step(tmp_path: Path, plant: MosquittoServer) -> None:
    code, broker = check(write(tmp_path, plant, port=free_port()), "--no-broker")
    assert code == 0 and broker == {
        "check": "broker",
        "ok": True,
        "mode": "skipped",
        "problem": None,
    }


def _wait_connected(state: Path, agent: AgentProcess) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            status = json.loads((state / "status.json").read_text())
        except (OSError, ValueError):
            status = {}
        if status.get("connected"):
            return dict(status)
        time.sleep(0.1)
    raise AssertionError(f"the agent never connected:\n{agent.log()}")


def test_check_beside_a_running_agent_only_shakes_hands_and_leaves_it_connected(
    tmp_path: Path, plant: MosquittoServer
) -> None:
    config = write(tmp_path, plant)
    agent = AgentProcess(config)
    agent.start()
    try:
        status = _wait_connected(tmp_path / "state", agent)
        before = plant.log_text()
        code, broker = check(config)
        assert code == 0, broker
        assert broker["mode"] == "tls" and broker["why"].startswith("the agent is running")
        assert broker["proven"] == ("TLS handshake with the device's certificate (no MQTT session)")
        assert broker["agent"]["pid"] == status["pid"] and broker["agent"]["connected"]
        # One CONNECT as the device (the agent's) and no takeover: a second CONNECT with the
        # device's certificate would have closed the agent's connection.
        during = plant.log_text()[len(before) :]
        assert f"as {DEVICE} (" not in during and "closing old connection" not in during, during
        assert agent.proc is not None and agent.proc.poll() is None, agent.log()
    finally:
        agent.stop()
