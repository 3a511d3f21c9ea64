"""A private PostgreSQL + TimescaleDB cluster in a directory: the local plant's and the tests'.

initdb and postgres refuse to run as root, so as root the processes run as the
`postgres` system user via runuser. The cluster listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from millrace.errors import MillraceError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
SUPERUSER = "postgres"
# The system user that owns clusters when millrace runs as root.
OS_USER_WHEN_ROOT = "postgres"
PG_CTL_TIMEOUT_SECONDS = 60
START_ATTEMPTS = 3  # a free port can be taken between probing it and binding it

BASE_SETTINGS: dict[str, str] = {
    "listen_addresses": HOST,
    "shared_preload_libraries": "timescaledb",
    "timescaledb.telemetry_level": "off",
    "max_connections": "200",
    "shared_buffers": "128MB",
    "max_worker_processes": "32",
    "timescaledb.max_background_workers": "16",
    "log_min_messages": "warning",
    "log_line_prefix": "%m [%p] %d ",
    "timezone": "UTC",
}
# For throwaway test clusters: no fsync (the OS page cache keeps data across a postgres stop or
# crash, so only a machine crash could lose it), but synchronous_commit stays on so a commit the
# client saw survives `stop(mode="immediate")`, as fault tests expect.
FAST_UNSAFE_SETTINGS: dict[str, str] = {"fsync": "off", "full_page_writes": "off"}


# The superuser's password for initdb --pwfile, removed once initdb is done.
INITDB_PASSWORD_FILE = ".initdb-pw"
PRIVATE_FILE_MODE = 0o600


def _write_private(path: Path, data: bytes) -> None:
    """Create `path` readable by its owner only from the first instant (never chmod after).

    O_EXCL refuses a file (or symlink) someone left in its place; a stale one from a
    crashed initdb is ours to replace.
    """
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def find_bindir() -> Path:
    """Directory with initdb/pg_ctl: $MILLRACE_PG_BINDIR, pg_config's, else the newest server."""
    explicit = os.environ.get("MILLRACE_PG_BINDIR")
    if explicit:
        return Path(explicit)
    major = os.environ.get("MILLRACE_PG_MAJOR")
    if major:
        return Path(f"/usr/lib/postgresql/{major}/bin")
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if out and (Path(out) / "initdb").exists() and (Path(out) / "postgres").exists():
            return Path(out)
    candidates = sorted(
        (p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1,
    )
    if not candidates:
        raise MillraceError("no PostgreSQL server found; run scripts/bootstrap")
    return candidates[-1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class PostgresCluster:
    """One cluster in `base_dir` (data/, run/, postgresql.log); `dsn` is the superuser's URL."""

    __slots__ = (
        "_base",
        "_bindir",
        "_os_user",
        "_passfile",
        "_password_file",
        "_port",
        "_settings",
        "_started",
    )

    def __init__(
        self,
        base_dir: Path,
        *,
        port: int = 0,
        bindir: Path | None = None,
        settings: Mapping[str, str] | None = None,
        password_file: Path | None = None,
        passfile: Path | None = None,
    ) -> None:
        self._passfile = passfile  # a libpq pgpass file named in DSNs
        self._base = base_dir.absolute()
        # With a password file the superuser needs it over TCP (scram); without, trust (tests).
        self._password_file = password_file
        self._bindir = bindir or find_bindir()
        self._settings = {**BASE_SETTINGS, **(settings or {})}
        self._os_user = OS_USER_WHEN_ROOT if os.geteuid() == 0 else None
        self._port = port
        self._started = False

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def user(self) -> str:
        return SUPERUSER

    @property
    def base_dir(self) -> Path:
        return self._base

    @property
    def datadir(self) -> Path:
        return self._base / "data"

    @property
    def socket_dir(self) -> Path:
        return self._base / "run"

    @property
    def logfile(self) -> Path:
        return self._base / "postgresql.log"

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    @property
    def running(self) -> bool:
        return self._started

    def dsn_for(self, dbname: str, *, user: str = SUPERUSER, passfile: Path | None = None) -> str:
        """libpq URL for `dbname`; a passfile keeps the password itself out of the URL."""
        passfile = passfile or self._passfile
        where = f"{self.host}:{self.port}/{quote(dbname, safe='')}"
        url = f"postgresql://{quote(user, safe='')}@{where}"
        return f"{url}?passfile={quote(str(passfile), safe='/')}" if passfile else url

    def __repr__(self) -> str:
        return f"PostgresCluster(port={self._port}, datadir={self.datadir}, up={self._started})"

    def initialized(self) -> bool:
        """True when initdb has already run in this directory."""
        return (self.datadir / "PG_VERSION").exists()

    def init(self) -> None:
        """Run initdb and append millrace's settings; the directory must not hold a cluster."""
        self._base.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if self._os_user and self._run("test", "-x", str(self._base.parent)).returncode != 0:
            raise MillraceError(
                f"the {self._os_user} user cannot reach {self._base.parent} (PostgreSQL runs as "
                "that user when millrace runs as root); use a directory every user can traverse"
            )
        if self._os_user:
            entry = pwd.getpwnam(self._os_user)
            for path in (self._base, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        auth = ["--auth=trust"]
        if self._password_file is not None:
            pwfile = self._base / INITDB_PASSWORD_FILE
            _write_private(pwfile, self._password_file.read_bytes())
            if self._os_user:
                entry = pwd.getpwnam(self._os_user)
                os.chown(pwfile, entry.pw_uid, entry.pw_gid)
            auth = ["--auth-local=peer", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        try:
            done = self._run(
                str(self._bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                SUPERUSER,
                *auth,
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
                "--no-instructions",
            )
        finally:
            if self._password_file is not None:
                (self._base / INITDB_PASSWORD_FILE).unlink(missing_ok=True)
        if done.returncode != 0:
            raise MillraceError(f"initdb failed in {self.datadir}:\n{done.stdout}{done.stderr}")
        settings = {**self._settings, "unix_socket_directories": str(self.socket_dir)}
        lines = [f"{key} = '{value}'" for key, value in settings.items()]
        with (self.datadir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# millrace settings\n" + "\n".join(lines) + "\n")

    def start(self) -> None:
        """Start the server (on a free port unless one was given) and wait for connections."""
        if self._started:
            return
        last_error = ""
        for _ in range(START_ATTEMPTS if self._port == 0 else 1):
            port = self._port or free_port()
            done = self._pg_ctl(
                "start",
                "-w",
                "-t",
                str(PG_CTL_TIMEOUT_SECONDS),
                "-l",
                str(self.logfile),
                "-o",
                f"-p {port}",
            )
            if done.returncode == 0:
                self._port = port
                self._started = True
                log.info("postgres up on %s:%s (%s)", HOST, port, self.datadir)
                return
            last_error = f"{done.stdout}{done.stderr}\n{self.log_tail()}"
        raise MillraceError(f"postgres in {self.datadir} did not start:\n{last_error}")

    def stop(self, *, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Stop the server; "immediate" is a crash (recovery runs on the next start)."""
        if not self._started and not (self.datadir / "postmaster.pid").exists():
            return
        done = self._pg_ctl("stop", "-w", "-t", str(PG_CTL_TIMEOUT_SECONDS), "-m", mode)
        if done.returncode != 0 and (self.datadir / "postmaster.pid").exists():
            log.warning("pg_ctl stop failed (%s); killing postmaster", done.stderr.strip())
            self.kill_postmaster()
        self._started = False

    def restart(self) -> None:
        """Stop (fast) and start again on the same port."""
        self.stop()
        self.start()

    def create_database(self, name: str) -> str:
        """Create database `name` (if missing); returns its DSN."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            query = "SELECT 1 FROM pg_database WHERE datname = %s"
            if not conn.execute(query, (name,)).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database `name` even while clients are connected to it."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server log, for error messages."""
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def kill_postmaster(self) -> None:
        """SIGKILL the postmaster named in postmaster.pid and wait for it to go."""
        pidfile = self.datadir / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pidfile.read_text().splitlines()[0])
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + PG_CTL_TIMEOUT_SECONDS
            while time.monotonic() < deadline:
                os.kill(pid, 0)  # raises once the process is gone
                time.sleep(0.05)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self._os_user:
            cmd = ["runuser", "-u", self._os_user, "--", *cmd]
        return subprocess.run(
            cmd,
            cwd=self._base,
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "LC_ALL": "C.UTF-8", "PGTZ": "UTC"},
        )

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run(str(self._bindir / "pg_ctl"), "-D", str(self.datadir), *args)
