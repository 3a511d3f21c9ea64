"""Shared pieces of the end-to-end benchmarks: a private plant (PKI, TLS broker, TimescaleDB,
ingest worker) on free ports in temp directories, edge agent configs, and table printing.

Everything is started through millrace's own code (`millrace.ops.stack.postgres`,
`millrace.ops.stack.procs`, `millrace broker config`, `db upgrade`, `millrace ingest`,
`millrace edge run`), so a benchmark measures what `make up` and a deployment run.
The cluster tracks commit timestamps (`track_commit_timestamp = on`): a row's exact
commit time is `pg_xact_commit_timestamp(xmin)`, read on the server after the fact, so
latency needs no clock inside the pipeline.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

from millrace.ops import pki  # noqa: E402
from millrace.ops.broker import write_broker_config  # noqa: E402
from millrace.ops.stack import procs  # noqa: E402
from millrace.ops.stack.postgres import PostgresCluster, free_port  # noqa: E402

DATABASE = "millrace"
INGEST_LOGIN = "bench_ingest"
INGEST_SERVICE_ID = "bench-ingest"
START_TIMEOUT_SECONDS = 60.0
POLL_SECONDS = 0.1
# Durable like a deployment (fsync on, unlike the test clusters); commit times recorded.
BENCH_PG_SETTINGS = {"track_commit_timestamp": "on", "max_connections": "300"}
SIM_SIGNAL_TOML = (
    '\n[[signals]]\nmetric = "{metric}"\ndriver = "sim"\npoll_s = {poll_s}\n'
    "seed = {seed}\nnoise = 0.5\ncenter = 20\namplitude = 5\n"
)


def millrace_argv(*args: str) -> list[str]:
    """`millrace ARGS` run by this very interpreter."""
    return [sys.executable, "-m", "millrace.cli", *args]


def metric_names(count: int) -> list[str]:
    return [f"bench.s{i:02d}" for i in range(count)]


def machine() -> str:
    """One line naming the machine the figures come from."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    os_name = platform.platform()
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os_name}, {os.cpu_count()} CPUs ({cpu}), {mem_gb:.0f} GB RAM, "
        f"Python {platform.python_version()}"
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=1000, method="inclusive")[round(q * 10) - 1]


def print_table(rows: Sequence[tuple[str, str, str]]) -> None:
    """metric / value / note, aligned."""
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"{'metric':<{width}}  {'value':>{vwidth}}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>{vwidth}}  {note}".rstrip())
    sys.stdout.flush()


def wait_until(predicate: Any, *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(POLL_SECONDS)


@dataclass
class Plant:
    """PKI + TLS mosquitto + TimescaleDB + one `millrace ingest` worker, all private."""

    workdir: Path
    devices: Sequence[str]
    ingest_options: str = ""
    services: list[procs.Service] = field(default_factory=list)
    cluster: PostgresCluster | None = None
    broker_port: int = 0

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def pki_dir(self) -> Path:
        return self.workdir / "pki"

    @property
    def dsn(self) -> str:
        assert self.cluster is not None
        return self.cluster.dsn_for(DATABASE)

    def start(self) -> Plant:
        self._identities()
        self._broker()
        self._database()
        self._ingest()
        return self

    def _identities(self) -> None:
        pki.init_pki(self.pki_dir)
        pki.issue(self.pki_dir, INGEST_SERVICE_ID, role="service")
        for device in self.devices:
            pki.issue(self.pki_dir, device)

    def _broker(self) -> None:
        self.broker_port = free_port()
        files = write_broker_config(
            self.pki_dir,
            self.workdir / "broker",
            port=self.broker_port,
            bind_address="127.0.0.1",
            user=getpass.getuser(),
            log_file=self.logs / "mosquitto.log",
        )
        self.logs.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")
        if not binary:
            raise RuntimeError("mosquitto is not installed (run scripts/bootstrap)")
        service = self.spawn("broker", [binary, "-c", str(files.conf)])
        procs.wait_for_port(
            "127.0.0.1", self.broker_port, timeout_seconds=START_TIMEOUT_SECONDS, service=service
        )

    def _database(self) -> None:
        from psycopg import connect, sql

        from millrace.cloud.dbupgrade import INGEST_ROLE, upgrade

        # Its own temp dir: as root the server runs as `postgres`, which must reach it.
        base = Path(tempfile.mkdtemp(prefix="millrace-bench-pg-"))
        self.cluster = PostgresCluster(base, settings=BENCH_PG_SETTINGS)
        self.cluster.init()
        self.cluster.start()
        self.cluster.create_database(DATABASE)
        upgrade(self.dsn)
        with connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                    sql.Identifier(INGEST_LOGIN), sql.Identifier(INGEST_ROLE)
                )
            )

    def _ingest(self) -> None:
        assert self.cluster is not None
        paths = pki.pki_paths(self.pki_dir)
        config = self.workdir / "ingest.toml"
        config.write_text(
            f'[database]\ndsn = "{self.cluster.dsn_for(DATABASE, user=INGEST_LOGIN)}"\n\n'
            f'[broker]\nhost = "localhost"\nport = {self.broker_port}\n'
            f'ca = "{paths.ca_cert}"\ncert = "{paths.cert_for(INGEST_SERVICE_ID)}"\n'
            f'key = "{paths.key_for(INGEST_SERVICE_ID)}"\nclient_id = "bench-ingest-1"\n'
            'share_group = "bench-ingest"\n\n'
            "[http]\nport = 0\n\n[retention]\nenabled = false\n" + self.ingest_options
        )
        service = self.spawn(
            "ingest", millrace_argv("--log-level", "INFO", "ingest", "--config", str(config))
        )

        def connected() -> bool:
            if not procs.is_running(service.pid):
                raise RuntimeError(f"ingest worker exited; see {service.log_path}")
            return "connected to" in service.log_path.read_text(errors="replace")

        wait_until(connected, timeout_s=START_TIMEOUT_SECONDS, what="the ingest worker")

    def spawn(self, name: str, argv: Sequence[str]) -> procs.Service:
        service = procs.start(name, argv, log_dir=self.logs)
        self.services.append(service)
        return service

    def edge_config(
        self,
        device: str,
        *,
        signals: int,
        poll_s: float,
        period_s: int = 10,
        broker: str = "",
        windows: str = "",
    ) -> Path:
        """A gateway's config (sim signals, TLS to this plant's broker) in its own dir."""
        paths = pki.pki_paths(self.pki_dir)
        gateway = self.workdir / "gateways" / device
        gateway.mkdir(parents=True, exist_ok=True)
        body = "".join(
            SIM_SIGNAL_TOML.format(metric=m, poll_s=poll_s, seed=i)
            for i, m in enumerate(metric_names(signals))
        )
        path = gateway / "edge.toml"
        path.write_text(
            f'device_id = "{device}"\n'
            f'[broker]\nhost = "localhost"\nport = {self.broker_port}\n'
            f'ca = "{paths.ca_cert}"\ncert = "{paths.cert_for(device)}"\n'
            f'key = "{paths.key_for(device)}"\n{broker}\n'
            f"[windows]\nperiod_s = {period_s}\n{windows}\n"
            f'[outbox]\npath = "{gateway / "outbox.sqlite"}"\n'
            f'[state]\ndir = "{gateway / "state"}"\n{body}'
        )
        return path

    def start_agents(self, configs: Iterable[tuple[str, Path]]) -> list[procs.Service]:
        """`millrace edge run` per (device, config), each its own process."""
        return [
            self.spawn(
                f"edge-{device}",
                millrace_argv("--log-level", "WARNING", "edge", "run", "--config", str(cfg)),
            )
            for device, cfg in configs
        ]

    def check_running(self, services: Sequence[procs.Service]) -> bool:
        """True while every service runs; otherwise raise with the first dead one's log."""
        for service in services:
            if not procs.is_running(service.pid):
                tail = service.log_path.read_text(errors="replace").splitlines()[-10:]
                raise RuntimeError(f"{service.name} exited:\n" + "\n".join(tail))
        return True

    def stop_agents(self, agents: Sequence[procs.Service]) -> None:
        """SIGTERM all at once (each closes its windows and publishes), then wait."""
        for agent in agents:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(agent.pid, signal.SIGTERM)
        for agent in agents:
            procs.stop(agent.pid)
            if agent in self.services:
                self.services.remove(agent)

    def query(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        from psycopg import connect

        with connect(self.dsn, autocommit=True) as conn:
            return conn.execute(statement, params).fetchall()  # type: ignore[arg-type,unused-ignore]

    def close(self) -> None:
        for service in reversed(self.services):
            with contextlib.suppress(Exception):
                procs.stop(service.pid)
        self.services.clear()
        if self.cluster is not None:
            try:
                self.cluster.stop()
            finally:
                if (self.cluster.datadir / "postmaster.pid").exists():
                    self.cluster.kill_postmaster()
                shutil.rmtree(self.cluster.base_dir, ignore_errors=True)


@contextlib.contextmanager
def plant(prefix: str, devices: Sequence[str], *, ingest_options: str = "") -> Iterator[Plant]:
    """A started private plant in a temp dir; everything stopped and deleted afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix=f"millrace-bench-{prefix}-"))
    stack = Plant(workdir, devices, ingest_options=ingest_options)
    try:
        yield stack.start()
    except BaseException:
        for service in stack.services:
            if service.name in ("ingest", "broker"):
                tail = service.log_path.read_text(errors="replace").splitlines()[-15:]
                print(f"--- {service.name} log tail:\n" + "\n".join(tail), file=sys.stderr)
        raise
    finally:
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)


class CpuMeter:
    """CPU seconds of named process groups (and the whole machine) between two snapshots."""

    def __init__(self, groups: dict[str, Sequence[int]]) -> None:
        import psutil

        self._psutil = psutil
        self._groups = {name: self._expand(pids) for name, pids in groups.items()}
        self._start = {name: self._cpu(procs_) for name, procs_ in self._groups.items()}
        self._machine = psutil.cpu_times()
        self._t0 = time.monotonic()

    def _expand(self, pids: Sequence[int]) -> list[Any]:
        found = []
        for pid in pids:
            with contextlib.suppress(self._psutil.Error):
                proc = self._psutil.Process(pid)
                found.append(proc)
                found.extend(proc.children(recursive=True))
        return found

    def _cpu(self, group: Sequence[Any]) -> dict[int, float]:
        out = {}
        for proc in group:
            with contextlib.suppress(self._psutil.Error):
                t = proc.cpu_times()
                out[proc.pid] = t.user + t.system
        return out

    def stop(self) -> dict[str, float]:
        """Share of one core per group, plus `machine`: busy share of all cores (0..1)."""
        wall = time.monotonic() - self._t0
        shares = {}
        for name, group in self._groups.items():
            end = self._cpu(group)
            used = sum(end[pid] - t for pid, t in self._start[name].items() if pid in end)
            shares[name] = used / wall
        now = self._psutil.cpu_times()
        busy = sum(getattr(now, f) - getattr(self._machine, f) for f in ("user", "system", "nice"))
        idle = sum(getattr(now, f) - getattr(self._machine, f) for f in ("idle", "iowait"))
        steal = getattr(now, "steal", 0.0) - getattr(self._machine, "steal", 0.0)
        shares["machine"] = busy / max(1e-9, busy + idle + steal)
        return shares


def postmaster_pid(cluster: PostgresCluster) -> int:
    return int((cluster.datadir / "postmaster.pid").read_text().splitlines()[0])


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")
