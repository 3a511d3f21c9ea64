"""cloud.yml against one booted Debian host: broker, TimescaleDB, ingest and dashboard.

issue 14, item 7. The container boots the cached cloud root file system (fix_system's
CLOUD flavour: the packages the roles apt-install, Debian's timescaledb source in the cache
of scripts/build-timescaledb), so the converge asks no mirror: the timescaledb role builds
the extension from that source in the container, as it would on a fresh database host. The
container shares the host's network, so every server gets a free loopback port through the
roles' variables. The release is `millrace provision --release-dir` with a wheelhouse; the
cloud roles' pip installs read the cloud and dashboard closures from a wheelhouse inside the
container (`--no-index --find-links`), repacked from the test virtualenv.

A real edge agent on the host, with a certificate of the PKI the roles installed, publishes
to the container's broker; an observer (a service identity) sees every batch it sends, and
the windows in the container's TimescaleDB must be exactly those.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psycopg
import pytest

from millrace import topics
from millrace.mqtt import tls_client
from millrace.ops import provision
from millrace.wire import Batch, decode_batch
from tests.ansible import rollout_support
from tests.ansible.rollout_support import (
    TEST_AGENT_TEMPLATE,
    VENV_BIN,
    PlaybookRun,
    agent_wheel,  # noqa: F401 - fixture
    repack,
    run_playbook,
    running_agent,
    wheelhouse,  # noqa: F401 - fixture
)
from tests.fixtures.fix_broker import PKIFixture
from tests.fixtures.fix_system import (
    CLOUD,
    CLOUD_PACKAGES,
    SSH_USER,
    Container,
    ContainerFactory,
    SSHKey,
    free_port,
    timescaledb_pin,
)

pytestmark = [pytest.mark.system, pytest.mark.ansible]

HOST = "cloud-1"  # the ingest worker's service certificate is issued to this name
GATEWAY = "gw-cloud-1"
OBSERVER = "cloud-observer"
WHEELS_IN_BOX = "/var/cache/millrace/cloud-wheels"
SSH_ARGS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
UNITS = ("postgresql@15-main.service", "mosquitto.service")
SERVICES = ("millrace-ingest.service", "millrace-dashboard.service")
WINDOWS_WANTED = 5
# Give-up limits only (the machine is shared): windows arrive every second or so.
WINDOWS_TIMEOUT_SECONDS = 120.0
STORED_TIMEOUT_SECONDS = 120.0
# The first converge builds TimescaleDB and installs two virtualenvs (about 6 min on a loaded
# 2-core machine): more than the rollout helpers' default give-up limit.
PLAYBOOK_TIMEOUT_SECONDS = 1200


@dataclass
class Observer:
    """A service identity subscribed to the gateway's data: every window the agent sends."""

    client: paho.Client
    windows: dict[tuple[str, int, int], tuple[Any, ...]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        ctype = getattr(msg.properties, "ContentType", None) if msg.properties else None
        batch = decode_batch(bytes(msg.payload), content_type=ctype)
        if not isinstance(batch, Batch):
            return
        with self.lock:
            for w in batch.windows:
                values = (w.count, w.sum, w.min, w.max, w.first, w.last, w.sumsq, w.rejected)
                self.windows[(w.metric, w.start_ms, w.period_s)] = values

    def seen(self) -> dict[tuple[str, int, int], tuple[Any, ...]]:
        with self.lock:
            return dict(self.windows)


@dataclass
class Cloud:
    box: Container
    work: Path
    pki: PKIFixture
    secrets: Path
    ports: dict[str, int]
    first: PlaybookRun
    second: PlaybookRun
    seconds: dict[str, float]
    invocations: dict[str, tuple[str, str]]
    starts: dict[str, int]

    def db(self) -> psycopg.Connection[Any]:
        """The dashboard's login over TLS, verified against the certificate the role made."""
        password = (self.secrets / "db-dashboard.password").read_text().strip()
        return psycopg.connect(
            host="localhost",
            port=self.ports["postgres"],
            dbname="millrace",
            user="dashboard",
            password=password,
            sslmode="verify-full",
            sslrootcert=str(self.secrets / "db-server.crt"),
            connect_timeout=10,
        )


def _cloud_wheelhouse(out: Path) -> Path:
    """The cloud and dashboard closures' wheels, repacked from this virtualenv."""
    out.mkdir(parents=True, exist_ok=True)
    pins = set(provision.pinned_requirements("cloud")) | set(
        provision.pinned_requirements("dashboard")
    )
    for pin in sorted(pins):
        repack(pin.split("==")[0], out)
    return out


def _inventory(path: Path, box: Container, key: SSHKey) -> Path:
    host = {
        "ansible_host": "127.0.0.1",
        "ansible_port": box.ssh_port,
        "ansible_user": SSH_USER,
        "ansible_ssh_private_key_file": str(key.private),
        "ansible_ssh_common_args": SSH_ARGS,
        "ansible_python_interpreter": "/usr/bin/python3",
    }
    groups = ("database", "broker", "ingest", "dashboard")
    path.write_text(json.dumps({"all": {"children": {g: {"hosts": {HOST: host}} for g in groups}}}))
    return path


def _extra_vars(work: Path, pki_dir: Path, release: Path, ports: dict[str, int]) -> dict[str, Any]:
    secrets = work / "secrets"
    offline_pip = ["--no-index", "--find-links", WHEELS_IN_BOX]
    return {
        "ansible_become": True,
        # The container shares the host's network: loopback only, free ports.
        "timescaledb_port": ports["postgres"],
        "timescaledb_listen_addresses": "localhost",
        "timescaledb_client_networks": ["samehost"],
        "timescaledb_tls_hostnames": ["localhost"],
        "timescaledb_secrets_dir": str(secrets),
        "broker_pki_dir": str(pki_dir),
        "broker_port": ports["broker"],
        "broker_bind_address": "127.0.0.1",
        # The daily renewal timer goes on the controller, here the test machine itself.
        "broker_crl_timer": False,
        "ingest_release_dir": str(release),
        "ingest_pki_dir": str(pki_dir),
        "ingest_secrets_dir": str(secrets),
        "ingest_broker_port": ports["broker"],
        "ingest_db_port": ports["postgres"],
        "ingest_http_port": ports["ingest_http"],
        "ingest_pip_extra_args": offline_pip,
        "dashboard_release_dir": str(release),
        "dashboard_secrets_dir": str(secrets),
        "dashboard_db_port": ports["postgres"],
        "dashboard_port": ports["dashboard"],
        "dashboard_pip_extra_args": offline_pip,
    }


def _starts(box: Container) -> dict[str, int]:
    """How often systemd started each service since the container booted."""
    return {
        unit: box.journal(unit).count(f"Started {unit}")  # systemd 252: "Started X.service - ..."
        for unit in (*UNITS, *SERVICES)
    }


def _invocations(box: Container) -> dict[str, tuple[str, str]]:
    return {
        unit: (box.unit_property(unit, "ActiveState"), box.unit_property(unit, "InvocationID"))
        for unit in (*UNITS, *SERVICES)
    }


@pytest.fixture(scope="module")
def cloud(
    monkeypatch_module: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
    system_cloud_rootfs: Path,
    module_container_factory: ContainerFactory,
    system_ssh_key: SSHKey,
    agent_wheel: Path,  # noqa: F811
    wheelhouse: Path,  # noqa: F811
) -> Cloud:
    work = tmp_path_factory.mktemp("cloud-rollout")
    test_pki = PKIFixture(work / "pki")
    test_pki.issue(HOST, role="service")
    test_pki.issue(OBSERVER, role="service")
    test_pki.issue(GATEWAY)
    box = module_container_factory(packages=CLOUD_PACKAGES, flavour=CLOUD, boot=False, name=HOST)
    with ThreadPoolExecutor(1) as pool:  # repacking takes a while: meanwhile build and boot
        wheels = pool.submit(_cloud_wheelhouse, box.path(WHEELS_IN_BOX))
        release = provision.prepare_release(
            work / "release", wheel=agent_wheel, wheelhouse=wheelhouse
        )
        box.boot()
        wheels.result()
    monkeypatch_module.setattr(
        rollout_support, "PLAYBOOK_TIMEOUT_SECONDS", PLAYBOOK_TIMEOUT_SECONDS
    )
    ports = {name: free_port() for name in ("postgres", "broker", "ingest_http", "dashboard")}
    inventory = _inventory(work / "hosts.json", box, system_ssh_key)
    extra_vars = _extra_vars(work, test_pki.dir, release.dir, ports)
    seconds = {}
    runs = []
    for name in ("first", "second"):
        started = time.monotonic()
        runs.append(run_playbook("cloud.yml", inventory, extra_vars, tmp_path=work))
        seconds[name] = time.monotonic() - started
        print(f"cloud.yml {name} run: {seconds[name]:.1f} s, recap {runs[-1].recap}")
        if name == "first":
            assert runs[0].rc == 0, runs[0].output[-6000:]
            invocations, starts = _invocations(box), _starts(box)
    return Cloud(
        box, work, test_pki, work / "secrets", ports, runs[0], runs[1], seconds, invocations, starts
    )


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


def test_cloud_yml_converges_every_role_on_a_booted_host_without_a_mirror(cloud: Cloud) -> None:
    assert cloud.first.rc == 0, cloud.first.output[-6000:]
    assert cloud.first.count(HOST, "failed") == 0
    # Every package the roles need was there: no task refreshed apt's lists or installed.
    for task in (
        "timescaledb : Install PostgreSQL (and what the TimescaleDB build needs)",
        "broker : Install mosquitto",
        "ingest : Install Python and venv",
        "dashboard : Install Python and venv",
    ):
        block = cloud.first.output.split(f"TASK [{task}]", 1)[1].split("TASK [", 1)[0]
        assert f"skipping: [{HOST}]" in block, block
    for unit, (state, _) in cloud.invocations.items():
        assert state == "active", (unit, cloud.box.journal(unit)[-3000:])
    # Each server started once, with its config (not started, then restarted by a handler).
    assert cloud.starts == dict.fromkeys(cloud.starts, 1), cloud.starts
    # The extension was built in the container from the cached Debian source.
    built = cloud.first.output.split("TASK [timescaledb : Build and install", 1)[1]
    assert f"changed: [{HOST}]" in built.split("TASK [", 1)[0]
    upstream = timescaledb_pin().split("+", 1)[0]
    with cloud.db() as conn:
        version = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
        ).fetchone()
        assert version == (upstream,)
        assert conn.execute("SHOW ssl").fetchone() == ("on",)
    health = f"http://127.0.0.1:{cloud.ports['dashboard']}/_stcore/health"
    with urllib.request.urlopen(health, timeout=30) as answer:
        assert answer.status == 200


def test_second_run_changes_nothing_and_restarts_nothing(cloud: Cloud) -> None:
    assert cloud.second.rc == 0, cloud.second.output[-6000:]
    assert cloud.second.count(HOST, "changed") == 0, cloud.second.output[-6000:]
    assert _invocations(cloud.box) == cloud.invocations
    print(
        f"converge: first {cloud.seconds['first']:.1f} s changed="
        f"{cloud.first.count(HOST, 'changed')}, second {cloud.seconds['second']:.1f} s"
        f" changed={cloud.second.count(HOST, 'changed')}"
    )


@pytest.fixture
def observer(cloud: Cloud) -> Iterator[Observer]:
    cert, key = cloud.pki.files(OBSERVER)
    client = tls_client(OBSERVER, ca=cloud.pki.ca, cert=cert, key=key)
    watcher = Observer(client)
    client.on_message = watcher.on_message
    subscribed = threading.Event()
    client.on_subscribe = lambda *args: subscribed.set()
    client.connect("localhost", cloud.ports["broker"])
    client.loop_start()
    try:
        client.subscribe(topics.data_topic(GATEWAY), qos=1)
        assert subscribed.wait(30), "the observer's subscription was not acknowledged"
        yield watcher
    finally:
        client.disconnect()
        client.loop_stop()


def _stored(cloud: Cloud) -> dict[tuple[str, int, int], tuple[Any, ...]]:
    with cloud.db() as conn:
        rows = conn.execute(
            "SELECT m.name, (extract(epoch FROM r.ts) * 1000)::bigint, r.period_s, r.count,"
            " r.sum, r.min, r.max, r.first, r.last, r.sumsq, r.rejected"
            " FROM readings r JOIN devices d ON d.id = r.device_id"
            " JOIN metrics m ON m.id = r.metric_id WHERE d.name = %s",
            [GATEWAY],
        ).fetchall()
    return {(r[0], int(r[1]), int(r[2])): tuple(r[3:]) for r in rows}


def _wait(what: str, predicate: Any, timeout: float) -> None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_gateway_windows_land_in_the_containers_timescaledb(
    cloud: Cloud, observer: Observer
) -> None:
    gateway = cloud.work / "gateway"
    (gateway / "pki").mkdir(parents=True)
    cert, key = cloud.pki.files(GATEWAY)
    for source, name in ((cloud.pki.ca, "ca.crt"), (cert, "device.crt"), (key, "device.key")):
        (gateway / "pki" / name).write_bytes(source.read_bytes())
    (gateway / "pki" / "device.key").chmod(0o600)
    context = provision.agent_config_context(
        GATEWAY,
        broker_host="localhost",
        broker_port=cloud.ports["broker"],
        config_dir=str(gateway),
        state_dir=str(gateway / "state"),
    )
    template = gateway / "agent.toml.tmpl"
    template.write_text(TEST_AGENT_TEMPLATE)
    config = gateway / "agent.toml"
    config.write_text(provision.render_agent_config(template, context))
    log = gateway / "agent.log"
    with running_agent(VENV_BIN / "millrace", config, log) as agent:
        _wait(
            f"{WINDOWS_WANTED} windows from the agent",
            lambda: agent.poll() is None and len(observer.seen()) >= WINDOWS_WANTED,
            WINDOWS_TIMEOUT_SECONDS,
        )
        assert agent.poll() is None, log.read_text()[-3000:]
    # The agent has stopped: once the last batch it sent is in, the two sides agree.
    _wait(
        "every window sent to be stored",
        lambda: observer.seen().keys() <= _stored(cloud).keys(),
        STORED_TIMEOUT_SECONDS,
    )
    stored, sent = _stored(cloud), observer.seen()
    # Exactly what was sent, value for value, and nothing else.
    assert stored == sent, (sorted(stored.items()), sorted(sent.items()))
    print(f"windows landed: {len(stored)} (metric test.sine, 1 s windows) from {GATEWAY}")
