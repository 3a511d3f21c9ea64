"""Reconcile what the database holds against the simulator's ground truth, window by window.

The rules both sides follow (read from the code, see docs/guarantees.md):

- The edge stamps a reading with its poll time (Modbus, 1-wire) or its arrival time
  (MQTT) and puts it in the window ``[k*P, (k+1)*P)`` holding that stamp
  (edge/windows.py). Polls run on wall-clock multiples of their 1 s interval
  (edge/sampler.py), so a reading is stamped a few milliseconds into a second.
- The simulator logs ``ts``, the 1 s step the value belongs to, and ``served_at``
  (firmware-sim/README.md). A Modbus value is computed when the read is answered and
  an MQTT value is published on the second, so the edge's stamp lies in the step ``ts``:
  a truth row belongs to the window holding ``ts``. That is exact.
- A 1-wire file is rewritten a few milliseconds after each second while the edge reads
  it a few milliseconds after each second too; the poll in second ``k`` therefore sees
  the value of step ``k`` or, when it wins the race, of step ``k - 1``. Each poll is one
  reading either way, so the count is exact and the values are checked by trying both
  choices for every poll (2^P combinations for a window of P seconds).

Which readings the agent must have seen follows from when it ran (`Life`): truth rows
inside a life are MUST (the stored window has to contain them), rows at a life's edges
are MAY (start-up before the local subscription is confirmed, the moments after SIGTERM,
and the windows still open when the agent was SIGKILLed: the allowed loss), everything
else is NEVER. A stored window matches when it equals the aggregate of a contiguous run
of the window's MUST and MAY readings that contains every MUST reading.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Final, Literal

Kind = Literal["plc", "mqtt", "w1"]
Verdict = Literal[
    "exact",  # every reading of the window was certainly observed, and all of them are stored
    "matched",  # a window at a life's edge: stored equals a run of what could be observed
    "allowed_loss",  # open when its agent was SIGKILLed: stored is a part of it, or nothing
    "unobserved",  # no agent could have read it, and nothing is stored
    "lost",  # readings the agent certainly took are missing
    "doubled",  # more readings stored than were served (or stored where none could be)
    "mismatch",  # the right number of readings with different values
]
FAILED: Final = frozenset({"lost", "doubled", "mismatch"})
# Metric name prefixes millrace.ops.stack.edgeconfig gives each simulated device kind.
METRIC_PREFIX: Final[Mapping[str, str]] = {"plc": "plc.", "mqtt": "node.", "w1": "w1."}
# The ground truth prints values with 12 significant digits; sums of a few readings
# stay far inside this relative bound, and it is still far below any signal's resolution.
RELATIVE_TOLERANCE: Final = 1e-11
# After SIGTERM a reading served this long before the signal has certainly arrived.
END_MARGIN_SECONDS: Final = 0.5
# A window due for its outbox flush at end + grace is written within this.
FLUSH_SLACK_SECONDS: Final = 0.5
MAX_CHOICES: Final = 4096


class Status(IntEnum):
    """Whether the agent must, may or cannot have observed a reading."""

    NEVER = 0
    MAY = 1
    MUST = 2


@dataclass(frozen=True, slots=True)
class Life:
    """One run of an edge agent, in real (test) time.

    `ready_at`: from here on every source is certainly read (local subscription
    confirmed). `stopped_at`: when SIGTERM or SIGKILL was sent; `exited_at`: when the
    process was gone.
    """

    started_at: float
    ready_at: float
    stopped_at: float
    exited_at: float
    killed: bool

    def open_from(self, *, period_s: int, grace_s: float) -> float:
        """Start of the oldest window not yet in the outbox at a SIGKILL."""
        closed_before = self.stopped_at - grace_s - FLUSH_SLACK_SECONDS
        return math.floor(closed_before / period_s) * period_s

    def status(self, t: float, *, kind: Kind, period_s: int, grace_s: float) -> Status:
        """What this life says about a reading served (or polled) at `t`."""
        if t < self.started_at - 1.0 or t >= self.exited_at + 1.0:
            return Status.NEVER
        if self.killed:
            if t >= self.open_from(period_s=period_s, grace_s=grace_s):
                return Status.MAY if t < self.stopped_at + 1.0 else Status.NEVER
        elif t >= self.stopped_at - END_MARGIN_SECONDS:
            # A Modbus row exists only if our agent read it, and SIGTERM aggregates every
            # read in progress before closing the windows.
            return Status.MUST if kind == "plc" else Status.MAY
        if t >= self.ready_at:
            return Status.MUST
        if kind == "plc" and t >= self.started_at:
            return Status.MUST
        return Status.MAY


@dataclass(frozen=True, slots=True)
class Unit:
    """One reading the agent may have taken: when, and the value(s) it could have read."""

    t: float
    values: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class TruthSeries:
    """The ground truth of one (gateway, metric)."""

    gateway: str
    metric: str
    kind: Kind
    units: tuple[Unit, ...]  # sorted by t
    rejected_steps: tuple[float, ...] = ()  # served values the fault injector made invalid


@dataclass(frozen=True, slots=True)
class Stored:
    """One stored window (from readings, or decoded from a dead letter)."""

    gateway: str
    metric: str
    start_ms: int
    count: int
    sum: float
    min: float
    max: float
    first: float
    last: float
    rejected: int
    source: Literal["readings", "dead_letters"] = "readings"


@dataclass(frozen=True, slots=True)
class WindowResult:
    gateway: str
    metric: str
    start_ms: int
    verdict: Verdict
    must: int
    may: int
    stored: int
    detail: str = ""
    moved_in: bool = False  # holds the next window's first poll, stamped before the boundary


@dataclass
class Reconciliation:
    """Every window's verdict and the figures the tests and docs report."""

    period_s: int
    results: list[WindowResult] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)

    def count(self, *verdicts: Verdict) -> int:
        return sum(1 for r in self.results if r.verdict in verdicts)

    @property
    def compared(self) -> int:
        """Windows checked against truth readings the agent certainly observed."""
        return sum(1 for r in self.results if r.must)

    @property
    def failures(self) -> list[WindowResult]:
        return [r for r in self.results if r.verdict in FAILED]

    def allowed_loss_readings(self, gateway: str | None = None) -> int:
        return sum(
            r.must + r.may - r.stored
            for r in self.results
            if r.verdict == "allowed_loss" and (gateway is None or r.gateway == gateway)
        )

    def windows_with(self, verdict: Verdict, gateway: str | None = None) -> set[int]:
        """Window starts (ms) with that verdict, any metric."""
        return {
            r.start_ms
            for r in self.results
            if r.verdict == verdict and (gateway is None or r.gateway == gateway)
        }

    def figures(self) -> dict[str, int]:
        return {
            "windows": len(self.results),
            "compared": self.compared,
            "exact": self.count("exact"),
            "matched_partial": self.count("matched"),
            "allowed_loss_windows": self.count("allowed_loss"),
            "allowed_loss_readings": self.allowed_loss_readings(),
            "unobserved": self.count("unobserved"),
            "lost": self.count("lost"),
            "doubled": self.count("doubled") + len(self.duplicates),
            "mismatched": self.count("mismatch"),
            "moved_across_boundary": sum(1 for r in self.results if r.moved_in),
        }

    def summary(self) -> str:
        figures = " ".join(f"{k}={v}" for k, v in self.figures().items())
        lines = [f"reconciliation (period {self.period_s} s): {figures}"]
        lines += [f"  duplicate: {d}" for d in self.duplicates[:20]]
        for r in self.failures[:40]:
            lines.append(
                f"  {r.verdict}: {r.gateway} {r.metric} @{r.start_ms} must={r.must} may={r.may}"
                f" stored={r.stored} {r.detail}"
            )
        return "\n".join(lines)


# -- ground truth ----------------------------------------------------------------------------


def load_ground_truth(path: Path, manifest: Mapping[str, Any]) -> list[TruthSeries]:
    """The numeric series of every simulated gateway, as the edge config names them."""
    devices = {d["id"]: d for d in manifest["devices"]}
    numeric = {
        (d["id"], s["name"]) for d in manifest["devices"] for s in d["signals"] if not _is_state(s)
    }
    rows: dict[tuple[str, str], list[tuple[float, float, float, str]]] = defaultdict(list)
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            key = (row["device"], row["signal"])
            if key in numeric:
                rows[key].append(
                    (float(row["served_at"]), float(row["ts"]), float(row["value"]), row["fault"])
                )
    series = []
    for (device_id, signal), served in sorted(rows.items()):
        device = devices[device_id]
        kind: Kind = device["kind"]
        served.sort()
        metric = METRIC_PREFIX[kind] + signal
        if kind == "w1":
            units = _w1_polls(served)
            rejected: tuple[float, ...] = ()
        else:
            units = tuple(Unit(ts, (value,)) for _, ts, value, fault in served if not fault)
            rejected = tuple(ts for _, ts, _, fault in served if fault)
        series.append(TruthSeries(device["gateway"], metric, kind, units, rejected))
    return series


def _is_state(signal: Mapping[str, Any]) -> bool:
    return signal.get("kind") == "state"


def _w1_polls(served: Sequence[tuple[float, float, float, str]]) -> tuple[Unit, ...]:
    """One poll per second from the first write on; it reads step k's file or step k-1's."""
    file_at: dict[int, float] = {}
    for _, ts, value, fault in served:
        if not fault:
            file_at[int(ts)] = value
    if not file_at:
        return ()
    units = []
    previous: float | None = None
    current: float | None = None
    for second in range(min(file_at), max(file_at) + 1):
        previous, current = current, file_at.get(second, current)
        assert current is not None
        options = (current,) if previous is None or previous == current else (current, previous)
        units.append(Unit(float(second), options))
    return tuple(units)


# -- matching --------------------------------------------------------------------------------


def _close(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= RELATIVE_TOLERANCE * max(1.0, scale)


def _aggregate_matches(stored: Stored, values: Sequence[float]) -> bool:
    if len(values) != stored.count:
        return False
    magnitude = sum(abs(v) for v in values)
    return (
        _close(math.fsum(values), stored.sum, magnitude)
        and _close(min(values), stored.min, abs(stored.min))
        and _close(max(values), stored.max, abs(stored.max))
        and _close(values[0], stored.first, abs(stored.first))
        and _close(values[-1], stored.last, abs(stored.last))
    )


def _runs(statuses: Sequence[Status], length: int) -> Iterable[tuple[int, int]]:
    """Contiguous [i, j) of `length` units, none NEVER, covering every MUST unit."""
    must = [i for i, s in enumerate(statuses) if s == Status.MUST]
    for i in range(len(statuses) - length + 1):
        j = i + length
        if any(s == Status.NEVER for s in statuses[i:j]):
            continue
        if must and (must[0] < i or must[-1] >= j):
            continue
        yield i, j


def _find_match(stored: Stored, units: Sequence[Unit], statuses: Sequence[Status]) -> bool:
    for i, j in _runs(statuses, stored.count):
        options = [u.values for u in units[i:j]]
        if math.prod(len(o) for o in options) > MAX_CHOICES:
            raise ValueError(f"too many value choices in {stored.metric} @{stored.start_ms}")
        if any(_aggregate_matches(stored, choice) for choice in itertools.product(*options)):
            return True
    return False


def _judge(
    stored: Stored | None,
    units: Sequence[Unit],
    statuses: Sequence[Status],
    *,
    in_kill_window: bool,
    expected_rejected: tuple[int, int] | None,
) -> tuple[Verdict, str]:
    """The verdict on one window; MUST readings never fall in a SIGKILL's allowed loss."""
    must = statuses.count(Status.MUST)
    possible = must + statuses.count(Status.MAY)
    if stored is None:
        if must:
            return "lost", f"{must} readings certainly taken, none stored"
        if in_kill_window and possible:
            return "allowed_loss", "open at SIGKILL, nothing stored"
        return "unobserved", ""
    if stored.count > possible:
        return "doubled", f"{stored.count} stored, at most {possible} could be observed"
    if stored.count < must:
        return "lost", f"{stored.count} stored, {must} certainly taken"
    if not _find_match(stored, units, statuses):
        return "mismatch", f"no run of readings gives {stored}"
    if expected_rejected is not None and not (
        expected_rejected[0] <= stored.rejected <= expected_rejected[1]
    ):
        return "mismatch", f"rejected {stored.rejected}, the simulator made {expected_rejected}"
    if in_kill_window and stored.count < possible:
        return "allowed_loss", f"open at SIGKILL: {stored.count} of {possible} stored"
    if must == len(units) == stored.count:
        return "exact", ""
    return "matched", ""


def reconcile(
    truth: Sequence[TruthSeries],
    stored: Iterable[Stored],
    *,
    lives: Mapping[str, Sequence[Life]],
    period_s: int,
    grace_s: float,
    clock_offsets_s: Mapping[str, int] | None = None,
) -> Reconciliation:
    """Judge every (gateway, metric, window) that has truth readings or a stored window.

    `clock_offsets_s`: how far a gateway's clock was ahead; its stored windows are moved
    back by that much (a whole number of periods) before comparing.
    """
    offsets = clock_offsets_s or {}
    result = Reconciliation(period_s)
    period_ms = period_s * 1000
    by_key: dict[tuple[str, str, int], Stored] = {}
    for window in stored:
        offset_ms = offsets.get(window.gateway, 0) * 1000
        if offset_ms % period_ms:
            raise ValueError(f"clock offset of {window.gateway} is not a whole number of periods")
        key = (window.gateway, window.metric, window.start_ms - offset_ms)
        if key in by_key:
            result.duplicates.append(f"{key} stored twice ({by_key[key].source}, {window.source})")
            continue
        by_key[key] = window
    series_by_key = {(s.gateway, s.metric): s for s in truth}
    starts: dict[tuple[str, str], set[int]] = defaultdict(set)
    for s in truth:
        if s.gateway in lives:
            starts[(s.gateway, s.metric)].update(_window_ms(u.t, period_s) for u in s.units)
    for gateway, metric, start_ms in by_key:
        starts[(gateway, metric)].add(start_ms)
    for (gateway, metric), window_starts in sorted(starts.items()):
        series = series_by_key.get((gateway, metric))
        judge = _SeriesJudge(
            series,
            {s: by_key.get((gateway, metric, s)) for s in window_starts},
            lives.get(gateway, ()),
            period_s=period_s,
            grace_s=grace_s,
        )
        for start_ms, verdict, must, may, moved, detail in judge.run():
            found = by_key.get((gateway, metric, start_ms))
            result.results.append(
                WindowResult(
                    gateway,
                    metric,
                    start_ms,
                    verdict,
                    must,
                    may,
                    found.count if found else 0,
                    detail,
                    moved,
                )
            )
    return result


class _SeriesJudge:
    """All windows of one series, judged together.

    A polled reading of a window's first second may carry a stamp a hair before the
    boundary: the edge schedules polls exactly on wall-clock seconds and stamps the
    request, so scheduling jitter puts some stamps microseconds early (the value itself
    is served just after the boundary). Such a reading belongs to the previous window.
    Each of these floating readings is counted in exactly one of its two windows; a
    dynamic programme over the boundaries finds the placement under which most windows
    match, preferring fewer moves.
    """

    def __init__(
        self,
        series: TruthSeries | None,
        stored: Mapping[int, Stored | None],
        lives: Sequence[Life],
        *,
        period_s: int,
        grace_s: float,
    ) -> None:
        self.kind: Kind = series.kind if series else "plc"
        self.period_ms = period_s * 1000
        self.starts = sorted(stored)
        self.stored = stored
        base: dict[int, list[tuple[Unit, Status]]] = defaultdict(list)
        faults: Counter[int] = Counter()
        self.fault_at_start: set[int] = set()
        if series is not None:
            for unit in series.units:
                status = _status(unit.t, lives, kind=self.kind, period_s=period_s, grace_s=grace_s)
                base[_window_ms(unit.t, period_s)].append((unit, status))
            for ts in series.rejected_steps:
                faults[_window_ms(ts, period_s)] += 1
                if ts * 1000 % self.period_ms == 0:
                    self.fault_at_start.add(round(ts * 1000))
        self.base = base
        self.faults = faults
        self.in_kill = {
            s: any(
                life.killed
                and s / 1000 <= life.stopped_at + 1.0
                and s / 1000 + period_s > life.open_from(period_s=period_s, grace_s=grace_s)
                for life in lives
            )
            for s in self.starts
        }
        self._cache: dict[tuple[int, bool, bool], tuple[Verdict, str]] = {}

    def _floater(self, start: int) -> tuple[Unit, Status] | None:
        """The poll of the window's first second, if this kind is polled."""
        units = self.base.get(start, [])
        if self.kind == "mqtt" or not units or units[0][0].t * 1000 != start:
            return None
        return units[0]

    def _can_move(self, index: int) -> bool:
        return (
            index > 0
            and self.starts[index - 1] == self.starts[index] - self.period_ms
            and self._floater(self.starts[index]) is not None
        )

    def _units(self, index: int, gives: bool, takes: bool) -> list[tuple[Unit, Status]]:
        start = self.starts[index]
        units = list(self.base.get(start, []))
        if gives:
            units = units[1:]
        if takes:
            floater = self._floater(self.starts[index + 1])
            assert floater is not None
            units.append(floater)
        return units

    def _judge(self, index: int, gives: bool, takes: bool) -> tuple[Verdict, str]:
        key = (index, gives, takes)
        if key not in self._cache:
            start = self.starts[index]
            pairs = self._units(index, gives, takes)
            units = [u for u, _ in pairs]
            statuses = [s for _, s in pairs]
            expected: tuple[int, int] | None = None
            if self.kind == "plc" and units and all(s == Status.MUST for s in statuses):
                base = self.faults[start]
                low = base - (1 if start in self.fault_at_start else 0)
                high = base + (1 if start + self.period_ms in self.fault_at_start else 0)
                expected = (low, high)
            self._cache[key] = _judge(
                self.stored[start],
                units,
                statuses,
                in_kill_window=self.in_kill[start],
                expected_rejected=expected,
            )
        return self._cache[key]

    def run(self) -> list[tuple[int, Verdict, int, int, bool, str]]:
        n = len(self.starts)
        # best[c]: (failures, moves) of windows before `index`, with choice c at `index`.
        inf = (math.inf, math.inf)
        best: list[dict[bool, tuple[float, float]]] = [{False: (0, 0), True: inf}]
        back: list[dict[bool, bool]] = [{}]
        for index in range(1, n + 1):
            row: dict[bool, tuple[float, float]] = {}
            came: dict[bool, bool] = {}
            for takes in (False, True):
                if takes and (index == n or not self._can_move(index)):
                    row[takes] = inf
                    continue
                options = []
                for gives in (False, True):
                    failures, moves = best[-1][gives]
                    if failures == math.inf:
                        continue
                    verdict, _ = self._judge(index - 1, gives, takes)
                    cost = (failures + (verdict in FAILED), moves + takes)
                    options.append((cost, gives))
                cost, gives = min(options)
                row[takes], came[takes] = cost, gives
            best.append(row)
            back.append(came)
        choices = [False] * (n + 1)
        for index in range(n, 0, -1):
            choices[index - 1] = back[index][choices[index]]
        out = []
        for index, start in enumerate(self.starts):
            gives, takes = choices[index], choices[index + 1]
            verdict, detail = self._judge(index, gives, takes)
            statuses = [s for _, s in self._units(index, gives, takes)]
            out.append(
                (
                    start,
                    verdict,
                    statuses.count(Status.MUST),
                    statuses.count(Status.MAY),
                    takes,
                    detail,
                )
            )
        return out


def _window_ms(t: float, period_s: int) -> int:
    return math.floor(t / period_s) * period_s * 1000


def _status(
    t: float, lives: Sequence[Life], *, kind: Kind, period_s: int, grace_s: float
) -> Status:
    return max(
        (life.status(t, kind=kind, period_s=period_s, grace_s=grace_s) for life in lives),
        default=Status.NEVER,
    )
