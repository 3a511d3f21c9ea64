"""CPU and memory of bench/scale.py's process groups, read from /proc between two moments.

A group is root processes plus all their live descendants. Its CPU time is each root's
utime + stime + cutime + cstime (the children it reaped) plus every live descendant's
utime + stime, so a PostgreSQL backend or autovacuum worker that exits between two
samples is still counted (its time moves into the postmaster's cutime). Memory: RSS for
the broker, worker and generator; PSS for the database, whose processes share
shared_buffers (summing their RSS would count it once per backend).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

TICKS: Final = os.sysconf("SC_CLK_TCK")
PAGE: Final = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # fields from 3 (state) on; comm may hold spaces


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                out.setdefault(int(fields[1]), []).append(int(entry))
    return out


def _descendants(roots: Sequence[int], tree: dict[int, list[int]]) -> list[int]:
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        for child in tree.get(pid, []):
            found.append(child)
            todo.append(child)
    return found


def _cpu_seconds(roots: Sequence[int], tree: dict[int, list[int]]) -> float:
    ticks = 0
    for pid in roots:
        fields = _stat(pid)
        if fields is not None:  # utime stime cutime cstime are fields 14-17
            ticks += sum(int(f) for f in fields[11:15])
    for pid in _descendants(roots, tree):
        fields = _stat(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / TICKS


def _memory_bytes(pids: Sequence[int], *, proportional: bool) -> int:
    total = 0
    for pid in pids:
        try:
            if proportional:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
            else:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
    return total


def _machine_ticks() -> tuple[int, int]:
    """(busy, all) jiffies of the machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def mem_available_fraction() -> float:
    info = dict(
        line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line
    )
    return int(info["MemAvailable"].split()[0]) / int(info["MemTotal"].split()[0])


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


@dataclass
class GroupUse:
    """One group over the interval: cores used (1.0 = one core busy) and peak memory."""

    cores: float
    peak_mb: float


@dataclass
class Meter:
    """Start at construction; `sample()` tracks memory peaks; `stop()` returns the figures."""

    groups: dict[str, Sequence[int]]
    proportional: frozenset[str] = frozenset({"database"})
    _cpu0: dict[str, float] = field(default_factory=dict)
    _peaks: dict[str, int] = field(default_factory=dict)
    _machine0: tuple[int, int] = (0, 0)
    _t0: float = 0.0
    min_available: float = 1.0

    def __post_init__(self) -> None:
        tree = _children()
        self._cpu0 = {name: _cpu_seconds(pids, tree) for name, pids in self.groups.items()}
        self._machine0 = _machine_ticks()
        self._t0 = time.monotonic()
        self.sample()

    def sample(self) -> None:
        tree = _children()
        for name, roots in self.groups.items():
            pids = [*roots, *_descendants(roots, tree)]
            used = _memory_bytes(pids, proportional=name in self.proportional)
            self._peaks[name] = max(self._peaks.get(name, 0), used)
        self.min_available = min(self.min_available, mem_available_fraction())

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds per group since the start (bench/ingest.py's accounting)."""
        tree = _children()
        return {
            name: _cpu_seconds(pids, tree) - self._cpu0[name] for name, pids in self.groups.items()
        }

    def stop(self) -> tuple[dict[str, GroupUse], float]:
        """Per group use, and the machine's busy share of all its cores (0..1)."""
        self.sample()
        wall = time.monotonic() - self._t0
        tree = _children()
        out = {
            name: GroupUse(
                cores=(_cpu_seconds(pids, tree) - self._cpu0[name]) / wall,
                peak_mb=self._peaks[name] / 2**20,
            )
            for name, pids in self.groups.items()
        }
        busy, total = _machine_ticks()
        machine = (busy - self._machine0[0]) / max(1, total - self._machine0[1])
        return out, machine
