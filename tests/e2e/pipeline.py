"""A whole millrace pipeline for end-to-end tests, built from the real programs.

simulated devices (`millrace sim`, ground truth on) -> edge agents (`millrace edge run`,
one per simulated gateway, configs from millrace.ops.stack.edgeconfig as `millrace up` makes
them) -> the TLS broker (tests/fixtures/fix_broker.py) -> one ingest worker
(`millrace ingest`) -> TimescaleDB (tests/fixtures/fix_postgres.py, schema from
cloud.dbupgrade). Every program is a subprocess the test can SIGKILL and restart; the
broker and the database can be stopped and started on the same port.

`wait_quiescent` waits until every batch any agent ever wrote to its outbox is in the
database (ledger or dead letters), counted exactly from the outbox's own id sequence;
`reconcile` then judges every window against the ground truth (tests/e2e/reconcile.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import glob
import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psycopg
from psycopg import sql

from millrace.cloud import dbupgrade
from millrace.ops.stack.edgeconfig import BrokerEndpoint, edge_config_toml, gateways_from_manifest
from millrace.topics import data_topic
from millrace.wire import Batch, Rejection, decode_batch
from tests.e2e.reconcile import Life, Reconciliation, Stored, load_ground_truth, reconcile

# The shortest window the cloud accepts (cloud.config DEFAULT_ALLOWED_PERIODS_S) that is
# longer than the 2 s grace edge_config_toml writes (edge requires grace < period).
PERIOD_SECONDS: Final = 5
HEARTBEAT_SECONDS: Final = 2.0
# Production agents back off up to 60 s; the tests cap it so a restored broker is found
# within a second (before the ingest worker, whose paho backoff doubles to 2 minutes, the
# order in which a fleet usually returns), and drain backlog slowly enough that heartbeats
# report it.
RECONNECT_MAX_SECONDS: Final = 1.0
BACKLOG_BATCHES_PER_SECOND: Final = 2.0
SERVICE_ID: Final = "svc-test"  # the session PKI's service identity (fix_broker)
SHARE_GROUP: Final = "ingest-e2e"
DATABASE: Final = "millrace_e2e"
INGEST_LOGIN: Final = "e2e_ingest"
DASHBOARD_LOGIN: Final = "e2e_dashboard"
# Seconds after the local-broker CONNACK is logged by which the SUBACK has surely come.
READY_MARGIN_SECONDS: Final = 1.0
READY_LINE: Final = "connected to local broker"
START_TIMEOUT_SECONDS: Final = 60.0
STOP_TIMEOUT_SECONDS: Final = 30.0
QUIESCE_TIMEOUT_SECONDS: Final = 120.0
# Longer than the worker's batching delay and the agents' backlog pacing between two batches.
STALL_SECONDS: Final = 10.0
POLL_SECONDS: Final = 0.1
PR_SET_PDEATHSIG: Final = 1  # linux/prctl.h
FAKETIME_LIBS: Final = (
    "/usr/lib/*/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
)


def _die_with_parent() -> None:
    """In the child: SIGKILL if the test run dies, so nothing outlives it."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_range(count: int) -> int:
    """The first of `count` consecutive free ports (the simulator's PLCs)."""
    for _ in range(50):
        base = free_port()
        if base + count > 65535:
            continue
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until(predicate: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(POLL_SECONDS)


def faketime_env(offset_s: int) -> dict[str, str]:
    """Environment that runs a program with its wall clock `offset_s` ahead (libfaketime).

    Monotonic time stays real, so waits behave; only timestamps shift. (libfaketime 0.9.10
    then fails `time.sleep` with EINVAL, which paho's reconnect wait uses: such an agent
    must keep its broker connection during a test.)
    """
    libs = [path for pattern in FAKETIME_LIBS for path in glob.glob(pattern)]
    if not libs:
        raise RuntimeError(
            "libfaketime is missing: the wrong-clock gateway needs it (apt-get install faketime)"
        )
    return {
        "LD_PRELOAD": libs[0],
        "FAKETIME": f"{offset_s:+d}s",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


# -- processes -------------------------------------------------------------------------------


class Child:
    """One program of the pipeline: own session, output appended to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.running, f"{self.name} is already running"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **self.env},
                preexec_fn=_die_with_parent,
            )

    def send(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float = STOP_TIMEOUT_SECONDS) -> int:
        """Wait for the exit; SIGKILL and fail if it does not come."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} did not exit within {timeout_s:.0f} s") from None

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        self.send(signal.SIGKILL)
        self.wait()

    def terminate(self) -> int:
        self.send(signal.SIGTERM)
        return self.wait()

    def close(self) -> None:
        if self.running:
            with contextlib.suppress(AssertionError):
                self.terminate()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def _millrace(*args: str) -> list[str]:
    return [sys.executable, "-m", "millrace.cli", *args]


@dataclass
class Agent:
    """An edge agent of one simulated gateway, across its restarts (one `Life` each)."""

    gateway: str
    config_path: Path
    outbox_path: Path
    log_dir: Path
    clock_offset_s: int = 0
    lives: list[Life] = field(default_factory=list)
    child: Child | None = None
    _started_at: float = 0.0
    _ready_at: float = 0.0

    def start(self) -> None:
        env = faketime_env(self.clock_offset_s) if self.clock_offset_s else {}
        log_path = self.log_dir / f"edge-{self.gateway}.{len(self.lives) + 1}.log"
        self.child = Child(
            f"edge {self.gateway}",
            _millrace("edge", "run", "--config", str(self.config_path)),
            log_path=log_path,
            env=env,
        )
        self._started_at = time.time()
        self._ready_at = math.inf
        self.child.start()

    def wait_ready(self, timeout_s: float = START_TIMEOUT_SECONDS) -> float:
        """Wait until the agent reads every source; returns the time it surely does."""
        child = self.child
        assert child is not None
        deadline = time.monotonic() + timeout_s
        while READY_LINE not in child.log_text():
            if not child.running:
                raise AssertionError(f"{child.name} exited:\n{child.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{child.name} not ready:\n{child.tail()}")
            time.sleep(POLL_SECONDS)
        self._ready_at = time.time() + READY_MARGIN_SECONDS
        return self._ready_at

    def stop(self, *, kill: bool) -> None:
        """SIGKILL (a power cut) or SIGTERM (windows closed into the outbox) and wait."""
        child = self.child
        assert child is not None and child.running, f"agent {self.gateway} is not running"
        stopped_at = time.time()
        child.send(signal.SIGKILL if kill else signal.SIGTERM)
        code = child.wait()
        if not kill:
            assert code == 0, f"{child.name} exited {code}:\n{child.tail()}"
        self._finish(stopped_at, kill=kill)

    def _finish(self, stopped_at: float, *, kill: bool) -> None:
        ready = self._ready_at if math.isfinite(self._ready_at) else stopped_at
        self.lives.append(Life(self._started_at, ready, stopped_at, time.time(), kill))
        self.child = None

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.running

    def outbox(self) -> tuple[int, int, int]:
        """(batches waiting, batches ever written, batches dropped), read from its SQLite file."""
        if not self.outbox_path.exists():
            return 0, 0, 0
        with contextlib.closing(sqlite3.connect(self.outbox_path, timeout=5.0)) as db:
            waiting = db.execute("SELECT count(*) FROM batches").fetchone()[0]
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'batches'").fetchone()
            dropped = db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
        return int(waiting), int(row[0]) if row else 0, int(dropped[0]) if dropped else 0


class Worker:
    """The ingest worker subprocess and its /healthz and /metrics endpoint."""

    def __init__(self, config_path: Path, *, http_port: int, log_dir: Path) -> None:
        self.config_path = config_path
        self.http_port = http_port
        self.log_dir = log_dir
        self.starts = 0
        self.child: Child | None = None

    def start(self) -> None:
        self.starts += 1
        self.child = Child(
            "ingest",
            _millrace("ingest", "--config", str(self.config_path)),
            log_path=self.log_dir / f"ingest.{self.starts}.log",
        )
        self.child.start()

    def healthy(self) -> bool:
        assert self.child is not None
        if not self.child.running:
            raise AssertionError(f"ingest worker exited:\n{self.child.tail()}")
        try:
            with urllib.request.urlopen(self._url("/healthz"), timeout=2.0) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_SECONDS) -> None:
        wait_until(self.healthy, timeout_s=timeout_s, what="the ingest worker to be healthy")

    def metric(self, name: str) -> float:
        """Sum of a Prometheus sample family (all labels) of the running worker."""
        with urllib.request.urlopen(self._url("/metrics"), timeout=5.0) as reply:
            text = reply.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name)] in " {":
                total += float(line.rsplit(" ", 1)[1])
        return total

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"


# -- the database side -----------------------------------------------------------------------


def _prepare_database(owner_dsn: str) -> None:
    """Schema by `db upgrade`, and least-privilege logins for the worker and the dashboard."""
    dbupgrade.upgrade(owner_dsn)
    with psycopg.connect(owner_dsn, autocommit=True) as conn:
        for login, role in (
            (INGEST_LOGIN, dbupgrade.INGEST_ROLE),
            (DASHBOARD_LOGIN, dbupgrade.DASHBOARD_ROLE),
        ):
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                    sql.Identifier(login), sql.Identifier(role)
                )
            )


def stored_readings(dsn: str, *, period_s: int) -> list[Stored]:
    """Every window of `period_s` in the readings table."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            """
            SELECT d.name, m.name, (extract(epoch FROM r.ts) * 1000)::bigint, r.count, r.sum,
                   r.min, r.max, r.first, r.last, r.rejected
            FROM readings r
            JOIN devices d ON d.id = r.device_id
            JOIN metrics m ON m.id = r.metric_id
            WHERE r.period_s = %s
            """,
            (period_s,),
        ).fetchall()
    return [Stored(*row) for row in rows]


def dead_letter_batches(dsn: str) -> tuple[list[Batch], int]:
    """Decoded data batches in the dead-letter table (unique by device, boot, seq) and repeats."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT device, topic, content_type, payload FROM dead_letters ORDER BY id"
        ).fetchall()
    unique: dict[tuple[str, str, int], Batch] = {}
    repeats = 0
    for device, topic, content_type, payload in rows:
        if device is None or topic != data_topic(device):
            continue
        batch = decode_batch(bytes(payload), content_type=content_type)
        if isinstance(batch, Rejection):
            continue
        key = (batch.device, batch.boot_id, batch.seq)
        if key in unique:
            repeats += 1
        unique[key] = batch
    return list(unique.values()), repeats


def stored_dead_letters(batches: Sequence[Batch], *, period_s: int) -> list[Stored]:
    return [
        Stored(
            b.device,
            w.metric,
            w.start_ms,
            w.count,
            w.sum,
            w.min,
            w.max,
            w.first,
            w.last,
            w.rejected,
            "dead_letters",
        )
        for b in batches
        for w in b.windows
        if w.period_s == period_s
    ]


def ledger_batches(dsn: str) -> Counter[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT d.name, count(*) FROM ingest_ledger l JOIN devices d ON d.id = l.device_id"
            " GROUP BY d.name"
        ).fetchall()
    return Counter({name: int(n) for name, n in rows})


# -- the pipeline ----------------------------------------------------------------------------


class Pipeline:
    """Starts, disturbs, quiesces and reconciles one simulated plant.

    `broker` is a started fix_broker.MosquittoServer, `database` a started
    fix_postgres.PostgresServer; both belong to the caller's fixtures.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        pki: Any,
        broker: Any,
        database: Any,
        gateways: int,
        clock_offsets_s: Mapping[str, int] | None = None,
        sim_faults_toml: str = "",
        seed: int = 0,
    ) -> None:
        self.workdir = workdir
        self.pki = pki
        self.broker = broker
        self.database = database
        self.gateway_count = gateways
        self.clock_offsets_s = dict(clock_offsets_s or {})
        self.sim_faults_toml = sim_faults_toml
        self.seed = seed
        self.period_s = PERIOD_SECONDS
        self.grace_s = 0.0
        self.logs = workdir / "logs"
        self.manifest_path = workdir / "sim" / "manifest.json"
        self.ground_truth_path = workdir / "sim" / "ground-truth.csv"
        self.manifest: dict[str, Any] = {}
        self.agents: dict[str, Agent] = {}
        self.children: list[Child] = []
        self.sim: Child | None = None
        self.worker: Worker | None = None
        self.owner_dsn = ""
        self.ingest_dsn = ""
        self.dashboard_dsn = ""
        self.timeline: list[tuple[float, str]] = []

    # -- start-up --------------------------------------------------------------------------

    def start(self) -> None:
        """Database, gateway-local broker, worker, simulator, then one agent per gateway."""
        self.owner_dsn = self.database.create_database(DATABASE)
        _prepare_database(self.owner_dsn)
        self.ingest_dsn = self.database.dsn_for(DATABASE, user=INGEST_LOGIN)
        self.dashboard_dsn = self.database.dsn_for(DATABASE, user=DASHBOARD_LOGIN)
        local_port = self._start_local_broker()
        self._start_worker()
        self._start_sim(local_port)
        self._start_agents()
        self.mark("all agents ready")

    def mark(self, what: str) -> float:
        now = time.time()
        self.timeline.append((now, what))
        return now

    def _spawn(self, child: Child) -> Child:
        self.children.append(child)
        child.start()
        return child

    def _start_local_broker(self) -> int:
        """The plain gateway-side broker the simulated sensor nodes publish to."""
        port = free_port()
        conf = self.workdir / "local-mqtt" / "mosquitto.conf"
        conf.parent.mkdir(parents=True)
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stdout\n"
        )
        child = self._spawn(
            Child("local mqtt", ["mosquitto", "-c", str(conf)], log_path=self.logs / "local.log")
        )

        def listening() -> bool:
            if not child.running:
                raise AssertionError(f"local mosquitto exited:\n{child.tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return True
            return False

        wait_until(listening, timeout_s=START_TIMEOUT_SECONDS, what="the local broker")
        return port

    def _start_worker(self) -> None:
        cert, key = self.pki.issue(SERVICE_ID, role="service")
        http_port = free_port()
        config = self.workdir / "ingest.toml"
        config.write_text(
            f'[database]\ndsn = "{self.ingest_dsn}"\n\n'
            f'[broker]\nhost = "{self.broker.host}"\nport = {self.broker.port}\n'
            f'ca = "{self.pki.ca}"\ncert = "{cert}"\nkey = "{key}"\n'
            f'client_id = "e2e-ingest"\nshare_group = "{SHARE_GROUP}"\n\n'
            f'[http]\nhost = "127.0.0.1"\nport = {http_port}\n\n'
            "[retention]\nenabled = false\n"
        )
        self.worker = Worker(config, http_port=http_port, log_dir=self.logs)
        self.start_worker()

    def start_worker(self) -> None:
        assert self.worker is not None
        self.worker.start()
        assert self.worker.child is not None
        self.children.append(self.worker.child)
        self.worker.wait_healthy()
        self.mark(f"ingest worker start #{self.worker.starts} healthy")

    def kill_worker(self) -> float:
        assert self.worker is not None and self.worker.child is not None
        at = self.mark("ingest worker SIGKILL")
        self.worker.child.kill()
        return at

    def _start_sim(self, local_port: int) -> None:
        argv = _millrace(
            "sim",
            "--devices",
            str(self.gateway_count),
            "--seed",
            str(self.seed),
            "--base-port",
            str(free_port_range(self.gateway_count)),
            "--mqtt-host",
            "127.0.0.1",
            "--mqtt-port",
            str(local_port),
            "--w1-dir",
            str(self.workdir / "sim" / "w1"),
            "--manifest",
            str(self.manifest_path),
            "--ground-truth",
            str(self.ground_truth_path),
        )
        if self.sim_faults_toml:
            faults = self.workdir / "sim" / "faults.toml"
            faults.parent.mkdir(parents=True, exist_ok=True)
            faults.write_text(self.sim_faults_toml)
            argv += ["--faults", str(faults)]
        self.sim = self._spawn(Child("simulator", argv, log_path=self.logs / "sim.log"))

        def running() -> bool:
            assert self.sim is not None
            if not self.sim.running:
                raise AssertionError(f"simulator exited:\n{self.sim.tail()}")
            if not self.manifest_path.exists():
                return False
            self.manifest = json.loads(self.manifest_path.read_text())
            return self.manifest.get("status") == "running"

        wait_until(running, timeout_s=START_TIMEOUT_SECONDS, what="the simulator's manifest")
        self.mark("simulator running")

    def _start_agents(self) -> None:
        for gateway, devices in sorted(gateways_from_manifest(self.manifest).items()):
            cert, key = self.pki.issue(gateway)
            state_dir = self.workdir / "edge" / gateway
            state_dir.mkdir(parents=True)
            text = edge_config_toml(
                gateway_id=gateway,
                devices=devices,
                broker=BrokerEndpoint(
                    host=self.broker.host, port=self.broker.port, ca=self.pki.ca, cert=cert, key=key
                ),
                state_dir=state_dir,
                period_s=self.period_s,
                heartbeat_s=HEARTBEAT_SECONDS,
            )
            text = with_broker_options(
                text,
                reconnect_max_s=RECONNECT_MAX_SECONDS,
                backlog_batches_per_s=BACKLOG_BATCHES_PER_SECOND,
            )
            config = tomllib.loads(text)
            self.grace_s = float(config["windows"]["grace_s"])
            path = state_dir / "config.toml"
            path.write_text(text)
            self.agents[gateway] = Agent(
                gateway,
                path,
                Path(config["outbox"]["path"]),
                self.logs,
                self.clock_offsets_s.get(gateway, 0),
            )
        for agent in self.agents.values():
            self._start_agent(agent)
        for agent in self.agents.values():
            agent.wait_ready()

    def _start_agent(self, agent: Agent) -> None:
        agent.start()
        assert agent.child is not None
        self.children.append(agent.child)

    # -- disturbances ----------------------------------------------------------------------

    def start_agent(self, gateway: str) -> float:
        """Start a stopped agent again and wait until it reads every source."""
        agent = self.agents[gateway]
        self._start_agent(agent)
        ready = agent.wait_ready()
        self.mark(f"agent {gateway} restarted")
        return ready

    def kill_agent(self, gateway: str) -> float:
        at = self.mark(f"agent {gateway} SIGKILL")
        self.agents[gateway].stop(kill=True)
        return at

    def stop_agents(self) -> None:
        """SIGTERM every running agent at once: each closes its open windows into the outbox."""
        running = [a for a in self.agents.values() if a.running]
        stopped_at = self.mark("agents SIGTERM")
        for agent in running:
            assert agent.child is not None
            agent.child.send(signal.SIGTERM)
        for agent in running:
            assert agent.child is not None
            code = agent.child.wait()
            assert code == 0, f"{agent.child.name} exited {code}:\n{agent.child.tail()}"
            agent._finish(stopped_at, kill=False)

    def stop_sim(self) -> None:
        """SIGTERM the simulator; it flushes and closes the ground truth."""
        assert self.sim is not None
        code = self.sim.terminate()
        assert code == 0, f"simulator exited {code}:\n{self.sim.tail()}"
        self.manifest = json.loads(self.manifest_path.read_text())
        assert self.manifest["status"] == "stopped"
        self.mark("simulator stopped")

    # -- quiescence ------------------------------------------------------------------------

    def delivery(self) -> dict[str, tuple[int, int, int]]:
        """Per gateway: (batches in its outbox, batches it ever wrote, batches in the cloud)."""
        ledger = ledger_batches(self.owner_dsn)
        dead, _ = dead_letter_batches(self.owner_dsn)
        refused = Counter(b.device for b in dead)
        state = {}
        for gateway, agent in self.agents.items():
            waiting, written, dropped = agent.outbox()
            assert dropped == 0, f"{gateway} dropped {dropped} batches at its outbox cap"
            state[gateway] = (waiting, written, ledger[gateway] + refused[gateway])
        return state

    def wait_quiescent(
        self, timeout_s: float = QUIESCE_TIMEOUT_SECONDS, *, stall_s: float = STALL_SECONDS
    ) -> dict[str, int]:
        """Wait until every batch ever written to an outbox is stored; returns batches per gateway.

        Outbox ids only grow, so the highest id ever assigned is the number of batches the
        agent wrote; the cloud must hold exactly that many distinct (boot_id, seq), and
        the worker's drain must have merged every committed rollup partial. Fails
        early when every outbox is empty (the broker acknowledged everything), the worker
        is healthy, and the number missing has not gone down for `stall_s`: those batches
        are gone.
        """
        deadline = time.monotonic() + timeout_s
        fewest = math.inf
        progress_at = time.monotonic()
        while True:
            state = self.delivery()
            for gateway, (_, written, stored) in state.items():
                assert stored <= written, f"{gateway}: {stored} batches stored, {written} written"
            stored_all = all(w == 0 and stored == written for w, written, stored in state.values())
            if stored_all and self.rollup_partials_pending() == 0:
                self.mark("quiescent")
                return {gateway: written for gateway, (_, written, _) in state.items()}
            now = time.monotonic()
            # Running agents keep writing (a new batch is briefly written but not yet
            # stored), so progress is the fewest batches missing so far going down.
            missing = {g: written - stored for g, (_, written, stored) in state.items()}
            if sum(missing.values()) < fewest:
                fewest, progress_at = sum(missing.values()), now
            if (
                now - progress_at > stall_s
                and all(w == 0 for w, _, _ in state.values())
                and self.worker is not None
                and self.worker.healthy()
            ):
                raise AssertionError(
                    f"batches acknowledged by the broker never reached the database: missing"
                    f" {missing}; open sequence gaps {self.open_gaps()}"
                )
            if now > deadline:
                raise AssertionError(
                    f"timed out after {timeout_s:.0f} s waiting for every outbox batch in the"
                    f" database and its rollups: (waiting, written, stored) = {state},"
                    f" rollup partials pending {self.rollup_partials_pending()}"
                )
            time.sleep(POLL_SECONDS)

    def rollup_partials_pending(self) -> int:
        """Partials committed with their readings that the drain has not merged yet."""
        with psycopg.connect(self.owner_dsn) as conn:
            row = conn.execute("SELECT count(*) FROM rollup_pending").fetchone()
        return int(row[0]) if row else 0

    def open_gaps(self) -> list[tuple[str, int, int]]:
        """(device, seq_from, seq_to) of every open sequence gap."""
        with psycopg.connect(self.owner_dsn) as conn:
            rows = conn.execute(
                "SELECT d.name, g.seq_from, g.seq_to FROM sequence_gaps g"
                " JOIN devices d ON d.id = g.device_id ORDER BY 1, 2"
            ).fetchall()
        return [(name, int(a), int(b)) for name, a, b in rows]

    # -- verdict ---------------------------------------------------------------------------

    def reconcile(self) -> Reconciliation:
        """Judge every window of every gateway against the ground truth (sim stopped first)."""
        assert self.sim is not None and not self.sim.running, "stop the simulator first"
        truth = load_ground_truth(self.ground_truth_path, self.manifest)
        dead, _ = dead_letter_batches(self.owner_dsn)
        stored = stored_readings(self.owner_dsn, period_s=self.period_s)
        stored += stored_dead_letters(dead, period_s=self.period_s)
        # Kept next to the logs and the ground truth for whoever debugs a failure.
        inputs = {
            "period_s": self.period_s,
            "grace_s": self.grace_s,
            "clock_offsets_s": self.clock_offsets_s,
            "lives": {g: [dataclasses.asdict(x) for x in a.lives] for g, a in self.agents.items()},
            "stored": [dataclasses.asdict(w) for w in stored],
        }
        (self.workdir / "reconcile-inputs.json").write_text(json.dumps(inputs, indent=0))
        return reconcile(
            truth,
            stored,
            lives={gateway: agent.lives for gateway, agent in self.agents.items()},
            period_s=self.period_s,
            grace_s=self.grace_s,
            clock_offsets_s=self.clock_offsets_s,
        )

    def describe_timeline(self) -> str:
        if not self.timeline:
            return ""
        t0 = self.timeline[0][0]
        return "\n".join(f"  +{t - t0:6.1f} s  {what}" for t, what in self.timeline)

    def close(self) -> None:
        """Stop every program this pipeline started, newest first."""
        for child in reversed(self.children):
            child.close()


def with_broker_options(config_toml: str, **options: float) -> str:
    """Add keys to the [broker] table of a generated edge config."""
    header = "[broker]\n"
    if header not in config_toml:
        raise ValueError("no [broker] table in the edge config")
    lines = "".join(f"{key} = {value!r}\n" for key, value in options.items())
    return config_toml.replace(header, header + lines, 1)
