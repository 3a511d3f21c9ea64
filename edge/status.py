"""status.json in the state directory: what this agent process has proven since it started.

A rollout's health gate (ansible/roles/edge_agent) reads it to tell that the agent systemd
just started is the one that connected to the plant broker (TLS and CONNACK with the
device's own certificate) and had its own batches stored (a cloud receipt for this boot
id), without opening a second connection that would take over the agent's client id.
The file is replaced atomically, and only when a milestone changes (SD cards wear out).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from millrace.edge.state import atomic_write

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
STATUS_VERSION = 1


@dataclass(frozen=True, slots=True)
class AgentStatus:
    pid: int
    boot_id: str
    started_ms: int
    # Wall clock of this process's first CONNACK from the plant broker (None: not yet).
    connected_ms: int | None = None
    connected: bool = False
    # Wall clock of the first receipt for a batch of this boot id: stored in the cloud.
    receipted_ms: int | None = None
    last_error: str = ""
    # `host:port` of the plant broker in use (or tried next): with several, which one.
    broker: str = ""

    def to_json(self) -> bytes:
        return json.dumps({"version": STATUS_VERSION, **asdict(self)}, sort_keys=True).encode()


class StatusFile:
    """Writes `AgentStatus` to `<state dir>/status.json` when it changes."""

    def __init__(self, directory: Path, *, pid: int | None = None) -> None:
        self.path = directory / STATUS_FILE
        self.pid = os.getpid() if pid is None else pid
        self._last: AgentStatus | None = None

    def update(self, status: AgentStatus) -> bool:
        """Write `status` if it differs from what was written last; True if written."""
        if status == self._last:
            return False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, status.to_json())
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc)
            return False
        self._last = status
        return True
