"""Start, watch and stop the local plant's processes.

Each service runs in its own process group with its output in a log file, so
`millrace down` can stop a detached plant (and everything its services
spawned) from what plant.json records. A pid alone is not trusted: after a
reboot (or once a process exits) the kernel hands the pid to someone else, so
each pid is recorded with its identity (the boot id and the process's start
time) and nothing is signalled unless both still match.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from millrace.errors import MillraceError

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 15.0
POLL_INTERVAL_SECONDS = 0.1


BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
# /proc/<pid>/stat field 22 (starttime, clock ticks after boot), counted after the ")".
_STARTTIME_INDEX = 22 - 3


@dataclass(frozen=True, slots=True)
class Service:
    """A process the plant started: name, pid (= process group id), identity and log file."""

    name: str
    pid: int
    log_path: Path
    identity: str | None = None


def process_identity(pid: int) -> str | None:
    """`<boot id>:<start time>` of a live process; a reused pid or a reboot changes it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot_id = BOOT_ID_PATH.read_text().strip()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) <= _STARTTIME_INDEX:
        return None
    return f"{boot_id}:{fields[_STARTTIME_INDEX]}"


def is_ours(pid: int, identity: str | None) -> bool:
    """True while `pid` runs and is still the process recorded with `identity`.

    No recorded identity means no proof: such a pid is never treated as ours.
    """
    return identity is not None and is_running(pid) and process_identity(pid) == identity


def start(
    name: str,
    argv: Sequence[str],
    *,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    inherit_env: bool = True,
    cwd: Path | None = None,
    user: str | None = None,
) -> Service:
    """Start `argv` detached in a new session, appending its output to log_dir/name.log.

    `inherit_env=False` gives the child `env` alone; `user` runs it as that system user
    (PostgreSQL and Patroni refuse root).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    as_user: dict[str, Any] = {}
    if user is not None:
        entry = pwd.getpwnam(user)
        as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**(os.environ if inherit_env else {}), **(env or {})},
            cwd=cwd,
            **as_user,
        )
    log.debug("started %s pid=%s: %s", name, proc.pid, " ".join(argv))
    # The child exists until we reap it, so its identity is readable even if it died at once.
    identity = process_identity(proc.pid)
    return Service(name=name, pid=proc.pid, log_path=log_path, identity=identity)


def is_running(pid: int) -> bool:
    """True while a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop(pid: int, *, grace_seconds: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM the process group, then SIGKILL it if it outlives the grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + (grace_seconds if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            _reap(pid)
            if not is_running(pid):
                return
            time.sleep(POLL_INTERVAL_SECONDS)
    raise MillraceError(f"process {pid} did not stop; kill it by hand (kill -9 -{pid})")


def wait_for_port(host: str, port: int, *, timeout_seconds: float, service: Service) -> None:
    """Wait until host:port accepts TCP connections or the service dies; say which log to read."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if not is_running(service.pid):
            raise MillraceError(f"{service.name} exited during start-up; see {service.log_path}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return
        time.sleep(POLL_INTERVAL_SECONDS)
    raise MillraceError(
        f"{service.name} did not listen on {host}:{port} within {timeout_seconds:.0f} s; "
        f"see {service.log_path}"
    )


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
