"""The broker role: it renders millrace's own broker templates, and mosquitto started from
its output enforces the same dynamic-security roles as `millrace broker config`.

The module overrides the `broker` fixture with a mosquitto whose config the role wrote
(cloud.yml against localhost, into a temporary prefix, service management off), then runs
the foundation's broker security tests against it: they are imported below, so pytest
collects them here too and they resolve `broker` to this module's fixture.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from millrace.ops import broker as broker_config
from millrace.ops import pki
from millrace.ops.broker import (
    DEVICE_COMMAND_NAMES,
    device_ids,
    render_dynsec,
    render_mosquitto_conf,
)
from tests.ansible.rollout_support import PlaybookRun, local_inventory, run_playbook
from tests.fixtures.fix_broker import ADMIN_ID, BIND_ADDRESS, MosquittoServer, PKIFixture
from tests.millrace.test_broker_acl import (  # noqa: F401 - collected here against the role
    test_certificate_from_another_ca_is_refused,
    test_device_cannot_publish_outside_its_own_topics,
    test_device_cannot_read_plant_data_or_other_devices_commands,
    test_device_publishes_own_topics_and_services_receive_plain_and_shared,
    test_device_subscribe_is_refused_in_the_suback,
    test_plain_tcp_to_the_tls_port_is_refused,
    test_service_cannot_forge_device_data_but_may_command_and_alert,
    test_tls_without_client_certificate_is_refused,
    test_valid_certificate_is_accepted_by_the_raw_probe,
)

pytestmark = [pytest.mark.ansible, pytest.mark.integration]

HOST = "mqtt-test"


class RoleBroker(MosquittoServer):
    """A MosquittoServer whose mosquitto.conf and dynsec roles come from the broker role."""

    runs: list[PlaybookRun]

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    def role_vars(self) -> dict[str, object]:
        return {
            "broker_root": str(self.root),
            "broker_pki_dir": str(self.pki.dir),
            "broker_port": self.port,
            "broker_bind_address": BIND_ADDRESS,
            "broker_log_file": str(self.log_path),
            # mosquitto run by the tests stays the current user (root here), like the fixture.
            "broker_user": "root",
            "broker_group": "root",
            "broker_install_packages": False,
            "broker_manage_service": False,
            "broker_admin_ids": [ADMIN_ID],
            "broker_dynsec_plugin": str(broker_config.find_dynsec_plugin()),
            # The imported tests run several clients per certificate, as the fixture does.
            "broker_clientid_from_certificate": self.clientid_from_certificate,
        }

    def _write_config(self) -> Path:
        if not hasattr(self, "runs"):
            self.runs = []
        inventory = local_inventory(self.workdir / "hosts.json", {"broker": [HOST]})
        run = run_playbook("cloud.yml", inventory, self.role_vars(), tmp_path=self.workdir)
        assert run.rc == 0, run.output[-4000:]
        self.runs.append(run)
        return self.root / "etc" / "mosquitto" / "mosquitto.conf"


@pytest.fixture(scope="module")
def broker(test_pki: PKIFixture, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoleBroker]:
    """mosquitto started from the broker role's files (overrides the session broker here)."""
    server = RoleBroker(test_pki, tmp_path_factory.mktemp("role-broker"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_role_renders_what_millrace_broker_config_renders(broker: RoleBroker) -> None:
    etc = broker.root / "etc" / "mosquitto"
    data = broker.root / "var" / "lib" / "mosquitto"
    expected_conf = render_mosquitto_conf(
        pki_dir=etc / "millrace-pki",
        dynsec_file=data / "dynamic-security.json",
        dynsec_plugin=broker_config.find_dynsec_plugin(),
        persistence_dir=data,
        port=broker.port,
        bind_address=BIND_ADDRESS,
        user="root",
        log_file=broker.log_path,
        clientid_from_certificate=False,
    )
    assert (etc / "mosquitto.conf").read_text() == expected_conf
    services = pki.service_ids(broker.pki.dir)
    assert "svc-test" in services
    expected = render_dynsec(
        device_ids=device_ids(broker.pki.dir), service_ids=services, admin_ids=[ADMIN_ID]
    )
    # Parsed: mosquitto may have saved the same roles back in its own layout.
    assert (
        json.loads((data / "dynamic-security.json").read_text())["roles"]
        == (json.loads(expected)["roles"])
        or (data / "dynamic-security.json").read_text() == expected
    )


def test_role_command_names_are_the_edge_agents() -> None:
    from millrace.edge.commands import COMMAND_NAMES

    assert DEVICE_COMMAND_NAMES == COMMAND_NAMES
    vars_text = Path("ansible/roles/broker/vars/main.yml").read_text()
    assert f"__broker_command_names: [{', '.join(COMMAND_NAMES)}]" in vars_text


def test_role_is_idempotent_and_keeps_the_key_private(broker: RoleBroker) -> None:
    inventory = broker.workdir / "hosts.json"
    again = run_playbook("cloud.yml", inventory, broker.role_vars(), tmp_path=broker.workdir)
    assert again.rc == 0, again.output[-4000:]
    assert again.count(HOST, "changed") == 0
    key = broker.root / "etc" / "mosquitto" / "millrace-pki" / "broker.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes() == pki.pki_paths(broker.pki.dir).broker_key.read_bytes()
    assert all("PRIVATE KEY" not in run.output for run in [*broker.runs, again])


def test_role_caps_memory_with_systemd_not_memory_limit(broker: RoleBroker) -> None:
    """mosquitto 2.0.11's memory_limit breaks with dynsec (docs/security.md): systemd caps it."""
    dropin = broker.root / "etc/systemd/system/mosquitto.service.d/millrace-memory.conf"
    assert "[Service]\nMemoryMax=1G\n" in dropin.read_text()
    conf = (broker.root / "etc" / "mosquitto" / "mosquitto.conf").read_text()
    assert not any(line.startswith("memory_limit") for line in conf.splitlines())
