"""The system tier's own fixture: a cached Debian root file system boots under systemd-nspawn.

These prove what the flashing and rollout tests rely on: systemd is PID 1 and reaches
multi-user, sshd answers on the container's loopback port with key login and password-less
sudo (how Ansible reaches a gateway), a power cut (SIGKILL of the container's init) stops
everything in it and the same disk boots again with its files, and the cache stays clean.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.fix_system import (
    SSH_USER,
    ContainerFactory,
    SSHKey,
    _mounted,
    debian_mirror_lines,
    sweep_orphans,
)

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.system


def test_container_boots_systemd_and_answers_ssh_with_sudo(
    container_factory: ContainerFactory, system_ssh_key: SSHKey, system_rootfs: Path
) -> None:
    box = container_factory()
    assert box.run("cat", "/proc/1/comm").stdout.strip() == "systemd"
    assert box.run("systemctl", "is-active", "ssh").stdout.strip() == "active"
    assert box.run("hostname").stdout.strip() == box.name
    result = subprocess.run(
        [
            "ssh", "-i", str(system_ssh_key.private), "-p", str(box.ssh_port),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            f"{SSH_USER}@127.0.0.1", "sudo", "-n", "cat", "/etc/hostname",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == box.name
    print(f"container boot {box.boot_seconds[0]:.1f} s")


def test_power_cut_kills_everything_and_the_disk_boots_again(
    container_factory: ContainerFactory, system_rootfs: Path
) -> None:
    box = container_factory()
    box.run("systemd-run", "--unit=sleeper", "sleep", "infinity")
    box.sh("echo kept > /var/lib/marker")
    leader = box.leader
    assert leader is not None
    sleeper = int(box.unit_property("sleeper.service", "MainPID"))
    assert sleeper > 0

    box.power_cut()

    assert not Path(f"/proc/{leader}").exists()
    assert not box.running
    box.boot()
    assert box.boots == 2
    assert box.run("cat", "/var/lib/marker").stdout.strip() == "kept"
    assert box.run("systemctl", "is-active", "sleeper.service", check=False).stdout.strip() in (
        "inactive",
        "failed",
    )
    # Every write went to the container's own layer, never into the shared cache.
    assert not (system_rootfs / "var/lib/marker").exists()


def test_closing_a_container_unmounts_and_removes_its_layer(
    container_factory: ContainerFactory,
) -> None:
    box = container_factory()
    leader = box.leader
    container_factory.close()
    assert not Path(f"/proc/{leader}").exists()
    assert not _mounted(box.root)
    assert not box.base.exists()


def test_mirror_comes_from_the_apt_configuration(tmp_path: Path) -> None:
    """deb822 and one-line sources both count; other suites and disabled files do not."""
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list").write_text(
        "# comment\ndeb [arch=amd64] http://mirror.example/debian bookworm main contrib\n"
    )
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb deb-src\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://other.example/x\nSuites: nodistro\nComponents: main\n"
    )
    (apt / "sources.list.d" / "old.list.disabled").write_text(
        "deb http://disabled.example/debian bookworm main\n"
    )
    assert debian_mirror_lines("bookworm", apt) == [
        "deb http://mirror.example/debian bookworm main",
        "deb http://mirror.example/debian-security bookworm-security main",
    ]
    with pytest.raises(RuntimeError, match="no Debian 'trixie' source"):
        debian_mirror_lines("trixie", apt)


def test_a_container_left_by_a_killed_test_run_is_swept(system_rootfs: Path) -> None:
    """A run that dies without its finalizers leaves a booted container; the next one ends it."""
    script = (
        "import os, sys, tempfile\n"
        "from pathlib import Path\n"
        "from tests.fixtures.fix_system import ContainerFactory\n"
        "box = ContainerFactory(Path(tempfile.mkdtemp(prefix='millrace-containers-')))()\n"
        "print(box.leader, box.base, flush=True)\n"
        "os._exit(0)  # no finalizer, no atexit: as if SIGKILLed\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    leader_text, base_text = done.stdout.split()
    leader, base = int(leader_text), Path(base_text)
    assert Path(f"/proc/{leader}").exists()  # still booted, its owner gone
    assert _mounted(base / "merged")

    assert base.name in sweep_orphans()

    assert not Path(f"/proc/{leader}").exists()
    assert not _mounted(base / "merged")
    assert not base.exists()
