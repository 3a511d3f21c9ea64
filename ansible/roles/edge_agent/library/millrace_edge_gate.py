#!/usr/bin/python3
"""Ansible module of the edge_agent role: restart the agent, prove it healthy, or roll back.

action=gate: (re)start the unit if anything changed or it is not running (resetting a hit
start limit first), then wait until the agent systemd started proves itself through its
status.json (this process's pid, its first CONNACK from the plant broker and, with
proof=receipt, the cloud's receipt for one of its own batches), has been up
min_uptime seconds and has not restarted meanwhile (same InvocationID, NRestarts and
MainPID). On success the running state is recorded as the last good one (a copy of each
managed file and the release link under good_dir). Fails with one line naming the cause.

action=rollback: put the last good files and release back, restart the agent on them and
wait until it is running; with no good state yet (a first install failed) the agent is
stopped and disabled instead of left crash-looping.

Runs on the gateway with its own Python (standard library only). Timing: polls
`systemctl show` every half second.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

from ansible.module_utils.basic import AnsibleModule

POLL_SECONDS = 0.5
SHOW_PROPS = (
    "ActiveState",
    "SubState",
    "Result",
    "MainPID",
    "NRestarts",
    "InvocationID",
    "ExecMainStatus",
    "ActiveEnterTimestampMonotonic",
)
GOOD_RELEASE = "release"
PROOFS = ("receipt", "connected", "none")


class GateError(Exception):
    """The gate or rollback failed; str() is the one-line reason."""


def systemctl(*args: str, check: bool = True) -> str:
    done = subprocess.run(
        ["systemctl", *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise GateError(f"systemctl {' '.join(args)} failed: {detail[-1] if detail else ''}")
    return done.stdout


def show(unit: str) -> dict[str, str]:
    out = systemctl("show", unit, "--property=" + ",".join(SHOW_PROPS))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def state_dir_of(config: Path) -> Path:
    """The agent's [state] dir (where status.json lives), read from its config."""
    data = tomllib.loads(config.read_text())
    directory = Path(str(data["state"]["dir"]))
    return directory if directory.is_absolute() else config.parent / directory


def read_status(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def link_target(link: Path) -> str | None:
    try:
        return os.readlink(link)
    except OSError:
        return None


def replace_link(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)


def copy_file(src: Path, dest: Path) -> None:
    """Copy with mode and ownership, replacing `dest` atomically."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copy2(src, tmp)
    st = src.stat()
    os.chown(tmp, st.st_uid, st.st_gid)
    os.replace(tmp, dest)


def same(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and filecmp.cmp(a, b, shallow=False)


def remove_stale_backups(files: dict[str, str]) -> list[str]:
    """Backups (`name.<pid>.<date>~`) left by older versions of the role or failed runs."""
    removed = []
    for path in map(Path, files.values()):
        if path.parent.is_dir():
            for stale in path.parent.glob(f"{path.name}.*~"):
                stale.unlink()
                removed.append(str(stale))
    return removed


def save_good(p: dict[str, Any]) -> bool:
    """Record the running files and release as the last good state; True if anything changed."""
    good = Path(p["good_dir"])
    good.mkdir(mode=0o700, parents=True, exist_ok=True)
    changed = False
    for name, path in p["files"].items():
        src = Path(path)
        if src.exists() and not same(src, good / name):
            copy_file(src, good / name)
            changed = True
    install = Path(p["install_dir"])
    current = link_target(install / "current") or ""
    before = good_release(p)
    if before != current:
        if before:  # `previous`: the good release this one replaced, what a human rolls back to
            replace_link(install / "previous", before)
        (good / GOOD_RELEASE).write_text(current + "\n")
        changed = True
    return changed


def good_release(p: dict[str, Any]) -> str | None:
    """The release link (`releases/<id>`) that last passed the gate here, if any."""
    record = Path(p["good_dir"]) / GOOD_RELEASE
    return (record.read_text().strip() or None) if record.exists() else None


class Gate:
    def __init__(self, p: dict[str, Any]) -> None:
        self.p = p
        self.unit = p["unit"]
        self.status_path = state_dir_of(Path(p["config"])) / "status.json"

    def run(self) -> tuple[bool, str]:
        """(restarted, message) on success; raises GateError."""
        p = self.p
        if p["daemon_reload"]:
            systemctl("daemon-reload")
        before = show(self.unit)
        current = link_target(Path(p["install_dir"]) / "current")
        proven = good_release(p) == current and not p["restart"]
        running = before.get("ActiveState") == "active" and before.get("SubState") == "running"
        if proven and running:
            return False, "agent running on its proven release"
        restart = p["restart"] or not running
        if restart:
            # A unit that hit its start limit refuses every start until this.
            systemctl("reset-failed", self.unit, check=False)
            systemctl("restart", "--no-block", self.unit)
        return restart, self.wait(before, restarted=restart)

    def _crashed(self, now: dict[str, str], restarts0: int) -> str:
        restarts = int(now.get("NRestarts") or 0)
        if now.get("ActiveState") == "failed" or restarts > restarts0:
            return (
                f"agent stopped ({now.get('Result')}, exit status {now.get('ExecMainStatus')}),"
                f" restarted {restarts - restarts0} time(s)"
            )
        return ""

    def wait(self, before: dict[str, str], *, restarted: bool) -> str:
        p = self.p
        deadline = time.monotonic() + p["timeout"]
        old_invocation = before.get("InvocationID", "") if restarted else None
        restarts0 = 0 if restarted else int(before.get("NRestarts") or 0)
        invocation = None if restarted else before.get("InvocationID")
        status: dict[str, Any] = {}
        now: dict[str, str] = before
        while time.monotonic() < deadline:
            now = show(self.unit)
            if restarted and invocation is None:
                if now.get("InvocationID") in ("", old_invocation):
                    time.sleep(POLL_SECONDS)
                    continue  # our restart job has not begun yet
                invocation = now["InvocationID"]
            crashed = self._crashed(now, restarts0)
            if crashed:
                raise GateError(crashed)
            if now.get("InvocationID") != invocation:
                raise GateError("agent was restarted by systemd while being checked")
            if now.get("ActiveState") != "active":
                time.sleep(POLL_SECONDS)
                continue  # Type=notify: not READY yet
            status = read_status(self.status_path)
            pid = int(now.get("MainPID") or 0)
            fresh = status.get("pid") == pid and pid > 0
            # proof=none asks nothing of status.json: a release older than it writes none.
            proven = p["proof"] == "none" or (
                fresh
                and (
                    (p["proof"] == "connected" and status.get("connected_ms"))
                    or (p["proof"] == "receipt" and status.get("receipted_ms"))
                )
            )
            up_s = time.monotonic() - int(now.get("ActiveEnterTimestampMonotonic") or 0) / 1e6
            if proven and up_s >= p["min_uptime"]:
                boot = status.get("boot_id")
                return f"agent up {up_s:.0f} s, no restart (pid {pid}, boot {boot}); {p['proof']}"
            time.sleep(POLL_SECONDS)
        if now.get("ActiveState") != "active":
            raise GateError(
                f"agent did not report READY within {p['timeout']} s"
                f" ({now.get('ActiveState')}/{now.get('SubState')})"
            )
        if not status or status.get("pid") != int(now.get("MainPID") or 0):
            raise GateError(f"agent wrote no status for its pid to {self.status_path}")
        if not status.get("connected_ms"):
            why = status.get("last_error") or "no error reported"
            raise GateError(f"no CONNACK from the plant broker within {p['timeout']} s: {why}")
        raise GateError(
            f"connected, but no receipt for its own batches within {p['timeout']} s"
            " (is ingest running and storing them?)"
        )


def rollback(p: dict[str, Any]) -> tuple[bool, str]:
    good = Path(p["good_dir"])
    changed = False
    restored = []
    for name, path in p["files"].items():
        saved, dest = good / name, Path(path)
        if saved.exists() and not same(saved, dest):
            copy_file(saved, dest)
            restored.append(dest.name)
            changed = True
    release = good_release(p)
    current_link = Path(p["install_dir"]) / "current"
    if release and link_target(current_link) != release:
        replace_link(current_link, release)
        changed = True
    what = f"restored {', '.join(restored) or 'no file'}"
    if not p["manage_service"]:
        return changed, f"{what}; release {release or 'none'}"
    systemctl("daemon-reload")
    systemctl("reset-failed", p["unit"], check=False)
    if not release:
        systemctl("disable", "--now", p["unit"], check=False)
        return True, f"{what}; no release has passed the gate here, the agent is stopped"
    gate = Gate({**p, "proof": "none", "min_uptime": 0, "restart": True})
    systemctl("restart", "--no-block", p["unit"])
    try:
        gate.wait(show(p["unit"]), restarted=True)
        state = "running"
    except GateError as exc:
        state = f"not running: {exc}"
    return True, f"{what}; back on {release}, agent {state}"


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "action": {"type": "str", "required": True, "choices": ["gate", "rollback"]},
            "unit": {"type": "str", "required": True},
            "manage_service": {"type": "bool", "default": True},
            "config": {"type": "path", "required": True},
            "install_dir": {"type": "path", "required": True},
            "good_dir": {"type": "path", "required": True},
            "files": {"type": "dict", "required": True},
            "restart": {"type": "bool", "default": False},
            "daemon_reload": {"type": "bool", "default": False},
            "proof": {"type": "str", "default": "receipt", "choices": list(PROOFS)},
            "timeout": {"type": "int", "default": 180},
            "min_uptime": {"type": "int", "default": 20},
        },
        supports_check_mode=True,
    )
    p = module.params
    if module.check_mode:
        module.exit_json(changed=bool(p["restart"]), msg="check mode: nothing done")
    started = time.monotonic()
    try:
        if p["action"] == "rollback":
            changed, msg = rollback(p)
            module.exit_json(changed=changed, msg=msg)
        removed = remove_stale_backups(p["files"])
        restarted = False
        msg = "service not managed"
        if p["manage_service"]:
            restarted, msg = Gate(p).run()
        saved = save_good(p)
        module.exit_json(
            changed=restarted or saved or bool(removed),
            restarted=restarted,
            removed_backups=removed,
            msg=msg,
            seconds=round(time.monotonic() - started, 1),
        )
    except GateError as exc:
        module.fail_json(msg=str(exc), seconds=round(time.monotonic() - started, 1))
    except (OSError, KeyError, ValueError, subprocess.SubprocessError) as exc:
        module.fail_json(msg=f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
