"""Deterministic signal models: a value is a pure function of (seed, device, signal, t).

Nothing here keeps state between calls, so a test can compute what a device
served at any instant, and a device can compute a value lazily when a client
reads it. Time is quantised to the signal's resolution first: every value
holds for one period [k * resolution, (k + 1) * resolution).
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache

from millrace.fieldsim.const import (
    DAY_SECONDS,
    STATE_FAULT,
    STATE_IDLE,
    STATE_IDLE_SHARE,
    STATE_PERIOD_SLOTS,
    STATE_RUNNING,
    STATE_RUNNING_SHARE,
    STATE_SLOT_SECONDS,
)
from millrace.fieldsim.specs import SignalSpec

_MASK64 = (1 << 64) - 1
_TWO64 = float(1 << 64)
_TAU = 2.0 * math.pi


@lru_cache(maxsize=65_536)
def stream_key(seed: int, device: str, signal: str, salt: str) -> int:
    """A 64-bit key naming one random stream; hashed once, then mixed cheaply per step."""
    digest = hashlib.blake2b(f"{seed}|{device}|{signal}|{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def mix(key: int, n: int) -> int:
    """splitmix64 of (key, n): a fast stateless 64-bit hash of a step index."""
    z = (key + (n + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def unit(key: int, n: int) -> float:
    """Uniform in [0, 1) for step n of the stream `key`."""
    return mix(key, n) / _TWO64


def period_start(t: float, resolution_s: float) -> float:
    """Start of the resolution period holding t: the timestamp a served value is valid from."""
    return math.floor(t / resolution_s) * resolution_s


@lru_cache(maxsize=4096)
def _state_table(seed: int, device: str) -> tuple[bytes, tuple[float, ...], float]:
    """Slot states of one period, running seconds before each slot, running seconds per period."""
    key = stream_key(seed, device, "", "machine_state")
    states = bytearray(STATE_PERIOD_SLOTS)
    cumulative = [0.0] * STATE_PERIOD_SLOTS
    total = 0.0
    for slot in range(STATE_PERIOD_SLOTS):
        u = unit(key, slot)
        if u < STATE_RUNNING_SHARE:
            state = STATE_RUNNING
        elif u < STATE_RUNNING_SHARE + STATE_IDLE_SHARE:
            state = STATE_IDLE
        else:
            state = STATE_FAULT
        states[slot] = state
        cumulative[slot] = total
        if state == STATE_RUNNING:
            total += STATE_SLOT_SECONDS
    return bytes(states), tuple(cumulative), total


def machine_state_at(seed: int, device: str, t: float) -> int:
    """Machine state (0 running, 1 idle, 2 fault) at time t; changes only on slot boundaries."""
    states, _, _ = _state_table(seed, device)
    return states[math.floor(t / STATE_SLOT_SECONDS) % STATE_PERIOD_SLOTS]


def running_seconds_at(seed: int, device: str, t: float) -> float:
    """Seconds the machine has been running between the Unix epoch and t (closed form)."""
    states, cumulative, per_period = _state_table(seed, device)
    slot = math.floor(t / STATE_SLOT_SECONDS)
    periods, index = divmod(slot, STATE_PERIOD_SLOTS)
    running = periods * per_period + cumulative[index]
    if states[index] == STATE_RUNNING:
        running += t - slot * STATE_SLOT_SECONDS
    return running


def _device_offset(seed: int, device: str, spec: SignalSpec) -> float:
    if not spec.model.level_spread:
        return 0.0
    key = stream_key(seed, device, spec.name, "level")
    return spec.model.level_spread * (2.0 * unit(key, 0) - 1.0)


def _analog(seed: int, device: str, spec: SignalSpec, tq: float, step_index: int) -> float:
    m = spec.model
    value = m.level + _device_offset(seed, device, spec)
    if m.trend_per_day:
        period = m.trend_period_days * DAY_SECONDS
        value += m.trend_per_day * ((tq % period) / DAY_SECONDS)
    if m.daily_amplitude:
        phase = ((tq - m.daily_peak_hour * 3600.0) % DAY_SECONDS) / DAY_SECONDS
        value += m.daily_amplitude * math.cos(_TAU * phase)
    if m.step:
        key = stream_key(seed, device, spec.name, "step")
        value += m.step * (math.floor(3.0 * unit(key, math.floor(tq / m.step_every_s))) - 1)
    if m.idle_factor != 1.0 and machine_state_at(seed, device, tq) != STATE_RUNNING:
        value *= m.idle_factor
    if m.noise:
        key = stream_key(seed, device, spec.name, "noise")
        # Sum of two uniforms: a triangular distribution on [-noise, +noise].
        value += m.noise * (unit(key, 2 * step_index) + unit(key, 2 * step_index + 1) - 1.0)
    if m.minimum is not None and value < m.minimum:
        value = m.minimum
    if m.maximum is not None and value > m.maximum:
        value = m.maximum
    return value


def value_at(seed: int, device: str, signal_spec: SignalSpec, t: float) -> float:
    """The model's value of one signal of one device at time t (the fault-free truth)."""
    step_index = math.floor(t / signal_spec.resolution_s)
    tq = step_index * signal_spec.resolution_s
    kind = signal_spec.kind
    if kind == "analog":
        return _analog(seed, device, signal_spec, tq, step_index)
    if kind == "counter":
        m = signal_spec.model
        value = m.level + _device_offset(seed, device, signal_spec)
        value += m.rate * running_seconds_at(seed, device, tq)
        return value % m.wrap if m.wrap else value
    state = machine_state_at(seed, device, tq)
    if signal_spec.model.derive == "running":
        return 1.0 if state == STATE_RUNNING else 0.0
    return float(state)
