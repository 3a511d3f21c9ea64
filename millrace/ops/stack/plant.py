"""`millrace up | down | status`: the whole plant on this machine, under one directory.

Order matters: identities first (the broker's roles list every identity),
then the broker and the database, the schema, the cloud
services, the simulated field devices, one edge agent per simulated gateway,
and the dashboard. Every process runs in its own process group and is listed
in plant.json, so `down` can stop a detached plant completely.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from millrace.errors import MillraceError
from millrace.ids import is_device_id
from millrace.ops import broker_live, pki
from millrace.ops.stack import procs
from millrace.ops.stack.edgeconfig import BrokerEndpoint, edge_config_toml, gateways_from_manifest
from millrace.ops.stack.layout import PlantLayout
from millrace.ops.stack.patroni import (
    PairPorts,
    PatroniPair,
    node_status,
    role_of,
    stop_leftover_postmaster,
)
from millrace.ops.stack.postgres import HOST, PostgresCluster
from millrace.ops.stack.sparkplug import SERVICE_ID as SPARKPLUG_SERVICE_ID
from millrace.ops.stack.sparkplug import config_toml as sparkplug_config_toml

log = logging.getLogger(__name__)

DATABASE = "millrace"
INGEST_LOGIN = "ingest"
DASHBOARD_LOGIN = "dashboard"
RETENTION_LOGIN = "retention"
INGEST_SERVICE_ID = "ingest"
OPERATOR_SERVICE_ID = "operator"
ADMIN_USER = "admin"
GATEWAY_PREFIX = "gw"
# Patroni's cluster name in etcd: fixed, so a second `up --ha` finds the pair it made.
PATRONI_SCOPE = "millrace-plant"
START_TIMEOUT_SECONDS = 60.0
# How long every service must survive after start before the plant counts as up.
SETTLE_SECONDS = 3.0
# How often a running `millrace up` checks the CRL; nextUpdate is days away, an hour is plenty.
CRL_CHECK_INTERVAL_SECONDS = 3600.0
DEFAULT_ALERT_RULES = """\
# Installed by `millrace up`; edit and re-run `millrace up` to change them.
[[rule]]
name = "oven-hot"
metric = "plc.oven_temp"
devices = "*"
above = 240.0
hysteresis = 5.0
severity = "warning"

[[rule]]
name = "vibration-high"
metric = "plc.vibration_rms"
devices = "*"
above = 9.0
hysteresis = 1.0
severity = "critical"

[[rule]]
name = "gateway-silent"
metric = "*"
devices = "*"
no_data_minutes = 2
severity = "critical"
"""


@dataclass(frozen=True, slots=True)
class PlantOptions:
    """What `millrace up` was asked for; ports default to ones the system services don't use."""

    root: Path
    devices: int = 10
    broker_port: int = 18883
    postgres_port: int = 15432
    dashboard_port: int = 8501
    gateway_mqtt_port: int = 11883
    modbus_base_port: int = 15020
    ingest_http_port: int = 19464
    period_s: int = 10
    seed: int = 0
    # Two brokers (broker_port, +1), a Patroni pair (postgres_port .. +5) and two workers
    # (ingest_http_port, +1): failover to try out (docs/operations.md).
    ha: bool = False

    @property
    def broker_ports(self) -> list[int]:
        return [self.broker_port, self.broker_port + 1] if self.ha else [self.broker_port]

    @property
    def ingest_http_ports(self) -> list[int]:
        return (
            [self.ingest_http_port, self.ingest_http_port + 1]
            if self.ha
            else [self.ingest_http_port]
        )

    @property
    def pair_ports(self) -> PairPorts:
        return PairPorts.from_base(self.postgres_port)


def _millrace() -> list[str]:
    """How to run this very millrace in a child process."""
    return [sys.executable, "-m", "millrace.cli"]


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pki.write_atomic(path, text.encode(), mode=0o600)


def _secret(path: Path) -> str:
    """Read a generated secret, creating it on first use."""
    if not path.exists():
        _write_secret(path, secrets.token_urlsafe(18) + "\n")
    return path.read_text().strip()


def _gateway_ids(count: int) -> list[str]:
    return [f"{GATEWAY_PREFIX}{i:04d}" for i in range(1, count + 1)]


def opcua_available() -> bool:
    """asyncua is installed (the opcua extra): gw0001 then also reads a PLC over OPC UA."""
    import importlib.util

    return importlib.util.find_spec("asyncua") is not None


def _opcua_args(options: PlantOptions) -> list[str]:
    if not opcua_available():
        log.warning(
            "no OPC UA PLC in the plant: asyncua is missing (pip install 'millrace[opcua]')"
        )
        return []
    return ["--opcua", "1", "--opcua-base-port", str(options.modbus_base_port + options.devices)]


def _check_ports(options: PlantOptions) -> None:
    wanted = {
        "--broker-port": options.broker_port,
        "--postgres-port": options.postgres_port,
        "--dashboard-port": options.dashboard_port,
        "--gateway-mqtt-port": options.gateway_mqtt_port,
        "--ingest-http-port": options.ingest_http_port,
    }
    if options.ha:
        wanted["--broker-port (+1, the second broker)"] = options.broker_port + 1
        wanted["--ingest-http-port (+1, the second worker)"] = options.ingest_http_port + 1
        base = options.postgres_port
        wanted |= {
            f"--postgres-port (+{port - base}, the Patroni pair)": port
            for port in options.pair_ports.all()
            if port != base
        }
    wanted |= {
        f"--modbus-base-port (+{i})": options.modbus_base_port + i for i in range(options.devices)
    }
    if opcua_available():  # gw0001's OPC UA PLC listens right after the Modbus PLCs
        wanted[f"--modbus-base-port (+{options.devices}, the OPC UA PLC)"] = (
            options.modbus_base_port + options.devices
        )
    taken: dict[int, str] = {}
    for flag, port in wanted.items():
        if port in taken:
            raise MillraceError(f"{flag} and {taken[port]} both ask for port {port}; move one")
        taken[port] = flag
    for flag, port in wanted.items():
        if not procs.port_is_free(port):
            raise MillraceError(f"port {port} is in use; choose another with {flag}")


class Plant:
    """Starts the plant's parts in order and records them in plant.json."""

    def __init__(self, options: PlantOptions) -> None:
        self.options = options
        # Absolute: generated configs resolve relative paths against their own folder.
        self.layout = PlantLayout(options.root.absolute())
        self.services: list[procs.Service] = []
        self.cluster = PostgresCluster(
            self.layout.postgres,
            port=options.postgres_port,
            password_file=self.layout.pg_superuser_password,
            passfile=self.layout.pgpass,
        )
        self.pair: PatroniPair | None = None

    # -- identities --------------------------------------------------------------------------

    def _identities(self) -> None:
        paths = pki.pki_paths(self.layout.pki)
        if not paths.ca_cert.exists():
            pki.init_pki(self.layout.pki)
        have = {record.ident for record in pki.issued_records(self.layout.pki)}
        # Each worker its own identity: the broker takes the client id from the certificate.
        services = [*_ingest_names(self.options), SPARKPLUG_SERVICE_ID, OPERATOR_SERVICE_ID]
        for ident, role in [(name, "service") for name in services]:
            if ident not in have:
                pki.issue(self.layout.pki, ident, role=role)  # type: ignore[arg-type]
        for gateway in _gateway_ids(self.options.devices):
            if gateway not in have:
                pki.issue(self.layout.pki, gateway, role="device")
        # A plant restarted after weeks would otherwise start a broker that refuses everyone.
        pki.renew_crl_if_below(self.layout.pki)

    def keep_crl_fresh(self) -> bool:
        """Renew the CRL when it runs short and make the running broker re-read it.

        mosquitto 2.0 re-reads crlfile on SIGHUP (docs/security.md); open connections
        stay. Returns True when the CRL was renewed.
        """
        if not pki.renew_crl_if_below(self.layout.pki):
            return False
        for service in self.services:
            if service.name in _broker_names(self.options) and procs.is_running(service.pid):
                os.kill(service.pid, signal.SIGHUP)
                log.info("renewed the CRL; broker (pid %s) reloaded", service.pid)
        return True

    # -- broker ------------------------------------------------------------------------------

    def _start_brokers(self) -> None:
        """One broker, or two with the same authorization (--ha): same PKI, same roles."""
        from millrace.ops.broker import write_broker_config

        targets = []
        for name, port in zip(_broker_names(self.options), self.options.broker_ports, strict=True):
            files = write_broker_config(
                self.layout.pki,
                self.layout.root / name,
                port=port,
                bind_address="127.0.0.1",
                user=getpass.getuser(),
                # `millrace broker sync --admin operator` updates the running broker's roles.
                admin_ids=[OPERATOR_SERVICE_ID],
            )
            service = self._spawn(name, ["mosquitto", "-c", str(files.conf)])
            procs.wait_for_port(
                "127.0.0.1", port, timeout_seconds=START_TIMEOUT_SECONDS, service=service
            )
            targets.append(
                broker_live.BrokerTarget(
                    host="localhost",
                    port=port,
                    admin=OPERATOR_SERVICE_ID,
                    pid=service.pid,
                    conf=str(files.conf),
                )
            )
        # `pki issue|revoke` and `provision` on this PKI then update every broker at once
        # (roles over $CONTROL; after a revocation a SIGHUP re-reads crl.pem).
        broker_live.remember(self.layout.pki, *targets)

    def _broker_endpoints(self) -> list[str]:
        return [f"localhost:{port}" for port in self.options.broker_ports]

    def _start_gateway_mqtt(self) -> None:
        """The gateway-side broker the MQTT sensor nodes publish to (loopback only)."""
        conf = self.layout.local_mqtt / "mosquitto.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(
            "# Gateway-local broker for field sensor nodes; bound to loopback only.\n"
            f"listener {self.options.gateway_mqtt_port} 127.0.0.1\n"
            "allow_anonymous true\npersistence false\n"
            f"user {getpass.getuser()}\nlog_dest stdout\n"
        )
        service = self._spawn("gateway-mqtt", ["mosquitto", "-c", str(conf)])
        procs.wait_for_port(
            "127.0.0.1",
            self.options.gateway_mqtt_port,
            timeout_seconds=START_TIMEOUT_SECONDS,
            service=service,
        )

    # -- database ----------------------------------------------------------------------------

    def _start_database(self) -> None:
        superuser_password = _secret(self.layout.pg_superuser_password)
        ingest_password = _secret(self.layout.secrets / "pg-ingest-password")
        dashboard_password = _secret(self.layout.secrets / "pg-dashboard-password")
        retention_password = _secret(self.layout.secrets / "pg-retention-password")
        ports = (
            list(self.options.pair_ports.pg) if self.options.ha else [self.options.postgres_port]
        )
        lines = [
            f"{HOST}:{port}:*:{login}:{password}"
            for port in ports
            for login, password in (
                ("postgres", superuser_password),
                (INGEST_LOGIN, ingest_password),
                (DASHBOARD_LOGIN, dashboard_password),
                (RETENTION_LOGIN, retention_password),
            )
        ]
        _write_secret(self.layout.pgpass, "\n".join(lines) + "\n")
        if self.options.ha:
            self._start_pair(superuser_password)
        else:
            if not self.cluster.initialized():
                self.cluster.init()
            self.cluster.start()
            self.cluster.create_database(DATABASE)
        from millrace.cloud.dbupgrade import DASHBOARD_ROLE, INGEST_ROLE, RETENTION_ROLE, upgrade

        upgrade(self.superuser_dsn)
        self._login_role(INGEST_LOGIN, ingest_password, INGEST_ROLE)
        self._login_role(DASHBOARD_LOGIN, dashboard_password, DASHBOARD_ROLE)
        self._login_role(RETENTION_LOGIN, retention_password, RETENTION_ROLE)
        self._install_alert_rules()

    def _start_pair(self, superuser_password: str) -> None:
        """etcd and two Patroni nodes; the database is created on the primary, and replicated."""
        import psycopg
        from psycopg import sql

        self.pair = PatroniPair(
            self.layout.patroni,
            ports=self.options.pair_ports,
            superuser_password=superuser_password,
            replication_password=_secret(self.layout.secrets / "pg-replication-password"),
            client_auth="scram-sha-256",
            log_dir=self.layout.logs,
            scope=PATRONI_SCOPE,
            passfile=self.layout.pgpass,
            on_service=self._record,
        )
        self.pair.start()
        with psycopg.connect(self._dsn("postgres"), autocommit=True) as conn:
            query = "SELECT 1 FROM pg_database WHERE datname = %s"
            if not conn.execute(query, (DATABASE,)).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))

    def _login_role(self, name: str, password: str, group: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.superuser_dsn, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(
                sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(name), sql.Literal(password)
                )
            )
            conn.execute(
                sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(name))
            )

    def _install_alert_rules(self) -> None:
        import psycopg

        from millrace.cloud.alerts.rules import sync_rules_file

        if not self.layout.alert_rules.exists():
            self.layout.alert_rules.write_text(DEFAULT_ALERT_RULES)
        with psycopg.connect(self.superuser_dsn) as conn:
            sync_rules_file(conn, self.layout.alert_rules)

    @property
    def superuser_dsn(self) -> str:
        return self._dsn(DATABASE)

    def dsn_for(self, login: str) -> str:
        return self._dsn(DATABASE, user=login)

    def _dsn(self, dbname: str, *, user: str = "postgres") -> str:
        """The database's URL; with --ha it names both nodes and asks for the primary."""
        if not self.options.ha:
            return self.cluster.dsn_for(dbname, user=user)
        hosts = ",".join(f"{HOST}:{port}" for port in self.options.pair_ports.pg)
        passfile = quote(str(self.layout.pgpass), safe="/")
        return (
            f"postgresql://{quote(user, safe='')}@{hosts}/{quote(dbname, safe='')}"
            f"?passfile={passfile}&target_session_attrs=read-write"
        )

    # -- cloud services ----------------------------------------------------------------------

    def _start_ingest(self) -> None:
        """One worker, or two (--ha), each consuming from every broker of the plant."""
        paths = pki.pki_paths(self.layout.pki)
        dsn_file = self.layout.secrets / "ingest.dsn"
        _write_secret(dsn_file, self.dsn_for(INGEST_LOGIN) + "\n")
        retention_dsn = self.layout.secrets / "retention.dsn"
        # No service gets the superuser: retention has its own role (cloud/dbupgrade.py).
        _write_secret(retention_dsn, self.dsn_for(RETENTION_LOGIN) + "\n")
        # A generated share group: devices cannot subscribe to $share at all (dynsec roles),
        # the name only keeps plants that share a broker apart (docs/security.md).
        share_group_file = self.layout.secrets / "share-group"
        if not share_group_file.exists() or not is_device_id(share_group_file.read_text().strip()):
            _write_secret(share_group_file, f"ingest-{secrets.token_hex(8)}\n")
        group = share_group_file.read_text().strip()
        if self.options.ha:
            hosts = ", ".join(f'"{endpoint}"' for endpoint in self._broker_endpoints())
            where = f"hosts = [{hosts}]\n"
        else:
            where = f'host = "localhost"\nport = {self.options.broker_port}\n'
        for name, http_port in zip(
            _ingest_names(self.options), self.options.ingest_http_ports, strict=True
        ):
            config = self.layout.root / f"{name}.toml"
            config.write_text(
                "# Generated by millrace up.\n"
                f'[database]\ndsn_file = "{dsn_file}"\n\n'
                f"[broker]\n{where}"
                f'ca = "{paths.ca_cert}"\ncert = "{paths.cert_for(name)}"\n'
                f'key = "{paths.key_for(name)}"\nclient_id = "{name}"\n'
                f'share_group = "{group}"\n\n'
                f'[http]\nhost = "127.0.0.1"\nport = {http_port}\n\n'
                f'[retention]\ndsn_file = "{retention_dsn}"\n'
            )
            service = self._spawn(name, [*_millrace(), "ingest", "--config", str(config)])
            procs.wait_for_port(
                "127.0.0.1", http_port, timeout_seconds=START_TIMEOUT_SECONDS, service=service
            )

    def _start_sparkplug(self) -> None:
        """The Sparkplug B host on every broker, as the ingest login (docs/sparkplug.md)."""
        paths = pki.pki_paths(self.layout.pki)
        config = self.layout.root / f"{SPARKPLUG_SERVICE_ID}.toml"
        config.write_text(
            sparkplug_config_toml(
                dsn_file=self.layout.secrets / "ingest.dsn",
                brokers=self._broker_endpoints(),
                ca=paths.ca_cert,
                cert=paths.cert_for(SPARKPLUG_SERVICE_ID),
                key=paths.key_for(SPARKPLUG_SERVICE_ID),
                period_s=self.options.period_s,
            )
        )
        self._spawn(SPARKPLUG_SERVICE_ID, [*_millrace(), "sparkplug", "--config", str(config)])

    def _start_dashboard(self) -> str:
        dsn_file = self.layout.secrets / "dashboard.dsn"
        _write_secret(dsn_file, self.dsn_for(DASHBOARD_LOGIN) + "\n")
        password = _secret(self.layout.admin_password)
        import subprocess

        done = subprocess.run(
            [
                *_millrace(),
                "dash",
                "add-user",
                ADMIN_USER,
                "--role",
                "admin",
                "--users-file",
                str(self.layout.dashboard_users),
                "--password-file",
                str(self.layout.admin_password),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise MillraceError(f"could not create the dashboard login: {done.stderr.strip()}")
        self.layout.dashboard_config.write_text(
            "# Generated by millrace up.\n"
            '[dashboard]\ntitle = "millrace demo plant"\ntimezone = "UTC"\n\n'
            f'[database]\ndsn_file = "{dsn_file}"\n\n'
            f'[auth]\nusers_file = "{self.layout.dashboard_users}"\n'
        )
        service = self._spawn(
            "dashboard",
            [
                *_millrace(),
                "dash",
                "--config",
                str(self.layout.dashboard_config),
                "--port",
                str(self.options.dashboard_port),
                "--address",
                "127.0.0.1",
            ],
        )
        procs.wait_for_port(
            "127.0.0.1",
            self.options.dashboard_port,
            timeout_seconds=START_TIMEOUT_SECONDS,
            service=service,
        )
        return password

    # -- field and edge ----------------------------------------------------------------------

    def _start_simulator(self) -> dict[str, Any]:
        manifest_path = self.layout.manifest
        manifest_path.unlink(missing_ok=True)
        service = self._spawn(
            "simulator",
            [
                *_millrace(),
                "sim",
                "--devices",
                str(self.options.devices),
                "--seed",
                str(self.options.seed),
                "--base-port",
                str(self.options.modbus_base_port),
                "--mqtt-host",
                "127.0.0.1",
                "--mqtt-port",
                str(self.options.gateway_mqtt_port),
                "--gateway-prefix",
                GATEWAY_PREFIX,
                "--rtu",  # one gateway also reads a PLC over Modbus RTU (a pty)
                "1",
                *_opcua_args(self.options),  # and one over OPC UA (Basic256Sha256)
                "--w1-dir",
                str(self.layout.sim / "w1"),
                "--manifest",
                str(manifest_path),
            ],
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if not procs.is_running(service.pid):
                raise MillraceError(f"the simulator exited; see {service.log_path}")
            if manifest_path.exists():
                manifest = json.loads(manifest_path.read_text())
                if manifest.get("status") == "running":
                    return dict(manifest)
            time.sleep(procs.POLL_INTERVAL_SECONDS)
        raise MillraceError(f"the simulator did not come up; see {service.log_path}")

    def _start_edge_agents(self, manifest: dict[str, Any]) -> None:
        paths = pki.pki_paths(self.layout.pki)
        for gateway, devices in sorted(gateways_from_manifest(manifest).items()):
            gateway_dir = self.layout.gateway_dir(gateway)
            gateway_dir.mkdir(parents=True, exist_ok=True)
            config = gateway_dir / "config.toml"
            config.write_text(
                edge_config_toml(
                    gateway_id=gateway,
                    devices=devices,
                    broker=BrokerEndpoint(
                        host="localhost",
                        port=self.options.broker_port,
                        ca=paths.ca_cert,
                        cert=paths.cert_for(gateway),
                        key=paths.key_for(gateway),
                        hosts=tuple(self._broker_endpoints()) if self.options.ha else (),
                    ),
                    state_dir=gateway_dir,
                    period_s=self.options.period_s,
                )
            )
            self._spawn(f"edge-{gateway}", [*_millrace(), "edge", "run", "--config", str(config)])

    # -- lifecycle ---------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> procs.Service:
        return self._record(procs.start(name, argv, log_dir=self.layout.logs))

    def _record(self, service: procs.Service) -> procs.Service:
        self.services.append(service)
        self._save("starting")
        return service

    def summary(self, status: str) -> dict[str, Any]:
        """What `status --json` prints and plant.json holds."""
        return {
            "status": status,
            "root": str(self.layout.root.resolve()),
            "supervisor_pid": os.getpid(),
            "supervisor_identity": procs.process_identity(os.getpid()),
            "dsn": self.dsn_for(DASHBOARD_LOGIN),
            "superuser_dsn": self.superuser_dsn,
            "broker": f"mqtts://localhost:{self.options.broker_port}",
            "brokers": [f"mqtts://{endpoint}" for endpoint in self._broker_endpoints()],
            "ha": self.options.ha,
            "dashboard": f"http://127.0.0.1:{self.options.dashboard_port}",
            "dashboard_health": f"http://127.0.0.1:{self.options.dashboard_port}/_stcore/health",
            "ingest_metrics": f"http://127.0.0.1:{self.options.ingest_http_port}/metrics",
            "login": {"user": ADMIN_USER, "password_file": str(self.layout.admin_password)},
            "logs": str(self.layout.logs),
            "devices": self.options.devices,
            "postgres": {"datadir": str(self.cluster.datadir), "port": self.cluster.port},
            "database_nodes": [
                {
                    "name": node.name,
                    "port": node.pg_port,
                    "rest": node.rest_url,
                    "datadir": str(node.datadir),
                }
                for node in (self.pair.nodes if self.pair else [])
            ],
            "services": [
                {"name": s.name, "pid": s.pid, "identity": s.identity, "log": str(s.log_path)}
                for s in self.services
            ],
        }

    def _save(self, status: str) -> None:
        self.layout.root.mkdir(parents=True, exist_ok=True)
        tmp = self.layout.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.summary(status), indent=1) + "\n")
        os.replace(tmp, self.layout.state_file)

    def start(self, *, on_step: Callable[[str], None]) -> str:
        """Bring every part up; returns the dashboard admin password."""
        _check_ports(self.options)
        self.layout.root.mkdir(parents=True, exist_ok=True)
        steps: list[tuple[str, Callable[[], object]]] = [
            ("certificates", self._identities),
            ("brokers (TLS, ACL)" if self.options.ha else "broker (TLS, ACL)", self._start_brokers),
            (
                "Patroni pair (etcd, 2 x PostgreSQL + TimescaleDB), schema"
                if self.options.ha
                else "PostgreSQL + TimescaleDB, schema",
                self._start_database,
            ),
            ("ingest workers" if self.options.ha else "ingest worker", self._start_ingest),
            ("Sparkplug B host", self._start_sparkplug),
            ("gateway-local MQTT broker", self._start_gateway_mqtt),
        ]
        for label, step in steps:
            on_step(label)
            step()
        on_step(f"simulated field devices ({self.options.devices} gateways)")
        manifest = self._start_simulator()
        on_step("edge agents")
        self._start_edge_agents(manifest)
        on_step("dashboard")
        password = self._start_dashboard()
        self._check_alive()
        self._save("running")
        return password

    def _check_alive(self) -> None:
        """Fail start-up when a service died right away (a bad config, a busy port ...)."""
        time.sleep(SETTLE_SECONDS)
        for service in self.services:
            if not procs.is_running(service.pid):
                tail = service.log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise MillraceError(
                    f"{service.name} stopped during start-up: {' '.join(tail) or 'no output'}"
                    f" (log: {service.log_path})"
                )

    def stop(self) -> None:
        """Stop every process in reverse start order, then the database."""
        for service in reversed(self.services):
            procs.stop(service.pid)
        self.cluster.stop()
        for node in self.pair.nodes if self.pair else []:
            stop_leftover_postmaster(node.datadir)
        self.services.clear()
        self._save("stopped")


def read_state(root: Path) -> dict[str, Any] | None:
    """plant.json of the plant under `root`, or None when it never ran."""
    path = PlantLayout(root).state_file
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _recorded_and_running(entry: dict[str, Any]) -> bool:
    """The recorded service still runs: its pid is alive and is still the same process."""
    return procs.is_ours(int(entry["pid"]), entry.get("identity"))


def running_services(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The recorded services whose processes still run (a reused pid is not one of them)."""
    return [s for s in state.get("services", []) if _recorded_and_running(s)]


def down(root: Path) -> list[str]:
    """Stop a plant from its plant.json; returns the names of what was stopped."""
    state = read_state(root)
    if state is None:
        return []
    stopped = []
    supervisor = int(state.get("supervisor_pid", 0))
    if (
        supervisor
        and supervisor != os.getpid()
        and procs.is_ours(supervisor, state.get("supervisor_identity"))
    ):
        _stop_supervisor(supervisor)
    for service in reversed(state.get("services", [])):
        if _recorded_and_running(service):
            procs.stop(int(service["pid"]))
            stopped.append(service["name"])
    cluster = PostgresCluster(PlantLayout(root).postgres, port=int(state["postgres"]["port"]))
    if (cluster.datadir / "postmaster.pid").exists():
        cluster.stop()
        stopped.append("postgres")
    # Patroni starts each postmaster in a session of its own; one it left behind goes too.
    for node in state.get("database_nodes", []):
        if stop_leftover_postmaster(Path(node["datadir"])):
            stopped.append(f"postgres {node['name']}")
    state["status"] = "stopped"
    PlantLayout(root).state_file.write_text(json.dumps(state, indent=1) + "\n")
    return stopped


def database_nodes(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The --ha plant's database nodes with the role Patroni reports now ("" if it is down)."""
    return [
        {**node, "role": role_of(node_status(node["rest"]))}
        for node in state.get("database_nodes", [])
    ]


def _broker_names(options: PlantOptions) -> list[str]:
    return ["broker", "broker-2"][: len(options.broker_ports)]


def _ingest_names(options: PlantOptions) -> list[str]:
    return [INGEST_SERVICE_ID, f"{INGEST_SERVICE_ID}-2"][: len(options.ingest_http_ports)]


def _stop_supervisor(pid: int) -> None:
    """Ask a foreground `millrace up` to stop its plant, and wait for it."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + procs.STOP_GRACE_SECONDS * 4
    while time.monotonic() < deadline and procs.is_running(pid):
        time.sleep(procs.POLL_INTERVAL_SECONDS)
