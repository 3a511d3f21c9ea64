"""A Patroni pair: one etcd, two PostgreSQL + TimescaleDB nodes in synchronous mode.

`millrace up --ha` and the database failover tests run the same pair from here; every
process is a `procs.Service` (own process group, log file, pid with identity), so a
detached plant's `millrace down` can stop it from plant.json. Patroni runs the nodes as
the `postgres` user when millrace runs as root (PostgreSQL refuses root), as the single
cluster does (stack/postgres.py).

Why synchronous mode: an ingest worker acknowledges an MQTT batch and receipts it after its
COMMIT, and the edge then deletes it; a COMMIT acknowledged by a primary that dies before its
replica has it would be lost by the failover. With `synchronous_mode` a COMMIT returns only
once the synchronous standby has flushed it, and Patroni promotes only that standby.
`primary_start_timeout: 0` makes a crashed primary fail over at once instead of Patroni first
restarting it in place (its default waits 300 s for that).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from millrace.errors import MillraceError
from millrace.ops.stack import procs
from millrace.ops.stack.postgres import HOST, OS_USER_WHEN_ROOT, find_bindir, free_port

PATRONI: Final = "/usr/bin/patroni"
ETCD: Final = "/usr/bin/etcd"
REPLICATION_USER: Final = "replicator"
START_SECONDS: Final = 180.0  # give-up limits only: machines running this are often shared
STOP_SECONDS: Final = 60.0
POLL_SECONDS: Final = 0.1
PRIMARY_ROLES: Final = frozenset({"master", "primary"})
# Patroni's loop and leader lease: a failed primary is noticed within LOOP_WAIT_S; a dead
# Patroni (machine gone) loses the leader key after TTL_S.
LOOP_WAIT_S: Final = 1
TTL_S: Final = 20
RETRY_TIMEOUT_S: Final = 5
NODE_NAMES: Final = ("pg0", "pg1")


def wait_until(predicate: Callable[[], Any], *, what: str, timeout_s: float = START_SECONDS) -> Any:
    """Poll `predicate` until it returns something truthy; fail naming `what` at the limit."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(POLL_SECONDS)
    raise MillraceError(f"timed out after {timeout_s} s waiting for {what}")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path.name})"


@dataclass(frozen=True, slots=True)
class PairPorts:
    """Where the pair listens: etcd's client and peer ports, each node's PostgreSQL and REST."""

    etcd_client: int
    etcd_peer: int
    pg: tuple[int, int]
    rest: tuple[int, int]

    @classmethod
    def free(cls) -> PairPorts:
        return cls(free_port(), free_port(), (free_port(), free_port()), (free_port(), free_port()))

    @classmethod
    def from_base(cls, base: int) -> PairPorts:
        """PostgreSQL on base and base+1, REST on base+2 and +3, etcd on base+4 and +5."""
        return cls(base + 4, base + 5, (base, base + 1), (base + 2, base + 3))

    def all(self) -> list[int]:
        return [self.etcd_client, self.etcd_peer, *self.pg, *self.rest]


class Etcd:
    """One etcd member, the pair's store (a single member: itself no redundancy)."""

    def __init__(self, base: Path, *, client_port: int, peer_port: int, log_dir: Path) -> None:
        self.dir = base / "etcd"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.client_port = client_port
        self.peer_port = peer_port
        self.log_dir = log_dir
        self.service: procs.Service | None = None

    @property
    def hosts(self) -> str:
        return f"{HOST}:{self.client_port}"

    def start(self) -> procs.Service:
        client = f"http://{self.hosts}"
        peer = f"http://{HOST}:{self.peer_port}"
        self.service = procs.start(
            "etcd",
            [
                ETCD,
                "--name=e0",
                f"--data-dir={self.dir / 'data'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=e0={peer}",
                f"--initial-cluster-token={uuid.uuid4().hex}",
                "--initial-cluster-state=new",
                "--log-level=warn",
                "--logger=zap",
            ],
            log_dir=self.log_dir,
        )
        wait_until(self._healthy, what=f"etcd on {client} (log {self.service.log_path})")
        return self.service

    def _healthy(self) -> bool:
        assert self.service is not None
        if not procs.is_running(self.service.pid):
            raise MillraceError(f"etcd exited:\n{_tail(self.service.log_path)}")
        try:
            with urllib.request.urlopen(f"http://{self.hosts}/health", timeout=2) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        if self.service is not None and procs.is_running(self.service.pid):
            procs.stop(self.service.pid, grace_seconds=STOP_SECONDS)


class PatroniNode:
    """One Patroni with its PostgreSQL; `start()` runs Patroni, `kill_postmaster()` the fault."""

    def __init__(
        self,
        base: Path,
        name: str,
        *,
        pg_port: int,
        rest_port: int,
        log_dir: Path,
        passfile: Path | None = None,
    ):
        self.name = name
        self.passfile = passfile  # a libpq pgpass file for the superuser (scram clients)
        self.dir = base / name
        self.pg_port = pg_port
        self.rest_port = rest_port
        self.config = self.dir / "patroni.yml"
        self.log_dir = log_dir
        self.service: procs.Service | None = None
        self._os_user = OS_USER_WHEN_ROOT if os.geteuid() == 0 else None

    @property
    def datadir(self) -> Path:
        return self.dir / "data"

    @property
    def rest_url(self) -> str:
        return f"http://{HOST}:{self.rest_port}"

    @property
    def log(self) -> Path:
        return self.log_dir / f"patroni-{self.name}.log"

    def write_config(
        self, *, scope: str, etcd: Etcd, secrets_: dict[str, str], client_auth: str
    ) -> None:
        """patroni.yml (0600: it holds the passwords); `client_auth` is pg_hba's method for
        TCP clients on loopback ("trust" in tests, "scram-sha-256" in the local plant)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.dir / "run").mkdir(exist_ok=True)
        parameters = {
            "shared_preload_libraries": "timescaledb",
            "timescaledb.telemetry_level": "off",
            "timescaledb.max_background_workers": "8",
            "unix_socket_directories": str(self.dir / "run"),
            "timezone": "UTC",
            # Throwaway: no fsync (a killed postmaster leaves the page cache intact); pg_rewind
            # needs full_page_writes, so that stays on.
            "fsync": "off",
            "log_min_messages": "warning",
        }
        config: dict[str, Any] = {
            "scope": scope,
            "name": self.name,
            "restapi": {
                "listen": f"{HOST}:{self.rest_port}",
                "connect_address": f"{HOST}:{self.rest_port}",
            },
            "etcd3": {"hosts": etcd.hosts, "protocol": "http"},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL_S,
                    "loop_wait": LOOP_WAIT_S,
                    "retry_timeout": RETRY_TIMEOUT_S,
                    "primary_start_timeout": 0,
                    "synchronous_mode": True,
                    "synchronous_mode_strict": False,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        # Settings every node must share live here (Patroni ignores them
                        # in a node's own parameters). track_commit_timestamp lets the
                        # failover test read when each ledger row was committed.
                        "parameters": {
                            "wal_level": "replica",
                            "max_wal_senders": 10,
                            "max_connections": 100,
                            "max_worker_processes": 32,
                            "track_commit_timestamp": "on",
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, "no-sync"],
            },
            "postgresql": {
                "listen": f"{HOST}:{self.pg_port}",
                "connect_address": f"{HOST}:{self.pg_port}",
                "data_dir": str(self.datadir),
                "bin_dir": str(find_bindir()),
                "pgpass": str(self.dir / "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": secrets_["superuser"]},
                    "replication": {
                        "username": REPLICATION_USER,
                        "password": secrets_["replication"],
                    },
                },
                # Loopback only; replication always needs its password.
                "pg_hba": [
                    "local all all trust",
                    f"host replication {REPLICATION_USER} {HOST}/32 scram-sha-256",
                    f"host all all {HOST}/32 {client_auth}",
                ],
                "parameters": parameters,
                "remove_data_directory_on_rewind_failure": True,
                "remove_data_directory_on_diverged_timelines": True,
            },
            "watchdog": {"mode": "off"},
            "log": {"level": "INFO"},
        }
        self.config.unlink(missing_ok=True)
        # JSON is YAML; 0600 from the first instant.
        fd = os.open(self.config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=1)
        if self._os_user:
            entry = pwd.getpwnam(self._os_user)
            for path in (self.dir, self.dir / "run", self.config):
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self) -> procs.Service:
        """Run Patroni (as `postgres` under root); it starts or joins the cluster itself."""
        if self.service is not None and procs.is_running(self.service.pid):
            raise MillraceError(f"patroni {self.name} already runs (pid {self.service.pid})")
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": str(self.dir), "PGTZ": "UTC"}
        self.service = procs.start(
            f"patroni-{self.name}",
            [PATRONI, str(self.config)],
            log_dir=self.log_dir,
            env=env,
            inherit_env=False,
            cwd=self.dir,
            user=self._os_user,
        )
        return self.service

    def running(self) -> bool:
        return self.service is not None and procs.is_running(self.service.pid)

    def status(self) -> dict[str, Any]:
        """Patroni's own view (GET /patroni); {} while it does not answer."""
        if self.service is not None and not procs.is_running(self.service.pid):
            raise MillraceError(f"patroni {self.name} exited:\n{_tail(self.log)}")
        return node_status(self.rest_url)

    def member_roles(self) -> dict[str, str]:
        """Every member's role as this node's Patroni sees the cluster (GET /cluster)."""
        try:
            with urllib.request.urlopen(f"{self.rest_url}/cluster", timeout=2) as resp:
                members = json.loads(resp.read()).get("members", [])
        except (OSError, ValueError):
            return {}
        return {str(m.get("name")): str(m.get("role")) for m in members}

    def role(self) -> str:
        """ "primary", "replica", or "" (not answering, starting, stopped)."""
        return role_of(self.status())

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.datadir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def kill_postmaster(self) -> int:
        """SIGKILL this node's postmaster (the fault); returns its pid."""
        pid = self.postmaster_pid()
        if pid is None:
            raise MillraceError(f"{self.name} has no postmaster")
        os.kill(pid, signal.SIGKILL)
        return pid

    def dsn(self, dbname: str = "postgres") -> str:
        """This node alone (no failover): for checks on one node."""
        dsn = f"host={HOST} port={self.pg_port} dbname={dbname} user=postgres"
        return f"{dsn} passfile={self.passfile}" if self.passfile else dsn

    def kill(self) -> None:
        """SIGKILL Patroni and then its postmaster: the node's machine is gone."""
        if self.running():
            assert self.service is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.service.pid, signal.SIGKILL)
            wait_until(lambda: not self.running(), what=f"patroni {self.name} to die")
        if self.postmaster_pid() is not None:
            with contextlib.suppress(ProcessLookupError):
                self.kill_postmaster()

    def terminate(self) -> None:
        """SIGTERM Patroni: it stops PostgreSQL (fast) and gives up its keys in etcd."""
        if self.running():
            assert self.service is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.service.pid, signal.SIGTERM)

    def wait_stopped(self) -> None:
        """Wait for `terminate()`; SIGKILL Patroni and the postmaster at the give-up limit."""
        if self.service is not None:
            procs.stop(self.service.pid, grace_seconds=STOP_SECONDS)
        stop_leftover_postmaster(self.datadir)


def node_status(rest_url: str) -> dict[str, Any]:
    """GET /patroni of one node; {} while it does not answer."""
    try:
        with urllib.request.urlopen(f"{rest_url}/patroni", timeout=2) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:  # 503 still carries the JSON body
        try:
            return dict(json.loads(exc.read()))
        except ValueError:
            return {}
    except (OSError, ValueError):
        return {}


def role_of(status: dict[str, Any]) -> str:
    """ "primary", "replica", or "" from a GET /patroni answer."""
    if status.get("state") != "running":
        return ""
    role = str(status.get("role", ""))
    return "primary" if role in PRIMARY_ROLES else role


def stop_leftover_postmaster(datadir: Path) -> bool:
    """SIGKILL a postmaster its Patroni left running (Patroni itself was killed); True if one ran.

    Patroni starts the postmaster in a session of its own, so stopping Patroni's process
    group does not reach it.
    """
    try:
        pid = int((datadir / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return False
    if not procs.is_running(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    if str(datadir) not in cmdline:  # a reused pid: someone else's process
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not procs.is_running(pid), what=f"postmaster {pid} to die")
    return True


class PatroniPair:
    """etcd + two Patroni nodes under `base`; `close()` stops them (the files stay)."""

    def __init__(
        self,
        base: Path,
        *,
        ports: PairPorts,
        superuser_password: str,
        replication_password: str,
        client_auth: str = "trust",
        log_dir: Path | None = None,
        scope: str | None = None,
        passfile: Path | None = None,
        on_service: Callable[[procs.Service], object] = lambda service: None,
    ) -> None:
        self.base = base
        self.ports = ports
        self.log_dir = log_dir or base / "logs"
        self._on_service = on_service
        self.etcd = Etcd(
            base,
            client_port=ports.etcd_client,
            peer_port=ports.etcd_peer,
            log_dir=self.log_dir,
        )
        self.nodes = [
            PatroniNode(
                base, name, pg_port=pg, rest_port=rest, log_dir=self.log_dir, passfile=passfile
            )
            for name, pg, rest in zip(NODE_NAMES, ports.pg, ports.rest, strict=True)
        ]
        self._secrets = {"superuser": superuser_password, "replication": replication_password}
        self._client_auth = client_auth
        self._scope = scope or f"millrace-{uuid.uuid4().hex[:8]}"

    def start(self) -> None:
        """etcd, then pg0 (primary when new), then pg1; returns once one node is primary and
        the other its synchronous standby."""
        self.base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            entry = pwd.getpwnam(OS_USER_WHEN_ROOT)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        self._on_service(self.etcd.start())
        for node in self.nodes:
            node.write_config(
                scope=self._scope,
                etcd=self.etcd,
                secrets_=self._secrets,
                client_auth=self._client_auth,
            )
        self._on_service(self.nodes[0].start())
        if not (self.nodes[1].datadir / "PG_VERSION").exists():  # a new pair: pg0 bootstraps
            wait_until(lambda: self.nodes[0].role() == "primary", what="pg0 to bootstrap")
        self._on_service(self.nodes[1].start())
        self.wait_synchronous()

    # -- views -------------------------------------------------------------------------------

    def primary(self) -> PatroniNode:
        """The node Patroni runs as primary now (fails when there is none)."""
        found: PatroniNode = wait_until(
            lambda: next((n for n in self.nodes if n.role() == "primary"), None),
            what="a primary",
        )
        return found

    def other(self, node: PatroniNode) -> PatroniNode:
        return next(n for n in self.nodes if n is not node)

    def hosts_and_ports(self, first: PatroniNode | None = None) -> tuple[str, str]:
        """libpq's `host` and `port` lists over both nodes, `first` first."""
        nodes = sorted(self.nodes, key=lambda n: n is not first)
        return ",".join(HOST for _ in nodes), ",".join(str(n.pg_port) for n in nodes)

    def dsn(
        self,
        dbname: str = "postgres",
        *,
        attrs: str | None = "read-write",
        first: PatroniNode | None = None,
    ) -> str:
        """A libpq multi-host DSN over both nodes, as clients of the pair use; `first` is
        tried first, and `attrs=None` leaves target_session_attrs to the client."""
        hosts, ports = self.hosts_and_ports(first)
        dsn = f"host={hosts} port={ports} dbname={dbname} user=postgres connect_timeout=5"
        if self.nodes[0].passfile:
            dsn += f" passfile={self.nodes[0].passfile}"
        return f"{dsn} target_session_attrs={attrs}" if attrs else dsn

    def streaming(self, primary: PatroniNode) -> list[tuple[str, str, str]]:
        """(application_name, state, sync_state) of the primary's replication connections."""
        import psycopg

        try:
            with psycopg.connect(primary.dsn(), autocommit=True, connect_timeout=5) as conn:
                rows = conn.execute(
                    "SELECT application_name, state, sync_state FROM pg_stat_replication"
                ).fetchall()
        except psycopg.Error:
            return []
        return [(str(a), str(b), str(c)) for a, b, c in rows]

    def wait_synchronous(self, *, timeout_s: float = START_SECONDS) -> PatroniNode:
        """Wait for one primary and the other node streaming from it as synchronous standby,
        in PostgreSQL (pg_stat_replication) and in Patroni's sync key (GET /cluster).

        Both, because Patroni 3.0.2 sets synchronous_standby_names first and writes the
        key about 2 s later: a standby stopped in between leaves the name set and no key,
        and Patroni then never clears it, so every commit waits for that standby's return.
        """

        def ready() -> PatroniNode | None:
            primary = next((n for n in self.nodes if n.role() == "primary"), None)
            if primary is None or self.other(primary).role() != "replica":
                return None
            standby = self.other(primary).name
            if (standby, "streaming", "sync") not in self.streaming(primary):
                return None
            return primary if primary.member_roles().get(standby) == "sync_standby" else None

        try:
            found: PatroniNode = wait_until(
                ready, what="a synchronous streaming replica", timeout_s=timeout_s
            )
        except MillraceError as exc:
            raise MillraceError(f"{exc}\n{self.logs()}") from None
        return found

    def create_database(self, name: str) -> str:
        """A database with timescaledb on the primary (replicated); its multi-host DSN."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        with psycopg.connect(self.dsn(name), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        return self.dsn(name)

    def logs(self) -> str:
        """Every node's log tail, for failure messages."""
        return "\n".join(f"--- {n.name}\n{_tail(n.log)}" for n in self.nodes)

    def close(self) -> None:
        """Stop both nodes at once (no failover between them), then etcd."""
        for node in self.nodes:
            node.terminate()
        for node in self.nodes:
            with contextlib.suppress(MillraceError):
                node.wait_stopped()
        self.etcd.close()
