"""What every driver shares: a failed read, and the group a poller thread reads together."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from millrace.edge.config import SignalConfig


@dataclass(frozen=True, slots=True)
class ReadFailure:
    """A read that produced no value; `reason` is what the heartbeat and `edge check` show."""

    reason: str


Value = float | int | bool | str
ReadResult = Value | ReadFailure


class PollGroup(Protocol):
    """Signals read together on one schedule (one Modbus request span, one file ...)."""

    @property
    def indexes(self) -> tuple[int, ...]:
        """Positions of the group's signals in the config's signal list."""
        ...

    @property
    def interval_s(self) -> float: ...

    def read(self, ts_ms: int) -> Sequence[ReadResult]:
        """One result per signal (in `indexes` order) for a poll at `ts_ms`; never raises."""
        ...

    def close(self) -> None: ...


class Sink(Protocol):
    """Where drivers deliver readings (the pipeline)."""

    def reading(self, index: int, ts_ms: int, raw: object) -> None: ...

    def failure(self, index: int, ts_ms: int, reason: str) -> None: ...


def text_or_number(signal: SignalConfig, text: str) -> ReadResult:
    """A numeric signal needs a number; state/enum signals take the text as it is."""
    text = text.strip()
    if signal.kind != "numeric":
        return text if text else ReadFailure("empty value")
    try:
        return float(text)
    except ValueError:
        shown = text if len(text) <= 40 else text[:40] + "..."
        return ReadFailure(f"not a number: {shown!r}")
