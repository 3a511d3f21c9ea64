"""Run a command as the agent's systemd unit runs: its user, groups and hardening.

`millrace edge check --sandbox` on a gateway reads the files as the agent would (a key
root can read but the agent's user cannot fails here, not at the next restart) and tells
a running agent by its lock, which only the agent's user can open. The settings are the
unit's own `[Service]` lines (`systemctl cat`, drop-ins included), handed to
`systemd-run` for a transient unit, so the sandbox never drifts from the unit's.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from typing import Final

from millrace.errors import ConfigError

DEFAULT_UNIT: Final = "millrace-edge.service"
# What makes the agent a long-running notify service; a one-shot check takes none of it.
_NOT_SANDBOX: Final = frozenset(
    {
        "Type",
        "NotifyAccess",
        "WatchdogSec",
        "Restart",
        "RestartSec",
        "KillSignal",
        "TimeoutSec",
        "TimeoutStartSec",
        "TimeoutStopSec",
        "RuntimeMaxSec",
        "ExecStart",
        "ExecStartPre",
        "ExecStartPost",
        "ExecStop",
        "ExecStopPost",
        "ExecReload",
    }
)


def service_settings(unit_text: str) -> list[str]:
    """The `[Service]` assignments of `systemctl cat` output that shape the sandbox."""
    settings: list[str] = []
    section = ""
    for raw in unit_text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line
            continue
        key, sep, _ = line.partition("=")
        if section == "[Service]" and sep and key.strip() not in _NOT_SANDBOX:
            settings.append(line)
    return settings


def run_in_unit_sandbox(unit: str, command: Sequence[str]) -> int:
    """Run `command` in a transient unit with `unit`'s sandbox; its exit code."""
    for tool in ("systemctl", "systemd-run"):
        if shutil.which(tool) is None:
            raise ConfigError("--sandbox", f"needs systemd ({tool} not found): run without it")
    shown = subprocess.run(
        ["systemctl", "cat", "--", unit], capture_output=True, text=True, check=False
    )
    if shown.returncode != 0:
        problem = shown.stderr.strip().splitlines()[-1:] or ["no such unit"]
        raise ConfigError(
            "--sandbox", f"cannot read unit {unit} ({problem[0]}): name the agent's unit"
        )
    properties = [f"--property={s}" for s in service_settings(shown.stdout)]
    done = subprocess.run(
        [
            "systemd-run",
            "--quiet",
            "--wait",
            "--pipe",
            "--collect",
            "--service-type=exec",
            f"--description=millrace edge check in the sandbox of {unit}",
            *properties,
            "--",
            *command,
        ],
        check=False,
    )
    return done.returncode
