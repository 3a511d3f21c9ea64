"""Persisted agent state: runtime settings and the log of applied command ids.

Both live in one small JSON file replaced atomically (write, fsync, rename,
fsync the directory), so a `set` and the record that its id was applied
land together or not at all: a command is never applied twice, even across
a crash between applying it and replying.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_VERSION = 1
# Ids remembered for duplicate detection; a retried command arrives within minutes.
MAX_REMEMBERED_COMMANDS = 500


@dataclass(frozen=True, slots=True)
class AgentState:
    """Settings changed at runtime and recent command replies (by id)."""

    period_s: int | None = None
    poll_s: dict[str, float] = field(default_factory=dict)
    # id -> [command name, reply JSON]; insertion-ordered, oldest first.
    commands: dict[str, list[str]] = field(default_factory=dict)

    def remember(self, command_id: str, name: str, reply_json: str) -> AgentState:
        commands = dict(self.commands)
        commands[command_id] = [name, reply_json]
        while len(commands) > MAX_REMEMBERED_COMMANDS:
            commands.pop(next(iter(commands)))
        return replace(self, commands=commands)


def atomic_write(path: Path, data: bytes) -> None:
    """Write a temp file whole, then rename it over `path`; on failure `path` is untouched.

    One os.write may write only part (a full disk, a signal), so it loops; the partial
    temp file of a failed write is removed.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            rest = memoryview(data)
            while rest:
                rest = rest[os.write(fd, rest) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateStore:
    """Loads and saves `AgentState` in the configured state directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE

    def load(self) -> AgentState:
        """The saved state; a missing or unreadable file means defaults (logged)."""
        try:
            data: Any = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return AgentState()
        except (OSError, ValueError) as exc:
            log.error("ignoring unreadable state file %s: %s", self.path, exc)
            return AgentState()
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            log.error("ignoring state file %s with an unknown layout", self.path)
            return AgentState()
        period = data.get("period_s")
        polls = data.get("poll_s") or {}
        commands = data.get("commands") or {}
        return AgentState(
            period_s=period if isinstance(period, int) and not isinstance(period, bool) else None,
            poll_s={
                str(k): float(v)
                for k, v in polls.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            },
            commands={
                str(k): [str(v[0]), str(v[1])]
                for k, v in commands.items()
                if isinstance(v, list) and len(v) == 2
            },
        )

    def save(self, state: AgentState) -> None:
        """Replace the state file atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        body = {
            "version": STATE_VERSION,
            "period_s": state.period_s,
            "poll_s": state.poll_s,
            "commands": state.commands,
        }
        atomic_write(self.path, json.dumps(body, separators=(",", ":")).encode())
