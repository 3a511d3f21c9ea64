"""A built-in deterministic signal for demos and tests: a pure function of time and seed."""

from __future__ import annotations

import math
from collections.abc import Sequence

from millrace.edge.config import SignalConfig, SimSpec
from millrace.edge.drivers.base import ReadResult

_MASK64 = (1 << 64) - 1
STEP_STATES = 4


def _unit_noise(seed: int, ts_ms: int) -> float:
    """splitmix64 of (seed, ts) mapped to [-1, 1): repeatable noise without state."""
    z = (seed * 0x9E3779B97F4A7C15 + ts_ms) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) / float(1 << 53) * 2.0 - 1.0


def sim_value(spec: SimSpec, ts_ms: int) -> float:
    """The simulated raw value at `ts_ms`."""
    period_ms = spec.wave_period_s * 1000.0
    phase = (ts_ms % period_ms) / period_ms
    c, a = spec.center, spec.amplitude
    if spec.wave == "sine":
        value = c + a * math.sin(2 * math.pi * phase)
    elif spec.wave == "ramp":
        value = c - a + 2 * a * phase
    elif spec.wave == "square":
        value = c + a if phase < 0.5 else c - a
    elif spec.wave == "noise":
        value = c + a * _unit_noise(spec.seed + 1, ts_ms)
    elif spec.wave == "steps":
        value = c + a * int((ts_ms // period_ms) % STEP_STATES)
    else:
        value = c
    if spec.noise:
        value += spec.noise * _unit_noise(spec.seed, ts_ms)
    return value


class SimGroup:
    """Reads a set of sim signals sharing a poll interval."""

    def __init__(self, items: Sequence[tuple[int, SignalConfig]], *, interval_s: float) -> None:
        self.indexes = tuple(i for i, _ in items)
        self.interval_s = interval_s
        self._specs = [s.spec for _, s in items]
        self._state = [s.kind == "state" for _, s in items]

    def read(self, ts_ms: int) -> list[ReadResult]:
        out: list[ReadResult] = []
        for spec, is_state in zip(self._specs, self._state, strict=True):
            assert isinstance(spec, SimSpec)
            value = sim_value(spec, ts_ms)
            out.append(bool(int(value) % 2) if is_state else value)
        return out

    def close(self) -> None:
        pass
