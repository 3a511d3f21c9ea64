"""Flashing for real: a bundle put on a gateway's card with `millrace provision --sd`, booted.

The card is a booted Debian container's root file system (systemd 252 as PID 1). On first
boot millrace-firstboot.service installs the staged bundle from its own wheels, and the
agent starts under its hardened unit (Type=notify, watchdog), publishes to a mosquitto with
the project's production config (TLS, dynsec roles, client id = certificate name) on the
host's loopback, and an ingest worker
stores its windows in TimescaleDB and receipts them. Then the gateway is abused: its agent
is frozen (the watchdog must restart it) and its power is cut (its init SIGKILLed) while
the cloud is away (the outbox must survive and drain once both are back).

The tests run in file order on one gateway. Figures go to stdout (`-s`): time from boot to
a running agent, the unit's `systemd-analyze security` exposure, watchdog restart time.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from tests.ansible.rollout_support import (
    agent_wheel,  # noqa: F401 - fixture
    wheelhouse,  # noqa: F401 - fixture
)
from tests.cloud.ingest_support import IngestDb, WorkerThread, make_config, prepare_database
from tests.fixtures.fix_broker import MosquittoServer, PKIFixture
from tests.fixtures.fix_postgres import PostgresServer, database_name_for
from tests.fixtures.fix_system import Container, ContainerFactory
from tests.system.flash_support import GATEWAY_TEMPLATE

pytestmark = [pytest.mark.system, pytest.mark.integration]

DEVICE = "gw-flash"
UNIT = "millrace-edge.service"
FIRSTBOOT_UNIT = "millrace-firstboot.service"
OUTBOX = "/var/lib/millrace/outbox.sqlite"
FIRST_BOOT_TIMEOUT_SECONDS = 300.0
STORE_TIMEOUT_SECONDS = 90.0
# The test shortens the unit's 60 s watchdog with a drop-in; a frozen agent then ignores the
# watchdog's SIGABRT until TimeoutAbortSec (the unit's TimeoutStopSec=30) ends in SIGKILL.
TEST_WATCHDOG_SECONDS = 10
WATCHDOG_TIMEOUT_SECONDS = 150.0
BACKLOG_BATCHES = 5
_EXPOSURE = re.compile(r"Overall exposure level for \S+: ([0-9.]+) (\w+)")
_STARTING = re.compile(
    r"agent \S+ starting: boot_id=(\S+), \d+ signal\(s\), (\d+) batch\(es\) waiting"
)


class Cloud:
    """The ingest worker for the gateway's windows; stopped and started by the tests."""

    def __init__(self, db: IngestDb, broker: MosquittoServer, work: Path) -> None:
        self.db = db
        self.config = make_config(
            work, server=broker, dsn=db.ingest_dsn, client_id="flash-ingest", group="flash"
        )
        self.worker: WorkerThread | None = None

    def start(self) -> None:
        if self.worker is None:
            self.worker = WorkerThread(self.config).start()

    def stop(self) -> None:
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.stop()

    def ledger(self) -> set[tuple[str, int]]:
        """(boot_id, seq) of every batch of DEVICE the database committed."""
        with psycopg.connect(self.db.owner_dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT l.boot_id::text, l.seq FROM ingest_ledger l"
                " JOIN devices d ON d.id = l.device_id WHERE d.name = %s",
                (DEVICE,),
            ).fetchall()
        return {(uuid.UUID(str(boot)).hex, int(seq)) for boot, seq in rows}

    def holes(self) -> dict[str, tuple[set[str], float, float]]:
        """Holes recorded after unclean ends: ended boot -> (metrics, from, to) in epoch s."""
        with psycopg.connect(self.db.owner_dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT h.prev_boot_id, h.metric, extract(epoch FROM h.from_ts)::float8,"
                " extract(epoch FROM h.to_ts)::float8 FROM data_holes h"
                " JOIN devices d ON d.id = h.device_id WHERE d.name = %s",
                (DEVICE,),
            ).fetchall()
        out: dict[str, tuple[set[str], float, float]] = {}
        for boot, metric, low, high in rows:
            metrics, *_ = out.setdefault(boot.hex, (set(), low, high))
            metrics.add(metric)
        return out

    def readings(self) -> int:
        with psycopg.connect(self.db.owner_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id"
                " WHERE d.name = %s",
                (DEVICE,),
            ).fetchone()
        return int(row[0]) if row else 0


@dataclass
class Gateway:
    box: Container
    cloud: Cloud
    provision_output: str
    first_boot_seconds: float
    figures: dict[str, object] = field(default_factory=dict)

    def main_pid(self) -> int:
        return int(self.box.unit_property(UNIT, "MainPID"))

    def active(self) -> bool:
        return self.box.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "active"

    def outbox(self) -> set[tuple[str, int]]:
        """(boot_id, seq) of the batches in the gateway's outbox (read inside the container)."""
        script = (
            "import json, sqlite3, sys\n"
            "c = sqlite3.connect(sys.argv[1], timeout=10)\n"
            "print(json.dumps(c.execute('SELECT boot_id, seq FROM batches').fetchall()))\n"
        )
        out = self.box.run("python3", "-c", script, OUTBOX).stdout
        return {(uuid.UUID(str(boot)).hex, int(seq)) for boot, seq in json.loads(out)}

    def starts(self) -> list[tuple[str, int]]:
        """(boot_id, batches waiting) of every agent start in the journal, oldest first."""
        return [(m[1], int(m[2])) for m in _STARTING.finditer(self.box.journal(UNIT))]


@pytest.fixture(scope="module")
def flash_db(pg_server: PostgresServer) -> Iterator[IngestDb]:
    name = database_name_for("system_flashing")
    dsn = pg_server.create_database(name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        yield prepare_database(dsn)
    finally:
        pg_server.drop_database(name)


@pytest.fixture(scope="module")
def plant_broker(
    test_pki: PKIFixture, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MosquittoServer]:
    """A broker with the production setting: the client id is the certificate's name."""
    server = MosquittoServer(
        test_pki, tmp_path_factory.mktemp("plant-broker"), clientid_from_certificate=True
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gateway(
    module_container_factory: ContainerFactory,
    tmp_path_factory: pytest.TempPathFactory,
    test_pki: PKIFixture,
    plant_broker: MosquittoServer,
    flash_db: IngestDb,
    agent_wheel: Path,  # noqa: F811
    wheelhouse: Path,  # noqa: F811
) -> Iterator[Gateway]:
    """`millrace provision --sd` onto a container's disk, then its first boot."""
    work = tmp_path_factory.mktemp("flash")
    broker = plant_broker
    cloud = Cloud(flash_db, broker, work)
    cloud.start()
    box = module_container_factory(boot=False)
    template = work / "agent.toml.tmpl"
    template.write_text(GATEWAY_TEMPLATE)
    made = subprocess.run(
        [
            sys.executable, "-m", "millrace.cli", "provision", DEVICE,
            "--pki", str(test_pki.dir), "--out", str(work / f"{DEVICE}.tar.gz"),
            "--config", str(template), "--broker", f"{broker.host}:{broker.port}",
            "--wheel", str(agent_wheel), "--wheelhouse", str(wheelhouse),
            "--sd", str(box.root),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    broker.sync()  # the new device's broker role (`millrace broker sync`)
    started = time.monotonic()
    box.boot()
    try:
        box.wait_for(
            f"{UNIT} to be active after first boot",
            lambda: box.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "active",
            timeout=FIRST_BOOT_TIMEOUT_SECONDS,
        )
    except AssertionError:
        journal = box.run("journalctl", "--no-pager", "-b", "-n", "80", check=False).stdout
        raise AssertionError(f"first boot did not start the agent:\n{journal}") from None
    gw = Gateway(box, cloud, made.stdout, time.monotonic() - started)
    print(f"\nfirst boot to active agent: {gw.first_boot_seconds:.1f} s")
    try:
        yield gw
    finally:
        cloud.stop()


def test_first_boot_installs_the_staged_bundle_and_disables_itself(gateway: Gateway) -> None:
    box = gateway.box
    assert "sd rootfs: installs on first boot" in gateway.provision_output
    log = box.journal(FIRSTBOOT_UNIT)
    assert "manifest verified" in log, log
    assert "installed; first-boot service disabled" in log, log
    # Before the agent's first start, the check connected with the device's identity.
    assert "millrace edge check passed (broker: mqtt check ok)" in log, log
    assert box.unit_property(FIRSTBOOT_UNIT, "Result") == "success"
    # The staged bundle (a copy of the device key among it) is gone, the hook is disabled.
    assert not box.path("/var/lib/millrace-firstboot").exists()
    assert not box.path(f"/etc/systemd/system/multi-user.target.wants/{FIRSTBOOT_UNIT}").exists()
    assert box.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    current = box.run("readlink", "/opt/millrace/current").stdout.strip()
    assert current.startswith("releases/0."), current
    # install.sh installs with `pip --isolated --no-index` from the bundle's wheels (the container
    # shares the host's network, so offline is proven by test_bundle_platforms, not here).
    assert box.path(f"/opt/millrace/{current}/.complete").exists()


def test_agent_runs_unprivileged_under_the_units_hardening(gateway: Gateway) -> None:
    box = gateway.box
    security = box.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    match = _EXPOSURE.search(security)
    assert match, security[-2000:]
    exposure, verdict = float(match[1]), match[2]
    gateway.figures["exposure"] = exposure
    print(f"\nsystemd-analyze security {UNIT}: {exposure} {verdict}")
    assert exposure <= 2.0, security  # 1.7 OK when first measured
    assert box.unit_property(UNIT, "Type") == "notify"
    assert box.unit_property(UNIT, "WatchdogUSec") == "1min"  # the template's 60 s
    pid = gateway.main_pid()
    status = box.run("cat", f"/proc/{pid}/status").stdout
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uid = box.run("id", "-u", "millrace").stdout.strip()
    assert fields["Uid"].split()[:2] == [uid, uid]
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"
    assert int(fields["CapEff"].strip(), 16) == 0
    # ProtectSystem=strict: in the agent's mount namespace /etc is read-only, while the
    # container's root may write there.
    denied = box.run("nsenter", "-t", str(pid), "-m", "touch", "/etc/millrace/probe", check=False)
    assert denied.returncode != 0
    assert "Read-only file system" in denied.stderr
    assert not box.path("/etc/millrace/probe").exists()


def test_windows_from_the_gateway_are_stored_and_receipted(gateway: Gateway) -> None:
    box = gateway.box
    cloud = gateway.cloud
    box.wait_for("windows stored", lambda: cloud.readings() >= 3, timeout=STORE_TIMEOUT_SECONDS)
    # Receipted batches leave the outbox: committed batches that are no longer on the gateway.
    box.wait_for(
        "stored batches receipted off the outbox",
        lambda: len(cloud.ledger() - gateway.outbox()) >= 3,
        timeout=STORE_TIMEOUT_SECONDS,
    )
    # The stored batches are this agent's: their boot ids are ones its journal announced.
    assert {boot for boot, _ in cloud.ledger()} <= {boot for boot, _ in gateway.starts()}


def test_agent_logs_reach_journald(gateway: Gateway) -> None:
    log = gateway.box.journal(UNIT)
    assert f"agent {DEVICE} starting: boot_id=" in log, log[-2000:]
    assert gateway.starts(), log[-2000:]
    # The agent's own log lines, not only systemd's about it.
    fields = gateway.box.run(
        "journalctl", "--no-pager", "-u", UNIT, "-o", "json", "_COMM=millrace"
    ).stdout.splitlines()
    assert fields, "no journal entries from the agent's process"


def test_documented_edge_check_runs_on_path_in_the_units_sandbox(gateway: Gateway) -> None:
    """docs/edge.md's command on a gateway: `sudo millrace edge check --sandbox` (as root)."""
    box = gateway.box
    pid = gateway.main_pid()
    done = box.run("millrace", "edge", "check", "--sandbox", "--json", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    broker = next(c for c in json.loads(done.stdout)["checks"] if c["check"] == "broker")
    # Beside the running agent: the TLS handshake only, and the agent's own CONNACK.
    assert broker["ok"] and broker["mode"] == "tls", broker
    assert broker["agent"]["pid"] == pid and broker["agent"]["connected"], broker
    assert gateway.main_pid() == pid
    log = box.run("journalctl", "--no-pager", "-b", "-o", "cat").stdout
    # systemd-run made the transient unit with the agent unit's sandbox, and it started.
    assert re.search(rf"Started run-\S+ - millrace edge check in the sandbox of {UNIT}", log)
    # As the agent's user: a key only root can read fails (exit 2 through systemd-run).
    key = "/etc/millrace/pki/device.key"
    box.run("chown", "root:root", key)
    try:
        refused = box.run("millrace", "edge", "check", "--sandbox", check=False)
    finally:
        box.run("chown", "millrace:millrace", key)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"broker.key: not readable: {key}" in refused.stderr


def test_watchdog_restarts_a_frozen_agent(gateway: Gateway) -> None:
    box = gateway.box
    dropin = box.path(f"/etc/systemd/system/{UNIT}.d/watchdog-test.conf")
    dropin.parent.mkdir(exist_ok=True)
    dropin.write_text(f"[Service]\nWatchdogSec={TEST_WATCHDOG_SECONDS}\n")
    try:
        box.run("systemctl", "daemon-reload")
        box.run("systemctl", "restart", UNIT)  # WATCHDOG_USEC is passed at exec
        before = int(box.unit_property(UNIT, "NRestarts"))
        frozen = gateway.main_pid()
        box.run("kill", "-STOP", str(frozen))
        frozen_at = time.time()
        took = box.wait_for(
            "the watchdog to restart the frozen agent",
            lambda: (
                int(box.unit_property(UNIT, "NRestarts")) > before
                and gateway.main_pid() not in (0, frozen)
                and gateway.active()
            ),
            timeout=WATCHDOG_TIMEOUT_SECONDS,
        )
        print(f"\nfrozen agent restarted by the watchdog after {took:.0f} s")
        assert "Watchdog timeout" in box.journal(UNIT, "--since", "-5min")
        starts = gateway.starts()
        assert len({boot for boot, _ in starts}) >= 2  # the restarted agent is a new boot
        # Loss is visible: the next start reports the frozen run's hole; the run before it
        # (stopped by `systemctl restart`, SIGTERM) ended cleanly and left none.
        frozen_boot, clean_boot = starts[-2][0], starts[-3][0]
        gateway.box.wait_for(
            "the frozen run's hole recorded",
            lambda: frozen_boot in gateway.cloud.holes(),
            timeout=STORE_TIMEOUT_SECONDS,
        )
        holes = gateway.cloud.holes()
        metrics, low, high = holes[frozen_boot]
        assert clean_boot not in holes, holes
        assert metrics and low <= frozen_at < high, (metrics, low, frozen_at, high)
        print(f"watchdog kill: hole of {len(metrics)} metric(s), {high - low:.0f} s, recorded")
    finally:
        dropin.unlink(missing_ok=True)
        box.run("systemctl", "daemon-reload", check=False)


def test_outbox_survives_a_power_cut_and_drains(gateway: Gateway) -> None:
    box = gateway.box
    cloud = gateway.cloud
    cloud.stop()  # no receipts: the outbox fills
    try:
        box.wait_for(
            f"{BACKLOG_BATCHES} batches waiting in the outbox",
            lambda: len(gateway.outbox()) >= BACKLOG_BATCHES,
            timeout=STORE_TIMEOUT_SECONDS,
        )
        backlog = gateway.outbox()
        starts_before = len(gateway.starts())
        cut_boot = gateway.starts()[-1][0]
        cut_at = time.time()

        box.power_cut()
        box.boot()
        box.wait_for("the agent after the power cut", gateway.active, timeout=60)

        starts = gateway.starts()
        assert len(starts) > starts_before
        _, waiting = starts[-1]
        assert waiting >= len(backlog), starts[-1]
        assert backlog <= gateway.outbox()  # every batch of the backlog is still there
    finally:
        cloud.start()
    try:
        took = box.wait_for(
            "the backlog stored and receipted",
            lambda: backlog <= cloud.ledger() and not (backlog & gateway.outbox()),
            timeout=STORE_TIMEOUT_SECONDS,
        )
    except AssertionError as exc:
        unstored = sorted(backlog - cloud.ledger())
        kept = sorted(backlog & gateway.outbox())
        raise AssertionError(
            f"{exc}\nnot stored: {unstored}\nstill in the outbox: {kept}\n"
            f"{box.journal(UNIT, '-n', '40')}"
        ) from None
    print(f"\nbacklog of {len(backlog)} batches survived the power cut, drained in {took:.0f} s")
    # Loss is visible: the window open at the cut is in the hole the next boot reported.
    box.wait_for(
        "the power cut's hole recorded",
        lambda: cut_boot in cloud.holes(),
        timeout=STORE_TIMEOUT_SECONDS,
    )
    metrics, low, high = cloud.holes()[cut_boot]
    assert metrics and low <= cut_at < high, (metrics, low, cut_at, high)
    print(f"power cut: hole of {len(metrics)} metric(s), {high - low:.0f} s, recorded")
