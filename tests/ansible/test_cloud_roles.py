"""The cloud roles' pieces that can run here: the database set-up and the rendered configs.

The timescaledb role's SQL runs (psql, as the superuser) against a private test cluster,
then `millrace db upgrade` runs as the owner it created, which is the deployment order:
the role pre-creates what needs a superuser (extension, group roles), the owner does the
rest. The ingest and dashboard roles render their configs into a temporary prefix and the
real loaders must accept them. Package installs, systemd and the release virtualenvs are
not exercised here (the edge_agent converge test covers that path).
"""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.ansible.rollout_support import PlaybookRun, local_inventory, run_playbook
from tests.fixtures.fix_broker import PKIFixture
from tests.fixtures.fix_postgres import PostgresServer

pytestmark = [pytest.mark.ansible, pytest.mark.integration]

DB_NAME = "millrace_plant"
INGEST_HOST = "ingest-test"
PLAYBOOK = """\
- name: Create the database and its logins
  hosts: database
  gather_facts: false
  tasks:
    - name: Run the timescaledb role's database tasks
      ansible.builtin.include_role:
        name: timescaledb
        tasks_from: database.yml

- name: Render the ingest worker's config
  hosts: ingest
  gather_facts: false
  tasks:
    - name: Run the ingest role's config tasks
      ansible.builtin.include_role:
        name: ingest
        tasks_from: config.yml

- name: Render the dashboard's config
  hosts: dashboard
  gather_facts: false
  tasks:
    - name: Run the dashboard role's config tasks
      ansible.builtin.include_role:
        name: dashboard
        tasks_from: config.yml
"""


@dataclass
class CloudRun:
    work: Path
    root: Path
    secrets: Path
    server: PostgresServer
    first: PlaybookRun
    second: PlaybookRun


@pytest.fixture(scope="module")
def cloud(
    tmp_path_factory: pytest.TempPathFactory,
    test_pki: PKIFixture,
    private_pg: PostgresServer,
    monkeypatch_module: pytest.MonkeyPatch,
) -> CloudRun:
    pg_server = private_pg
    work = tmp_path_factory.mktemp("cloud-roles")
    root, secrets = work / "root", work / "secrets"
    test_pki.issue(INGEST_HOST, role="service")
    playbook = work / "parts.yml"
    playbook.write_text(PLAYBOOK)
    (root / "var/lib/millrace-dashboard").mkdir(parents=True)
    # An existing accounts file: the role creates the first admin only on a fresh host.
    (root / "var/lib/millrace-dashboard/users.toml").write_text("")
    # psql in the timescaledb tasks reaches the test cluster through libpq's environment.
    monkeypatch_module.setenv("PGHOST", pg_server.host)
    monkeypatch_module.setenv("PGUSER", pg_server.user)
    extra_vars = {
        "timescaledb_port": pg_server.port,
        "timescaledb_database": DB_NAME,
        "timescaledb_secrets_dir": str(secrets),
        "ingest_root": str(root),
        "ingest_manage_user": False,
        "ingest_manage_service": False,
        "ingest_pki_dir": str(test_pki.dir),
        "ingest_cert_id": INGEST_HOST,
        "ingest_secrets_dir": str(secrets),
        "ingest_db_host": pg_server.host,
        "ingest_db_port": pg_server.port,
        "ingest_db_name": DB_NAME,
        "ingest_db_sslmode": "disable",
        "ingest_broker_host": "mqtt.plant.example",
        "dashboard_root": str(root),
        "dashboard_manage_user": False,
        "dashboard_manage_service": False,
        "dashboard_secrets_dir": str(secrets),
        "dashboard_db_host": pg_server.host,
        "dashboard_db_port": pg_server.port,
        "dashboard_db_name": DB_NAME,
        "dashboard_db_sslmode": "disable",
        "dashboard_timezone": "Europe/Berlin",
    }
    inventory = local_inventory(
        work / "hosts.json",
        {"database": ["db-test"], "ingest": [INGEST_HOST], "dashboard": ["dash-test"]},
    )
    first = run_playbook(str(playbook), inventory, extra_vars, tmp_path=work)
    second = run_playbook(str(playbook), inventory, extra_vars, tmp_path=work)
    return CloudRun(work, root, secrets, pg_server, first, second)


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PostgresServer]:
    """A cluster of our own: the roles create cluster-wide roles (owner, logins, groups)."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


def test_cloud_role_parts_converge_and_then_change_nothing(cloud: CloudRun) -> None:
    assert cloud.first.rc == 0, cloud.first.output[-4000:]
    assert cloud.first.count("db-test", "changed") == 2
    assert cloud.second.rc == 0, cloud.second.output[-4000:]
    for host in ("db-test", INGEST_HOST, "dash-test"):
        assert cloud.second.count(host, "changed") == 0, host


@pytest.mark.security
def test_passwords_are_generated_privately_and_never_printed(cloud: CloudRun) -> None:
    files = sorted(cloud.secrets.glob("db-*.password"))
    assert [f.name for f in files] == [
        "db-dashboard.password",
        "db-ingest.password",
        "db-millrace_owner.password",
        "db-retention.password",
    ]
    assert stat.S_IMODE(cloud.secrets.stat().st_mode) == 0o700
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        secret = path.read_text().strip()
        assert len(secret) == 32
        assert secret not in cloud.first.output + cloud.second.output
    dsns = ("ingest.dsn", "retention.dsn", "../millrace-dashboard/dashboard.dsn")
    for dsn in (f"etc/millrace-ingest/{name}" for name in dsns):
        assert stat.S_IMODE((cloud.root / dsn).stat().st_mode) == 0o600


def test_owner_upgrades_the_schema_and_logins_get_least_privilege(cloud: CloudRun) -> None:
    server = cloud.server
    owner_dsn = server.dsn_for(DB_NAME, user="millrace_owner")
    upgrade = subprocess.run(
        [sys.executable, "-m", "millrace.cli", "db", "upgrade", "--dsn", owner_dsn],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert upgrade.returncode == 0, upgrade.stderr
    with psycopg.connect(server.dsn_for(DB_NAME), autocommit=True) as conn:
        owner = conn.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", [DB_NAME]
        ).fetchone()
        assert owner == ("millrace_owner",)
        assert conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
        memberships = conn.execute(
            "SELECT pg_has_role('ingest', 'millrace_ingest', 'MEMBER'),"
            " pg_has_role('dashboard', 'millrace_dashboard', 'MEMBER'),"
            " pg_has_role('dashboard', 'millrace_ingest', 'MEMBER'),"
            " pg_has_role('retention', 'millrace_retention', 'MEMBER'),"
            " (SELECT rolsuper FROM pg_roles WHERE rolname = 'retention'),"
            " (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = 'millrace_owner')"
        ).fetchone()
        assert memberships == (True, True, False, True, False, False)
        passwords = conn.execute(
            "SELECT count(*) FROM pg_authid WHERE rolname IN"
            " ('ingest', 'dashboard', 'millrace_owner') AND rolpassword LIKE 'SCRAM-SHA-256$%%'"
        ).fetchone()
        assert passwords == (3,)
    # Retention runs as its login: drop_chunks through the owner's SECURITY DEFINER wrapper.
    from millrace.cloud.retention import DEFAULT_AGES_DAYS, RetentionPolicy, run_retention

    with psycopg.connect(server.dsn_for(DB_NAME, user="retention"), autocommit=True) as conn:
        assert set(run_retention(conn, RetentionPolicy())) == set(DEFAULT_AGES_DAYS)


def test_rendered_configs_are_accepted_by_the_real_loaders(cloud: CloudRun) -> None:
    from millrace.cloud.config import load_config as load_ingest
    from millrace.dashboards.config import load_config as load_dashboard

    ingest = load_ingest(cloud.root / "etc/millrace-ingest/ingest.toml")
    assert ingest.broker.host == "mqtt.plant.example"
    assert ingest.broker.client_id == INGEST_HOST
    assert ingest.broker.key == cloud.root / "etc/millrace-ingest/pki/service.key"
    assert ingest.dsn.startswith("postgresql://ingest:")
    assert ingest.dsn.endswith(f"/{DB_NAME}?sslmode=disable")
    assert stat.S_IMODE(ingest.broker.key.stat().st_mode) == 0o600
    # Retention logs in as its own least-privilege login, not the ingest role or an owner.
    assert ingest.retention.dsn is not None
    assert ingest.retention.dsn.startswith("postgresql://retention:")
    # Not the guessable default: a device joining the group would take a share of the data.
    group = ingest.broker.share_group
    assert group.startswith("ingest-") and len(group) == len("ingest-") + 16

    dashboard = load_dashboard(cloud.root / "etc/millrace-dashboard/dashboard.toml")
    assert dashboard.timezone == "Europe/Berlin"
    assert dashboard.dsn.startswith("postgresql://dashboard:")
    assert dashboard.auth.users_file == cloud.root / "var/lib/millrace-dashboard/users.toml"
    assert dashboard.server.address == "127.0.0.1"


TLS_PLAYBOOK = """\
- name: Give the database its TLS certificate
  hosts: database
  gather_facts: false
  tasks:
    - name: Run the timescaledb role's TLS tasks
      ansible.builtin.include_role:
        name: timescaledb
        tasks_from: tls.yml

- name: Render the ingest worker's config with the default sslmode
  hosts: ingest
  gather_facts: false
  tasks:
    - name: Run the ingest role's config tasks
      ansible.builtin.include_role:
        name: ingest
        tasks_from: config.yml

- name: Render the dashboard's config with the default sslmode
  hosts: dashboard
  gather_facts: false
  tasks:
    - name: Run the dashboard role's config tasks
      ansible.builtin.include_role:
        name: dashboard
        tasks_from: config.yml
"""


def _dsn_params(dsn_file: Path) -> dict[str, str]:
    from urllib.parse import parse_qsl, urlsplit

    return dict(parse_qsl(urlsplit(dsn_file.read_text().strip()).query))


@pytest.mark.security
def test_database_tls_is_verify_full_against_the_role_made_certificate(
    tmp_path: Path, test_pki: PKIFixture
) -> None:
    """The roles' default was sslmode=require: TLS without checking whom it talks to."""
    import getpass
    import os

    from millrace.ops.stack.postgres import OS_USER_WHEN_ROOT

    server = PostgresServer(
        settings={
            "ssl": "on",
            "ssl_cert_file": "millrace-server.crt",
            "ssl_key_file": "millrace-server.key",
        }
    )
    try:
        root, secrets = tmp_path / "root", tmp_path / "secrets"
        (root / "var/lib/millrace-dashboard").mkdir(parents=True)
        (root / "var/lib/millrace-dashboard/users.toml").write_text("")
        test_pki.issue(INGEST_HOST, role="service")
        playbook = tmp_path / "tls.yml"
        playbook.write_text(TLS_PLAYBOOK)
        owner = OS_USER_WHEN_ROOT if os.geteuid() == 0 else None
        extra_vars = {
            "timescaledb_manage_service": False,
            "timescaledb_tls_dir": str(server.datadir),
            "timescaledb_tls_hostnames": [server.host],
            "timescaledb_secrets_dir": str(secrets),
            "ingest_root": str(root),
            "ingest_manage_user": False,
            "ingest_manage_service": False,
            "ingest_pki_dir": str(test_pki.dir),
            "ingest_cert_id": INGEST_HOST,
            "ingest_secrets_dir": str(secrets),
            "ingest_db_host": server.host,
            "ingest_db_port": server.port,
            "ingest_broker_host": "mqtt.plant.example",
            "dashboard_root": str(root),
            "dashboard_manage_user": False,
            "dashboard_manage_service": False,
            "dashboard_secrets_dir": str(secrets),
            "dashboard_db_host": server.host,
        }
        extra_vars["timescaledb_tls_owner"] = owner or getpass.getuser()  # who runs postgres
        inventory = local_inventory(
            tmp_path / "hosts.json",
            {"database": ["db-test"], "ingest": [INGEST_HOST], "dashboard": ["dash-test"]},
        )
        # --check on a database host without a certificate yet predicts, and does not fail.
        db_only = tmp_path / "tls-db.yml"
        db_only.write_text(TLS_PLAYBOOK.split("\n\n- name: Render the ingest")[0] + "\n")
        check = run_playbook(str(db_only), inventory, extra_vars, check=True, tmp_path=tmp_path)
        assert check.rc == 0, check.output[-4000:]
        assert not (server.datadir / "millrace-server.crt").exists()
        run = run_playbook(str(playbook), inventory, extra_vars, tmp_path=tmp_path)
        assert run.rc == 0, run.output[-4000:]
        key = server.datadir / "millrace-server.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert (secrets / "db-server.crt").read_bytes() == (
            server.datadir / "millrace-server.crt"
        ).read_bytes()
        server.start()

        ingest = _dsn_params(root / "etc/millrace-ingest/ingest.dsn")
        retention = _dsn_params(root / "etc/millrace-ingest/retention.dsn")
        dashboard = _dsn_params(root / "etc/millrace-dashboard/dashboard.dsn")
        assert (
            ingest
            == retention
            == {
                "sslmode": "verify-full",
                "sslrootcert": str(root / "etc/millrace-ingest/pki/db-ca.crt"),
            }
        )
        assert dashboard == {
            "sslmode": "verify-full",
            "sslrootcert": str(root / "etc/millrace-dashboard/db-ca.crt"),
        }
        for params in (ingest, dashboard):
            with psycopg.connect(
                host=server.host, port=server.port, user=server.user, dbname="postgres", **params
            ) as conn:
                row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                assert row.fetchone() == (True,)
        # A name the certificate does not carry, or another root: refused.
        with pytest.raises(psycopg.OperationalError, match="does not match host name"):
            psycopg.connect(
                host="localhost", port=server.port, user=server.user, dbname="postgres", **ingest
            ).close()
        stranger = {**ingest, "sslrootcert": str(test_pki.dir / "ca.crt")}
        with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
            psycopg.connect(
                host=server.host, port=server.port, user=server.user, dbname="postgres", **stranger
            ).close()
    finally:
        server.close()
