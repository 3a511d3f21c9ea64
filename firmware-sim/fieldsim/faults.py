"""Fault injection: which fault a device shows at time t, and what it does to a value.

A fault targets a device id (``gw0003-plc``), a whole gateway (``gw0003``) or
every device (``*``); it starts `start_s` seconds after the fleet started and
lasts `duration_s` (None: until the fleet stops). Value faults change what is
served; transport faults change how (or whether) it is served, and each device
kind interprets them (see the README's fault table).
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

from millrace.errors import ConfigError
from millrace.fieldsim.const import SLOW_DELAY_SECONDS, SPIKE_SHARE, SPIKE_SPAN_FACTOR
from millrace.fieldsim.models import stream_key, unit, value_at
from millrace.fieldsim.specs import SignalSpec

FaultKind = Literal[
    "stuck",
    "spike",
    "nan",
    "out_of_range",
    "dropout",
    "slow",
    "refused",
    "garbage",
    "bad_crc",
]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)
VALUE_FAULTS = frozenset({"stuck", "spike", "nan", "out_of_range"})
TRANSPORT_FAULTS = frozenset({"dropout", "slow", "refused", "garbage", "bad_crc"})

_FLAG = re.compile(
    r"^(?P<target>[^:@+\s]+):(?P<kind>[a-z_]+)"
    r"(?:@(?P<start>\d+(?:\.\d+)?))?(?:\+(?P<duration>\d+(?:\.\d+)?))?$"
)


@dataclass(frozen=True, slots=True)
class Fault:
    """One scheduled fault, relative to the fleet's start."""

    target: str
    kind: FaultKind
    start_s: float = 0.0
    duration_s: float | None = None
    delay_s: float = SLOW_DELAY_SECONDS
    signals: tuple[str, ...] = ()

    def applies_to(self, device: str, gateway: str) -> bool:
        """True if this fault targets the device, its gateway or everything."""
        return self.target in ("*", device, gateway)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest."""
        return {
            "target": self.target,
            "kind": self.kind,
            "start_s": self.start_s,
            "duration_s": self.duration_s,
            "delay_s": self.delay_s,
            "signals": list(self.signals),
        }


@dataclass(frozen=True, slots=True)
class ActiveFault:
    """A fault pinned to wall-clock time for one device."""

    kind: FaultKind
    start: float
    end: float
    delay_s: float
    signals: frozenset[str]

    def covers(self, t: float) -> bool:
        """True while the fault is on."""
        return self.start <= t < self.end

    def hits(self, signal: str) -> bool:
        """True if the fault applies to this signal (an empty list means all)."""
        return not self.signals or signal in self.signals


def fault_kind(value: object, key: str, *, source: str | None = None) -> FaultKind:
    """Check a fault kind name; the error names the option or key."""
    if value not in FAULT_KINDS:
        raise ConfigError(
            key, f"unknown fault kind {value!r}; use one of {', '.join(FAULT_KINDS)}", source=source
        )
    return cast(FaultKind, value)


def parse_fault_flag(text: str) -> Fault:
    """Parse ``TARGET:KIND[@START_S][+DURATION_S]``, e.g. ``gw0002-plc:stuck@10+30``."""
    match = _FLAG.match(text.strip())
    if not match:
        raise ConfigError("--fault", f"{text!r} is not TARGET:KIND[@START][+DURATION]")
    duration = match["duration"]
    return Fault(
        target=match["target"],
        kind=fault_kind(match["kind"], "--fault"),
        start_s=float(match["start"] or 0.0),
        duration_s=float(duration) if duration is not None else None,
    )


def _fault_from_table(raw: dict[str, Any], key: str, source: str) -> Fault:
    allowed = {"target", "kind", "start_s", "duration_s", "delay_s", "signals"}
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(key, f"unknown field(s) {sorted(unknown)}", source=source)
    kind = fault_kind(raw.get("kind"), f"{key}.kind", source=source)
    if "target" not in raw:
        raise ConfigError(
            f"{key}.target", "is required (device id, gateway id or *)", source=source
        )
    try:
        duration = raw.get("duration_s")
        fault = Fault(
            target=str(raw["target"]),
            kind=kind,
            start_s=float(raw.get("start_s", 0.0)),
            duration_s=None if duration is None else float(duration),
            delay_s=float(raw.get("delay_s", SLOW_DELAY_SECONDS)),
            signals=tuple(str(s) for s in raw.get("signals", ())),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(key, f"bad value: {exc}", source=source) from exc
    if fault.start_s < 0 or (fault.duration_s is not None and fault.duration_s <= 0):
        raise ConfigError(key, "start_s must be >= 0 and duration_s > 0", source=source)
    return fault


def load_fault_file(path: Path) -> list[Fault]:
    """Load a schedule: a TOML file of ``[[fault]]`` tables (target, kind, start_s, ...)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("file", f"cannot read: {exc.strerror}", source=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("file", f"not valid TOML: {exc}", source=str(path)) from exc
    return [
        _fault_from_table(raw, f"fault[{i}]", str(path))
        for i, raw in enumerate(data.get("fault", []))
    ]


@dataclass(frozen=True, slots=True)
class DeviceFaults:
    """The faults of one device, in wall-clock time; the first one on at t wins."""

    windows: tuple[ActiveFault, ...] = ()

    @classmethod
    def pin(
        cls, faults: Iterable[Fault], *, device: str, gateway: str, started_at: float
    ) -> DeviceFaults:
        """Select the faults for one device and fix them to wall-clock time."""
        windows = tuple(
            ActiveFault(
                kind=f.kind,
                start=started_at + f.start_s,
                end=math.inf if f.duration_s is None else started_at + f.start_s + f.duration_s,
                delay_s=f.delay_s,
                signals=frozenset(f.signals),
            )
            for f in faults
            if f.applies_to(device, gateway)
        )
        return cls(windows)

    def value_fault(self, t: float, signal: str) -> ActiveFault | None:
        """The value fault on at t for this signal, or None."""
        for window in self.windows:
            if window.kind in VALUE_FAULTS and window.covers(t) and window.hits(signal):
                return window
        return None

    def transport_at(self, t: float) -> ActiveFault | None:
        """The transport fault on at t, or None."""
        for window in self.windows:
            if window.kind in TRANSPORT_FAULTS and window.covers(t):
                return window
        return None

    def edges(self, kinds: Sequence[str]) -> list[ActiveFault]:
        """Windows of the given kinds, ordered by start (for devices that act on edges)."""
        return sorted((w for w in self.windows if w.kind in kinds), key=lambda w: w.start)


def faulted_value(
    fault: ActiveFault | None,
    *,
    seed: int,
    device: str,
    spec: SignalSpec,
    t: float,
    clean: float,
    clean_at: Callable[[float], float] | None = None,
) -> float:
    """Apply a value fault to the clean value at t; transport faults leave it unchanged.

    `clean_at` gives the clean value at another time (for "stuck"); it defaults
    to the model, a replaying device passes its replay lookup.
    """
    if fault is None or fault.kind not in VALUE_FAULTS or not fault.hits(spec.name):
        return clean
    if fault.kind == "stuck":
        if clean_at is None:
            return value_at(seed, device, spec, fault.start)
        return clean_at(fault.start)
    if fault.kind == "nan":
        return math.nan
    if fault.kind == "out_of_range":
        return spec.valid_max + spec.valid_span
    # spike: about SPIKE_SHARE of steps jump by SPIKE_SPAN_FACTOR valid spans, up or down.
    key = stream_key(seed, device, spec.name, "spike")
    step = math.floor(t / spec.resolution_s)
    u = unit(key, step)
    if u >= SPIKE_SHARE:
        return clean
    sign = 1.0 if u < SPIKE_SHARE / 2 else -1.0
    return clean + sign * SPIKE_SPAN_FACTOR * spec.valid_span
