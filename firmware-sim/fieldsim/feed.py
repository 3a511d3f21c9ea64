"""Where a served value comes from: the model or a replay, then the device's value faults."""

from __future__ import annotations

from dataclasses import dataclass

from millrace.fieldsim.faults import DeviceFaults, faulted_value
from millrace.fieldsim.models import period_start, value_at
from millrace.fieldsim.replay import Replay
from millrace.fieldsim.specs import SignalSpec


@dataclass(frozen=True, slots=True)
class Sample:
    """One value as a device is about to serve it."""

    value: float
    ts: float
    fault: str


class Feed:
    """Values for every device of a fleet: a pure function of (seed, device, signal, t)."""

    def __init__(self, *, seed: int, replay: Replay | None = None) -> None:
        self.seed = seed
        self.replay = replay

    def clean(self, device: str, spec: SignalSpec, t: float) -> tuple[float, float]:
        """(value, valid_from) before faults."""
        if self.replay is not None:
            hit = self.replay.lookup(device, spec.name, t)
            if hit is not None:
                return hit
        return value_at(self.seed, device, spec, t), period_start(t, spec.resolution_s)

    def sample(self, device: str, spec: SignalSpec, t: float, faults: DeviceFaults) -> Sample:
        """The value to serve at t, with any value fault applied."""
        value, ts = self.clean(device, spec, t)
        fault = faults.value_fault(t, spec.name) if faults.windows else None
        if fault is None:
            return Sample(value, ts, "")
        served = faulted_value(
            fault,
            seed=self.seed,
            device=device,
            spec=spec,
            t=t,
            clean=value,
            clean_at=lambda at: self.clean(device, spec, at)[0],
        )
        return Sample(served, ts, fault.kind)
