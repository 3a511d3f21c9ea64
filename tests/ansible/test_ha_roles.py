"""The HA roles' pieces that can run here: etcd and Patroni configs from the roles, checked
by the real programs, and the broker's open-file drop-in.

The etcd role renders a one-member cluster on loopback (TLS, client certificates required)
and etcd runs from that very file. The patroni role renders its config against it, and
Patroni 3.0's own validator must accept it (it also checks that etcd answers). A Patroni node
is not started from the role's files here: that would need a second PostgreSQL set-up on top
of the failover tests' (tests/cloud/test_db_failover.py runs the same settings for real).
"""

from __future__ import annotations

import json
import socket
import ssl
import stat
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from millrace.ops.stack import procs
from millrace.ops.stack.patroni import wait_until
from millrace.ops.stack.postgres import free_port
from tests.ansible.rollout_support import (
    ANSIBLE_DIR,
    VENV_BIN,
    PlaybookRun,
    local_inventory,
    run_playbook,
)
from tests.ansible.test_lint import _run
from tests.fixtures.fix_broker import PKIFixture

pytestmark = [pytest.mark.ansible, pytest.mark.integration]

ETCD_HOST = "localhost"  # the member's inventory name and address: on its certificate
DB_HOST = "db-test.plant.example"
DB_HOST_2 = "db-test-2.plant.example"
INGEST_HOST = "ingest-test.plant.example"
GATEWAY = "gw-ha-test"
BROKERS = (("mqtt-1.plant.example", 8883), ("mqtt-2.plant.example", 8883))
NOFILE = 4096
PLAYBOOK = """\
- name: Render the etcd member
  hosts: etcd
  gather_facts: false
  roles:
    - role: etcd

- name: Render the Patroni node
  hosts: database
  gather_facts: false
  roles:
    - role: patroni

- name: Render the ingest worker's config for the pair
  hosts: ingest
  gather_facts: false
  tasks:
    - name: Run the ingest role's config tasks
      ansible.builtin.include_role:
        name: ingest
        tasks_from: config.yml

- name: Render the dashboard's config for the pair
  hosts: dashboard
  gather_facts: false
  tasks:
    - name: Run the dashboard role's config tasks
      ansible.builtin.include_role:
        name: dashboard
        tasks_from: config.yml

- name: Render a gateway's agent config for both brokers
  hosts: gateways
  gather_facts: false
  tasks:
    - name: Run the edge_agent role's config tasks
      ansible.builtin.include_role:
        name: edge_agent
        tasks_from: config.yml

- name: Render the broker's open-file drop-in
  hosts: broker
  gather_facts: false
  tasks:
    - name: Run the broker role's open-file tasks
      ansible.builtin.include_role:
        name: broker
        tasks_from: nofile.yml
"""


@dataclass
class HaRun:
    root: Path
    secrets: Path
    tls: Path
    run: PlaybookRun
    etcd_url: str


def _self_signed(tls: Path) -> None:
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2"]
    subject = ["-subj", f"/CN={ETCD_HOST}", "-addext", f"subjectAltName=DNS:{ETCD_HOST}"]
    out = ["-keyout", str(tls / "node.key"), "-out", str(tls / "node.crt")]
    subprocess.run(
        ["openssl", "req", "-x509", *key, *subject, *out],
        check=True,
        capture_output=True,
        timeout=60,
    )


def _healthy(url: str, context: ssl.SSLContext) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2, context=context) as resp:
            return bool(json.loads(resp.read()).get("health") == "true")
    except (OSError, ValueError):
        return False


def _client_context(tls: Path, *, with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls / "node.crt"))
    if with_cert:
        context.load_cert_chain(tls / "node.crt", tls / "node.key")
    return context


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory, test_pki: PKIFixture) -> Iterator[HaRun]:
    work = tmp_path_factory.mktemp("ha-roles")
    root, secrets, tls = work / "root", work / "secrets", work / "tls"
    tls.mkdir()
    _self_signed(tls)
    test_pki.issue(INGEST_HOST, role="service")
    test_pki.issue(GATEWAY)
    (root / "var/lib/millrace-dashboard").mkdir(parents=True)
    (root / "var/lib/millrace-dashboard/users.toml").write_text("")
    client_port, peer_port = free_port(), free_port()
    files = {
        "ca": str(tls / "node.crt"),
        "cert": str(tls / "node.crt"),
        "key": str(tls / "node.key"),
    }
    extra_vars = {
        "etcd_root": str(root),
        "etcd_user": "",
        "etcd_install_packages": False,
        "etcd_manage_service": False,
        "etcd_listen_address": "127.0.0.1",
        "etcd_client_port": client_port,
        "etcd_peer_port": peer_port,
        **{f"etcd_tls_{key}": path for key, path in files.items()},
        "patroni_root": str(root),
        "patroni_user": "",
        "patroni_install_packages": False,
        "patroni_manage_service": False,
        "patroni_listen_address": "127.0.0.1",
        "patroni_etcd_client_port": client_port,
        "patroni_pg_port": free_port(),
        "patroni_rest_port": free_port(),
        "patroni_secrets_dir": str(secrets),
        **{f"patroni_tls_{key}": path for key, path in files.items()},
        "ingest_root": str(root),
        "ingest_manage_user": False,
        "ingest_manage_service": False,
        "ingest_pki_dir": str(test_pki.dir),
        "ingest_cert_id": INGEST_HOST,
        "ingest_secrets_dir": str(secrets),
        "ingest_db_hosts": [DB_HOST, DB_HOST_2],
        "ingest_db_sslmode": "disable",
        "ingest_broker_host": "mqtt.plant.example",
        "dashboard_root": str(root),
        "dashboard_manage_user": False,
        "dashboard_manage_service": False,
        "dashboard_secrets_dir": str(secrets),
        "dashboard_db_hosts": [DB_HOST, DB_HOST_2],
        "dashboard_db_sslmode": "disable",
        "edge_agent_root": str(root),
        "edge_agent_manage_user": False,
        "edge_agent_pki_dir": str(test_pki.dir),
        "edge_agent_broker_hosts": [f"{host}:{port}" for host, port in BROKERS],
        "broker_root": str(root),
        "broker_manage_service": False,
        "broker_nofile_limit": NOFILE,
    }
    inventory = local_inventory(
        work / "hosts.json",
        {
            "etcd": [ETCD_HOST],
            "database": [DB_HOST, DB_HOST_2],
            "ingest": [INGEST_HOST],
            "dashboard": ["dash-test"],
            "gateways": [GATEWAY],
            "broker": ["mqtt-test"],
        },
    )
    playbook = work / "ha.yml"
    playbook.write_text(PLAYBOOK)
    run = run_playbook(str(playbook), inventory, extra_vars, tmp_path=work)
    assert run.rc == 0, run.output[-4000:]
    service = procs.start(
        "etcd",
        ["/usr/bin/etcd", "--config-file", str(root / "etc/etcd/etcd.yml")],
        log_dir=work,
    )
    url = f"https://{ETCD_HOST}:{client_port}"
    try:
        wait_until(
            lambda: _healthy(url, _client_context(tls, with_cert=True)),
            what=f"etcd from the role's config (log {service.log_path})",
            timeout_s=120,
        )
        yield HaRun(root, secrets, tls, run, url)
    finally:
        procs.stop(service.pid, grace_seconds=30)


def test_etcd_runs_from_the_role_config_and_refuses_clients_without_a_certificate(
    ha: HaRun,
) -> None:
    assert _healthy(ha.etcd_url, _client_context(ha.tls, with_cert=True))
    assert not _healthy(ha.etcd_url, _client_context(ha.tls, with_cert=False))
    host, port = ha.etcd_url.removeprefix("https://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        assert not sock.recv(100).startswith(b"HTTP/1.0 200")


def test_patroni_config_passes_patronis_own_validator(ha: HaRun) -> None:
    result = subprocess.run(
        ["/usr/bin/patroni", "--validate-config", str(ha.root / "etc/patroni/config.yml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_patroni_config_keeps_the_failover_settings_and_a_closed_pg_hba(ha: HaRun) -> None:
    config = yaml.safe_load((ha.root / "etc/patroni/config.yml").read_text())
    dcs = config["bootstrap"]["dcs"]
    assert dcs["synchronous_mode"] is True
    assert dcs["synchronous_mode_strict"] is False
    assert dcs["primary_start_timeout"] == 0
    assert dcs["postgresql"]["use_pg_rewind"] is True
    pg = config["postgresql"]
    assert pg["bin_dir"] == "/usr/lib/postgresql/15/bin"
    assert pg["parameters"]["shared_preload_libraries"] == "timescaledb"
    assert pg["parameters"]["ssl"] == "on"
    assert config["etcd3"]["protocol"] == "https"
    assert config["restapi"]["certfile"].endswith("node.crt")
    assert config["restapi"]["verify_client"] == "required"
    network = [line for line in pg["pg_hba"] if not line.startswith("local ")]
    assert network == [
        f"hostssl replication replicator {DB_HOST} scram-sha-256",
        f"hostssl all postgres {DB_HOST} scram-sha-256",
        f"hostssl replication replicator {DB_HOST_2} scram-sha-256",
        f"hostssl all postgres {DB_HOST_2} scram-sha-256",
        f"hostssl millrace all {INGEST_HOST} scram-sha-256",
        "hostssl millrace all dash-test scram-sha-256",
    ]
    assert config["bootstrap"]["pg_hba"] == pg["pg_hba"]


@pytest.mark.security
def test_ha_secrets_and_keys_are_0600_and_passwords_never_printed(ha: HaRun) -> None:
    private = [
        ha.root / "etc/patroni/config.yml",
        ha.root / "etc/patroni/tls/node.key",
        ha.root / "etc/etcd/tls/member.key",
        *sorted(ha.secrets.glob("patroni-*.password")),
    ]
    assert len(private) == 5
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in ha.secrets.glob("patroni-*.password"):
        assert path.read_text().strip() not in ha.run.output


def test_multi_host_dsns_rendered_for_the_pair_are_accepted_by_the_real_loaders(
    ha: HaRun,
) -> None:
    from millrace.cloud.config import load_config as load_ingest
    from millrace.dashboards.config import load_config as load_dashboard

    hosts = f"@{DB_HOST}:5432,{DB_HOST_2}:5432/millrace?"
    ingest = load_ingest(ha.root / "etc/millrace-ingest/ingest.toml")
    assert ingest.retention.dsn is not None
    for dsn in (ingest.dsn, ingest.retention.dsn):
        assert hosts in dsn
        assert dsn.endswith("&target_session_attrs=read-write")
    dashboard = load_dashboard(ha.root / "etc/millrace-dashboard/dashboard.toml")
    assert hosts in dashboard.dsn
    assert dashboard.dsn.endswith("&target_session_attrs=read-write")


def test_edge_agent_config_names_every_broker(ha: HaRun) -> None:
    from millrace.edge.config import load_config as load_agent

    agent = load_agent(ha.root / "etc/millrace/agent.toml")
    assert agent.broker.endpoints == BROKERS


def test_broker_dropin_raises_the_open_file_limit(ha: HaRun) -> None:
    dropin = ha.root / "etc/systemd/system/mosquitto.service.d/millrace-nofile.conf"
    assert f"\nLimitNOFILE={NOFILE}\n" in dropin.read_text()


def test_ha_inventory_example_has_the_layout_and_passes_the_cloud_syntax_check() -> None:
    inventory = str(ANSIBLE_DIR / "inventory" / "ha" / "hosts.yml")
    listed = _run(str(VENV_BIN / "ansible-inventory"), "-i", inventory, "--list")
    assert listed.returncode == 0, listed.stderr[-4000:]
    groups = json.loads(listed.stdout)
    sizes = {name: len(groups[name]["hosts"]) for name in ("broker", "etcd", "patroni", "ingest")}
    assert sizes == {"broker": 2, "etcd": 3, "patroni": 2, "ingest": 2}
    assert groups["database"]["children"] == ["patroni"]
    hostvars = groups["_meta"]["hostvars"]
    assert all(str(v["ansible_host"]).endswith(".example") for v in hostvars.values())
    result = _run(
        str(VENV_BIN / "ansible-playbook"), "--syntax-check", "-i", inventory, "cloud.yml"
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "playbook: cloud.yml" in result.stdout
