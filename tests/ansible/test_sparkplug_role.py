"""The sparkplug role's config tasks rendered into a temporary prefix, and the result
loaded by the host's real loader (no systemd, no release: the ingest role's tests cover those)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from millrace.cloud.sparkplug.config import load_config
from tests.ansible.rollout_support import local_inventory, run_playbook
from tests.fixtures.fix_broker import PKIFixture

pytestmark = [pytest.mark.ansible, pytest.mark.integration]

HOST = "spb-role-test"
CERT_ID = f"sparkplug-{HOST}"
PLAYBOOK = """\
- name: Render the Sparkplug host's config
  hosts: ingest
  gather_facts: false
  tasks:
    - name: Run the sparkplug role's config tasks
      ansible.builtin.include_role:
        name: sparkplug
        tasks_from: config.yml
"""


@pytest.mark.security
def test_sparkplug_role_renders_a_config_the_loader_accepts_with_every_broker(
    test_pki: PKIFixture, tmp_path: Path
) -> None:
    test_pki.issue(CERT_ID, role="service")
    root = tmp_path / "root"
    playbook = tmp_path / "sparkplug.yml"
    playbook.write_text(PLAYBOOK)
    extra_vars = {
        "sparkplug_root": str(root),
        "sparkplug_manage_user": False,
        "sparkplug_manage_service": False,
        "sparkplug_pki_dir": str(test_pki.dir),
        "sparkplug_secrets_dir": str(tmp_path / "secrets"),
        "sparkplug_db_host": "db.plant.example",
        "sparkplug_db_sslmode": "disable",
        "sparkplug_broker_hosts": ["mqtt1.plant.example:8883", "mqtt2.plant.example:8883"],
        "sparkplug_groups": ["line1"],
        "sparkplug_config_extra": "grace_ms = 5000",
    }
    inventory = local_inventory(tmp_path / "hosts.json", {"ingest": [HOST]})
    # One run (a second for idempotency would double the test's ~16 s).
    run = run_playbook(str(playbook), inventory, extra_vars, tmp_path=tmp_path)
    assert run.rc == 0 and run.count(HOST, "failed") == 0, run.output[-4000:]
    assert "postgresql://ingest:" not in run.output  # the DSN is no_log

    etc = root / "etc/millrace-sparkplug"
    config = load_config(etc / "sparkplug.toml")
    assert config.broker.endpoints == (
        ("mqtt1.plant.example", 8883),
        ("mqtt2.plant.example", 8883),
    )
    assert config.host_id == CERT_ID  # the certificate's CN, as the broker binds it
    assert config.broker.key == etc / "pki/service.key"
    assert stat.S_IMODE(config.broker.key.stat().st_mode) == 0o600
    assert stat.S_IMODE((etc / "sparkplug.dsn").stat().st_mode) == 0o600
    assert config.dsn.startswith("postgresql://ingest:")
    assert config.dsn.endswith("@db.plant.example:5432/millrace?sslmode=disable")
    assert (config.groups, config.grace_ms) == (("line1",), 5000)
    assert (config.http.host, config.http.port) == ("127.0.0.1", 9465)
