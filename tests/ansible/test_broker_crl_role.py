"""The broker role keeps the CRL from lapsing: renewed on the controller when it runs
short, shipped to the broker, and a daily systemd timer on the controller does the same."""

from __future__ import annotations

from pathlib import Path

import pytest

from millrace.ops import pki
from tests.ansible.rollout_support import local_inventory, run_playbook

pytestmark = [pytest.mark.ansible, pytest.mark.integration]

HOST = "mqtt-crl"
SHORT_CRL_DAYS = 2


def _role_vars(root: Path, pki_dir: Path) -> dict[str, object]:
    return {
        "broker_root": str(root),
        "broker_pki_dir": str(pki_dir),
        "broker_port": 18999,
        "broker_user": "root",
        "broker_group": "root",
        "broker_install_packages": False,
        "broker_manage_service": False,
        "broker_crl_metrics_textfile": "/var/lib/node_exporter/millrace_crl.prom",
    }


def test_role_renews_a_crl_two_days_from_expiry_ships_it_and_installs_the_timer(
    tmp_path: Path,
) -> None:
    pki_dir = tmp_path / "pki"
    pki.init_pki(pki_dir)
    pki.renew_crl(pki_dir, days=SHORT_CRL_DAYS)
    root = tmp_path / "root"
    inventory = local_inventory(tmp_path / "hosts.json", {"broker": [HOST]})

    run = run_playbook("cloud.yml", inventory, _role_vars(root, pki_dir), tmp_path=tmp_path)
    assert run.rc == 0, run.output[-4000:]
    assert pki.crl_days_left(pki_dir) > pki.CRL_VALIDITY_DAYS - 1
    installed = root / "etc" / "mosquitto" / "millrace-pki" / "crl.pem"
    assert installed.read_bytes() == pki.pki_paths(pki_dir).crl.read_bytes()

    units = root / "etc" / "systemd" / "system"
    service = (units / "millrace-crl-renew.service").read_text()
    starts = [line for line in service.splitlines() if line.startswith("ExecStart=")]
    assert starts[0].endswith(f"millrace pki renew-crl --pki {pki_dir} --if-below 14")
    assert "--tags broker-crl" in starts[1] and "cloud.yml" in starts[1]
    assert starts[2].endswith(
        f"millrace pki crl-status --pki {pki_dir} --warn-below 14 "
        "--textfile /var/lib/node_exporter/millrace_crl.prom"
    )
    assert "OnCalendar=daily" in (units / "millrace-crl-renew.timer").read_text()

    # A fresh CRL is left alone: the second run changes nothing.
    before = pki.pki_paths(pki_dir).crl.read_bytes()
    again = run_playbook("cloud.yml", inventory, _role_vars(root, pki_dir), tmp_path=tmp_path)
    assert again.rc == 0, again.output[-4000:]
    assert again.count(HOST, "changed") == 0
    assert pki.pki_paths(pki_dir).crl.read_bytes() == before
