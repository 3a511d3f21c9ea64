"""The batch writer: one transaction per batch of MQTT messages (filled in below)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class StoredWindow:
    """A window committed in the current transaction; what alert rules evaluate."""

    device: str
    metric: str
    ts: datetime
    period_s: int
    count: int
    sum: float
    min: float
    max: float
    first: float
    last: float
