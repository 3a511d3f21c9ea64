"""Issuing or revoking an identity updates the running broker at once (no restart).

Against the real mosquitto with the dynamic-security plugin and the project's config:
`millrace pki revoke` kicks the live session and, on a broker recorded with its pid (as
`millrace up` records its own), makes it re-read crl.pem so the next connection is
refused; `millrace provision` gives a new device its role so it connects and publishes.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from millrace.errors import ConfigError, MillraceError
from millrace.ops import broker_live, broker_sync
from tests.ansible.rollout_support import offline_agent_wheel
from tests.fixtures.fix_broker import ADMIN_ID, RELOAD_LOG_LINE, MosquittoServer, PKIFixture
from tests.millrace.test_broker_acl import NOT_AUTHORIZED, Acks, Inbox, attempt, client_context

WAIT_SECONDS = 10.0
# Any limit shows it: the broker's count of its heap wraps below zero (docs/security.md).
MEMORY_LIMIT_BYTES = 64 * 2**30
Connect = Callable[..., paho.Client]


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "millrace.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _private(tmp_path: Path, broker_factory: Callable[..., MosquittoServer]) -> MosquittoServer:
    """A broker of its own PKI: no other test's `pki revoke` reaches it through the record."""
    own = PKIFixture(tmp_path / "pki")
    own.issue("svc-w", role="service")
    return broker_factory(pki=own)


@pytest.mark.security
def test_revoke_kicks_the_session_and_refuses_the_next_connection_without_restart(
    tmp_path: Path, broker_factory: Callable[..., MosquittoServer], mqtt_connect: Connect
) -> None:
    server = _private(tmp_path, broker_factory)
    pid = server.pid
    assert pid is not None
    # What `millrace up` records for its own broker.
    target = broker_live.BrokerTarget(
        host=server.host, port=server.port, admin=ADMIN_ID, pid=pid, conf=str(server.conf_path)
    )
    broker_live.remember(server.pki.dir, target)
    device = _unique("dev-rev")
    server.pki.issue(device)
    live = mqtt_connect(_unique(device), device, server=server)
    assert not Acks(live).publish(f"millrace/v1/d/{device}/data", b"x").is_failure
    context = client_context(server.ca, device, server.pki.dir)
    assert attempt(server, context) == "accepted"
    reloads = server.log_text().count(RELOAD_LOG_LINE)

    result = _cli("pki", "revoke", "--pki", str(server.pki.dir), device)

    assert result.returncode == 0, result.stderr
    assert f"broker: {server.host}:{server.port} removed {device}" in result.stdout
    assert "reloaded" in result.stdout
    assert server.pid == pid and server.running  # no restart
    _wait(lambda: not live.is_connected(), "the revoked device's session to be kicked")
    # The SIGHUP is handled in the broker's loop: wait for its log line, then connect.
    _wait(lambda: server.log_text().count(RELOAD_LOG_LINE) > reloads, "the CRL reload")
    assert attempt(server, context).startswith("refused")
    assert attempt(server, client_context(server.ca, "svc-w", server.pki.dir)) == "accepted"


@pytest.mark.security
def test_provision_lets_the_new_device_connect_and_publish_without_restart(
    tmp_path: Path, broker_factory: Callable[..., MosquittoServer], mqtt_connect: Connect
) -> None:
    server = _private(tmp_path, broker_factory)
    pid = server.pid
    watcher = mqtt_connect(_unique("svc-w"), "svc-w", server=server)
    inbox, watcher_acks = Inbox(watcher), Acks(watcher)
    assert not watcher_acks.subscribe("millrace/v1/d/+/data").is_failure
    device = _unique("dev-new")
    (tmp_path / "wheel").mkdir()
    wheel = offline_agent_wheel(tmp_path / "wheel")  # zipped from the checkout: no pip

    result = _cli(
        "provision", device, "--pki", str(server.pki.dir), "--out", str(tmp_path / "b.tar.gz"),
        "--broker", f"{server.host}:{server.port}", "--wheel", str(wheel),
        "--broker-admin", f"{ADMIN_ID}@{server.host}:{server.port}",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert f"broker: {server.host}:{server.port} added {device}" in result.stdout
    client = Acks(mqtt_connect(_unique(device), device, server=server))
    marker = _unique("hello").encode()
    assert not client.publish(f"millrace/v1/d/{device}/data", marker).is_failure
    inbox.wait_for(marker)
    # Its own topics only: the role is the device's, not more.
    assert client.publish("millrace/v1/d/other/data", b"x").value == NOT_AUTHORIZED
    assert server.pid == pid


@pytest.mark.security
def test_issue_without_a_known_broker_says_to_run_broker_sync(tmp_path: Path) -> None:
    own = PKIFixture(tmp_path / "pki")
    result = _cli("pki", "issue", "--pki", str(own.dir), "dev-x")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "broker" in line]
    assert len(notes) == 1 and "millrace broker sync" in notes[0], result.stderr


@pytest.mark.security
def test_revoke_with_an_unreachable_broker_says_so_in_one_line_and_exits_3(
    tmp_path: Path,
) -> None:
    own = PKIFixture(tmp_path / "pki")
    own.issue("dev-x")
    port = 1  # nothing listens on port 1 of the loopback
    result = _cli(
        "pki", "revoke", "--pki", str(own.dir), "dev-x",
        "--broker-admin", f"{ADMIN_ID}@127.0.0.1:{port}",
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "revoked dev-x" in result.stdout  # the PKI change stands
    (note,) = [line for line in result.stderr.splitlines() if "broker" in line]
    assert "NOT updated" in note and "millrace broker sync" in note and "Traceback" not in note


def test_a_recorded_broker_is_used_unless_no_broker_sync(tmp_path: Path) -> None:
    own = PKIFixture(tmp_path / "pki")
    # Recorded as by `broker sync --remember`; nothing listens on port 1 of the loopback.
    broker_live.remember(own.dir, broker_live.BrokerTarget("127.0.0.1", 1, ADMIN_ID))
    tried = _cli("pki", "issue", "--pki", str(own.dir), "dev-x")
    assert tried.returncode == 3 and "127.0.0.1:1 NOT updated" in tried.stderr, tried.stderr
    skipped = _cli("pki", "issue", "--pki", str(own.dir), "dev-y", "--no-broker-sync")
    assert skipped.returncode == 0, skipped.stderr
    assert "not updated (--no-broker-sync)" in skipped.stdout


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("operator@broker.plant.example", ("broker.plant.example", 8883, "operator")),
        ("operator@localhost:18883", ("localhost", 18883, "operator")),
        ("op@[::1]:9000", ("::1", 9000, "op")),
    ],
)
def test_broker_admin_option_parses(spec: str, expected: tuple[str, int, str]) -> None:
    target = broker_live.parse_admin_spec(spec)
    assert (target.host, target.port, target.admin) == expected


@pytest.mark.parametrize("spec", ["localhost:8883", "op@", "@host", "op@host:0", "BAD ID@host"])
def test_broker_admin_option_refuses_with_the_key(spec: str) -> None:
    with pytest.raises(ConfigError) as caught:
        broker_live.parse_admin_spec(spec)
    assert caught.value.key == "--broker-admin" and "ID@HOST" in caught.value.problem


def test_a_stale_local_record_is_not_signalled(tmp_path: Path) -> None:
    """A recorded pid that is not that mosquitto (reused, or the plant is down) is left alone."""
    own = PKIFixture(tmp_path / "pki")
    target = broker_live.BrokerTarget("localhost", 1, ADMIN_ID, pid=1, conf="/nowhere.conf")
    broker_live.remember(own.dir, target)
    assert broker_live.known_target(own.dir) == target

    def never(*_a: object, **_k: object) -> None:
        raise AssertionError("a broker that is not running was contacted")

    outcome = broker_live.apply_change(own.dir, revoked=True, sync=never)
    assert outcome.applied and outcome.known and "not running" in outcome.lines[0]


def _role_churn(server: MosquittoServer, pki_dir: Path, *, batches: int) -> None:
    """Batches of 20 dynsec commands (create and delete a role) over $CONTROL."""
    control = broker_sync._Control(server.host, server.port, pki_dir, ADMIN_ID)
    try:
        for batch in range(batches):
            commands = [
                {"command": verb, "rolename": f"tmp-{batch}-{i}"}
                for i in range(10)
                for verb in ("createRole", "deleteRole")
            ]
            try:
                control.run(commands)
            except MillraceError:
                return
    finally:
        control.close()


@pytest.mark.security
def test_memory_limit_stays_off_because_mosquitto_miscounts_dynsec_frees(
    tmp_path: Path, broker_factory: Callable[..., MosquittoServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why mosquitto.conf has no memory_limit (docs/security.md, "Broker configuration").

    mosquitto 2.0.11's dynsec plugin frees strings cJSON allocated with plain malloc
    through mosquitto_free (dynsec__config_save, after every command), which subtracts
    them from the broker's heap count; the unsigned count wraps, and with any
    memory_limit every later allocation fails: admin commands go unanswered and new
    connections are reset. If this test fails, the installed mosquitto has the fix
    (upstream PR #3287): memory_limit may then go into the template.
    """
    own = PKIFixture(tmp_path / "pki")
    own.issue("dev-a")
    server = broker_factory(pki=own)
    assert not any(
        line.startswith("memory_limit") for line in server.conf_path.read_text().splitlines()
    )
    context = client_context(own.ca, "dev-a", own.dir)
    # Without a limit the same role changes are harmless (the count is only compared to it).
    _role_churn(server, own.dir, batches=1)
    assert attempt(server, context) == "accepted"
    assert "out of memory" not in server.log_text()
    server.stop()
    render = server._write_config

    def with_memory_limit() -> Path:
        conf = render()
        conf.write_text(conf.read_text() + f"\nmemory_limit {MEMORY_LIMIT_BYTES}\n")
        return conf

    monkeypatch.setattr(server, "_write_config", with_memory_limit)
    server.start()
    assert attempt(server, context) == "accepted"
    monkeypatch.setattr(broker_sync, "TIMEOUT_SECONDS", 3.0)
    _role_churn(server, own.dir, batches=5)  # 2.0.11 stops answering within the first
    assert "out of memory" in server.log_text()
    assert attempt(server, context).startswith("refused")
