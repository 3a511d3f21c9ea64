"""From raw driver values to windows and events: calibration, validity, deadband (pure).

Drivers on several threads call `reading` / `failure`; one lock keeps the
aggregator consistent. The work per reading is a few float operations and
attribute updates, with no allocation on the numeric path.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from millrace.edge.config import SignalConfig
from millrace.edge.windows import WindowAggregator
from millrace.errors import WireError
from millrace.wire import Event, EventValue, Window

# Readings whose magnitude exceeds this would overflow a window's sum of squares.
MAX_ABS_VALUE = 1e100
_TRUE_TEXT = frozenset({"on", "true", "yes", "1", "open", "high"})
_FALSE_TEXT = frozenset({"off", "false", "no", "0", "closed", "low"})
_NO_VALUE = object()


@dataclass(frozen=True, slots=True)
class Drained:
    """Closed windows, pending events and rejected readings no window carries.

    A non-zero `rejected` alone is worth a batch: it moves the cumulative count.
    """

    windows: tuple[Window, ...]
    events: tuple[Event, ...]
    rejected: int

    def __bool__(self) -> bool:
        return bool(self.windows or self.events or self.rejected)


class _Numeric:
    __slots__ = ("deadband", "high", "last", "low", "offset", "scale", "slot")

    def __init__(self, signal: SignalConfig, slot: int) -> None:
        self.slot = slot
        self.scale = signal.scale
        self.offset = signal.offset
        self.low = max(signal.valid_min, -MAX_ABS_VALUE)
        self.high = min(signal.valid_max, MAX_ABS_VALUE)
        self.deadband = signal.deadband
        self.last = math.nan


def event_value(signal: SignalConfig, raw: object) -> EventValue | None:
    """The event value of a state/enum reading, or None if it cannot be one."""
    if signal.kind == "state":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, (int, float)):
            return None if math.isnan(raw) else raw != 0
        if isinstance(raw, str):
            text = raw.strip().lower()
            if text in _TRUE_TEXT:
                return True
            if text in _FALSE_TEXT:
                return False
        return None
    key: str
    plain: int | float
    if isinstance(raw, bool):
        key, plain = str(int(raw)), int(raw)
    elif isinstance(raw, float):
        if not math.isfinite(raw):
            return None
        plain = int(raw) if raw.is_integer() else raw
        key = str(plain)
    elif isinstance(raw, int):
        key, plain = str(raw), raw
    elif isinstance(raw, str):
        key = plain_text = raw.strip()
        if not plain_text or len(plain_text) > 64:
            return None
        return signal.states.get(key, plain_text)
    else:
        return None
    return signal.states.get(key, plain)


class Pipeline:
    """Turns driver output into window aggregates, change events and counters."""

    def __init__(
        self, signals: Sequence[SignalConfig], *, periods_s: Sequence[int], grace_ms: int
    ) -> None:
        self.signals = tuple(signals)
        metrics = [s.metric for s in self.signals if s.kind == "numeric"]
        self.aggregator = WindowAggregator(metrics, periods_s, grace_ms=grace_ms)
        self._numeric: list[_Numeric | None] = []
        slot = 0
        for signal in self.signals:
            if signal.kind == "numeric":
                self._numeric.append(_Numeric(signal, slot))
                slot += 1
            else:
                self._numeric.append(None)
        self._last_event: list[object] = [_NO_VALUE] * len(self.signals)
        self._events: list[Event] = []
        self._orphan_rejected = 0
        self.lock = threading.Lock()
        # Cumulative counters for the heartbeat (since the agent started).
        self.rejected_total = 0
        self.readings_total = 0
        self.errors = [0] * len(self.signals)
        self.last_error = [""] * len(self.signals)

    def reading(self, index: int, ts_ms: int, raw: object) -> None:
        """One value read from signal `index` at `ts_ms`."""
        numeric = self._numeric[index]
        if numeric is None:
            self._event(index, ts_ms, raw)
            return
        try:
            value = float(raw) * numeric.scale + numeric.offset  # type: ignore[arg-type]
        except (TypeError, ValueError):
            value = math.nan
        with self.lock:
            self.readings_total += 1
            # NaN fails both comparisons, so it is rejected here too.
            if not numeric.low <= value <= numeric.high:
                self.rejected_total += 1
                self.aggregator.reject(numeric.slot, ts_ms)
                return
            if numeric.deadband and abs(value - numeric.last) < numeric.deadband:
                value = numeric.last
            else:
                numeric.last = value
            self.aggregator.add(numeric.slot, ts_ms, value)

    def failure(self, index: int, ts_ms: int, reason: str) -> None:
        """A failed read of signal `index`: counted as an error and as rejected."""
        numeric = self._numeric[index]
        with self.lock:
            self.readings_total += 1
            self.rejected_total += 1
            self.errors[index] += 1
            self.last_error[index] = reason
            if numeric is None:
                self._orphan_rejected += 1
            else:
                self.aggregator.reject(numeric.slot, ts_ms)

    def _event(self, index: int, ts_ms: int, raw: object) -> None:
        signal = self.signals[index]
        value = event_value(signal, raw)
        with self.lock:
            self.readings_total += 1
            if value is None:
                self.rejected_total += 1
                self._orphan_rejected += 1
                return
            if value == self._last_event[index] and type(value) is type(self._last_event[index]):
                return
            try:
                event = Event(signal.metric, ts_ms, value)
            except WireError:
                self.rejected_total += 1
                self._orphan_rejected += 1
                return
            self._last_event[index] = value
            self._events.append(event)

    @property
    def pending_events(self) -> int:
        return len(self._events)

    def drain(self, now_ms: int, *, close_all: bool = False) -> Drained:
        """Take closed windows (all open ones if `close_all`), pending events and orphan rejects."""
        with self.lock:
            closed = self.aggregator.close_all() if close_all else self.aggregator.close_due(now_ms)
            events, self._events = tuple(self._events), []
            rejected = closed.orphan_rejected + self._orphan_rejected
            self._orphan_rejected = 0
            # Late readings were not counted when they arrived (the aggregator found them).
            self.rejected_total += closed.late
        return Drained(closed.windows, events, rejected)

    def set_periods(self, periods_s: Sequence[int]) -> None:
        with self.lock:
            self.aggregator.set_periods(periods_s)

    def next_close_ms(self) -> int | None:
        with self.lock:
            return self.aggregator.next_close_ms()

    def error_counts(self) -> dict[str, int]:
        """Failed reads per metric (only metrics that failed at least once)."""
        with self.lock:
            return {s.metric: n for s, n in zip(self.signals, self.errors, strict=True) if n}
