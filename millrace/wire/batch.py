"""The batch envelope: what an edge agent publishes on its data topic.

Instances validate on construction, so a `Batch` that exists is a batch the
cloud may store. Every window is an exact-merge `Aggregate` (millrace.wire.aggregate),
so hourly and daily rollups merge windows exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from millrace.errors import WireError
from millrace.ids import DEVICE_ID_RULE, METRIC_NAME_RULE, is_device_id, is_metric_name
from millrace.wire.aggregate import AGGREGATE_FIELDS, Aggregate

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = frozenset({SCHEMA_VERSION})
MAX_PAYLOAD_BYTES = 512 * 1024
MAX_WINDOWS_PER_BATCH = 20_000
MAX_EVENTS_PER_BATCH = 20_000
MAX_WINDOW_COUNT = 1_000_000_000  # a reading per millisecond for ~11 days: beyond any real window
MAX_SEQ = 2**63 - 1
MAX_PERIOD_SECONDS = 86_400
MAX_EVENT_TEXT_CHARS = 64
# 2000-01-01 .. 2100-01-01 in ms: anything outside is a broken clock, not data.
MIN_TIMESTAMP_MS = 946_684_800_000
MAX_TIMESTAMP_MS = 4_102_444_800_000
# Relative slack when checking min <= mean <= max: float sums round.
MEAN_TOLERANCE = 1e-9

EventValue = float | int | str | bool


def _fail(where: str, problem: str) -> WireError:
    return WireError(f"{where}: {problem}")


def _check_int(where: str, value: object, low: int, high: int) -> int:
    if type(value) is not int:
        raise _fail(where, f"expected an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise _fail(where, f"{value} is outside [{low}, {high}]")
    return value


def _check_float(where: str, value: object) -> float:
    if type(value) is int:
        value = float(value)
    if type(value) is not float:
        raise _fail(where, f"expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise _fail(where, f"{value} is not finite")
    return value


def _check_timestamp(where: str, value: object) -> int:
    return _check_int(where, value, MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS)


@dataclass(frozen=True, slots=True, init=False, repr=False)
class Window(Aggregate):
    """An `Aggregate` of one metric over [start_ms, start_ms + period_s * 1000).

    An aggregate itself rather than holding one, so a decoded window is one object.
    Built in wire order: Window(metric, start_ms, period_s, count, sum, min, max,
    first, last, sumsq, rejected=0).
    """

    metric: str
    start_ms: int
    period_s: int

    def __init__(
        self,
        metric: str,
        start_ms: int,
        period_s: int,
        count: int,
        sum: float,
        min: float,
        max: float,
        first: float,
        last: float,
        sumsq: float,
        rejected: int = 0,
    ) -> None:
        put = object.__setattr__  # frozen: what a dataclass __init__ does, in wire order
        put(self, "metric", metric)
        put(self, "start_ms", start_ms)
        put(self, "period_s", period_s)
        put(self, "count", count)
        put(self, "sum", sum)
        put(self, "min", min)
        put(self, "max", max)
        put(self, "first", first)
        put(self, "last", last)
        put(self, "sumsq", sumsq)
        put(self, "rejected", rejected)
        self._check()

    def _check(self) -> None:
        where = f"window {self.metric!r}"
        if not is_metric_name(self.metric):
            raise _fail("window.metric", f"{self.metric!r}: {METRIC_NAME_RULE}")
        _check_timestamp(f"{where}.start_ms", self.start_ms)
        _check_int(f"{where}.period_s", self.period_s, 1, MAX_PERIOD_SECONDS)
        if self.start_ms % (self.period_s * 1000):
            raise _fail(f"{where}.start_ms", "not aligned to a multiple of the period")
        _check_int(f"{where}.count", self.count, 1, MAX_WINDOW_COUNT)
        _check_int(f"{where}.rejected", self.rejected, 0, MAX_WINDOW_COUNT)
        for name in ("sum", "min", "max", "first", "last", "sumsq"):
            object.__setattr__(self, name, _check_float(f"{where}.{name}", getattr(self, name)))
        if not self.min <= self.max:
            raise _fail(where, f"min {self.min} > max {self.max}")
        for name in ("first", "last"):
            if not self.min <= getattr(self, name) <= self.max:
                raise _fail(where, f"{name} {getattr(self, name)} outside [min, max]")
        slack = MEAN_TOLERANCE * max(1.0, abs(self.min), abs(self.max))
        mean = self.sum / self.count
        if not self.min - slack <= mean <= self.max + slack:
            raise _fail(where, f"sum/count {mean} outside [min, max]")
        if self.sumsq < 0:
            raise _fail(f"{where}.sumsq", "negative sum of squares")

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in WINDOW_FIELDS)
        return f"Window({inner})"

    @property
    def end_ms(self) -> int:
        """Exclusive end of the window."""
        return self.start_ms + self.period_s * 1000


# The wire row of a window, and the order `Window` takes its fields in.
WINDOW_FIELDS: Final = ("metric", "start_ms", "period_s", *AGGREGATE_FIELDS)
if Window.__slots__ != WINDOW_FIELDS[:3]:  # _Unchecked mirrors the slots Window adds
    raise RuntimeError("millrace.wire.batch: update _Unchecked and windows_from_rows")
# Names that passed METRIC_NAME_PATTERN; bounded so a client inventing names costs only time.
_KNOWN_METRICS_MAX: Final = 10_000
_known_metrics: set[str] = set()


# Typed Any: _Unchecked writes the frozen fields, on purpose, before it becomes a Window.
_UncheckedBase: Any = Aggregate


class _Unchecked(_UncheckedBase):
    """Window's slot layout without its checks: becomes a Window once its row is checked."""

    __slots__ = WINDOW_FIELDS[:3]
    # Not frozen while it is filled. Both, or CPython keeps the slow Python-level setattr.
    __setattr__ = object.__setattr__
    __delattr__ = object.__delattr__


def windows_from_rows(rows: Sequence[Any]) -> tuple[Window, ...] | None:
    """Windows from decoded wire rows, or None when any row is not plainly valid.

    The decoder's fast path: one loop does every check of `Window.__post_init__` plus the
    batch's duplicate-key check and fills the slots directly (`Window(*row)` costs 5 us a
    row). It never words a problem: on None the caller takes the strict path, which finds
    and reports the first problem exactly as before. Only rows whose numbers are already
    floats pass here (the strict path converts integers); keep the two in step.
    """
    known = _known_metrics
    new = object.__new__
    out: list[Window] = []
    append = out.append
    keys: set[tuple[str, int, int]] = set()
    add_key = keys.add
    for row in rows:
        if (type(row) is not tuple and type(row) is not list) or len(row) != 11:
            return None
        metric, start, period, count, total, low, high, first, last, sumsq, rejected = row
        if not (
            type(metric) is str
            and type(start) is int
            and type(period) is int
            and type(count) is int
            and type(rejected) is int
            and type(total) is float
            and type(low) is float
            and type(high) is float
            and type(first) is float
            and type(last) is float
            and type(sumsq) is float
            and MIN_TIMESTAMP_MS <= start <= MAX_TIMESTAMP_MS
            and 1 <= period <= MAX_PERIOD_SECONDS
            and 1 <= count <= MAX_WINDOW_COUNT
            and 0 <= rejected <= MAX_WINDOW_COUNT
            and not start % (period * 1000)
            # x - x is 0.0 for every finite x and NaN for NaN and the infinities.
            and (total - total)
            + (low - low)
            + (high - high)
            + (first - first)
            + (last - last)
            + (sumsq - sumsq)
            == 0.0
            and low <= first <= high
            and low <= last <= high
            and sumsq >= 0.0
        ):
            return None
        mean = total / count
        if not low <= mean <= high:  # inside [min, max] is inside it with the slack too
            # max(1.0, abs(low), abs(high)) as in _check, given low <= high.
            scale = high if high > -low else -low
            slack = MEAN_TOLERANCE * (scale if scale > 1.0 else 1.0)
            if not low - slack <= mean <= high + slack:
                return None
        if metric not in known:
            if not is_metric_name(metric):
                return None
            if len(known) < _KNOWN_METRICS_MAX:
                known.add(metric)
        add_key((metric, start, period))
        # The slots filled here rather than by a call: a fifth of this loop's cost less.
        w: Any = new(_Unchecked)
        w.metric = metric
        w.start_ms = start
        w.period_s = period
        w.count = count
        w.sum = total
        w.min = low
        w.max = high
        w.first = first
        w.last = last
        w.sumsq = sumsq
        w.rejected = rejected
        w.__class__ = Window  # same slots, so CPython allows it; TypeError -> strict path
        append(w)
    if len(keys) != len(out):
        return None
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Event:
    """A state or enum signal's change at `ts_ms`."""

    metric: str
    ts_ms: int
    value: EventValue

    def __post_init__(self) -> None:
        if not is_metric_name(self.metric):
            raise _fail("event.metric", f"{self.metric!r}: {METRIC_NAME_RULE}")
        _check_timestamp(f"event {self.metric!r}.ts_ms", self.ts_ms)
        value = self.value
        if isinstance(value, str):
            if len(value) > MAX_EVENT_TEXT_CHARS:
                raise _fail(f"event {self.metric!r}.value", "text longer than 64 chars")
        elif type(value) is not bool:
            _check_float(f"event {self.metric!r}.value", value)


@dataclass(frozen=True, slots=True)
class Batch:
    """One flush of an edge agent: closed windows and events, keyed by (device, boot_id, seq)."""

    device: str
    boot_id: str
    seq: int
    sent_at_ms: int
    windows: tuple[Window, ...] = ()
    events: tuple[Event, ...] = ()
    clock_synced: bool = True
    dropped: int = 0
    rejected: int = 0
    version: int = field(default=SCHEMA_VERSION)

    def __post_init__(self) -> None:
        self._check(windows_checked=False)

    @classmethod
    def _with_checked_windows(
        cls,
        *,
        device: str,
        boot_id: str,
        seq: int,
        sent_at_ms: int,
        windows: tuple[Window, ...],
        events: tuple[Event, ...],
        clock_synced: bool,
        dropped: int,
        rejected: int,
        version: int,
    ) -> Batch:
        """A batch whose `windows` came from `windows_from_rows` (which did the per-window
        checks of `__post_init__`); every other check still runs. For the decoder only."""
        batch = object.__new__(cls)
        for name, value in (
            ("device", device),
            ("boot_id", boot_id),
            ("seq", seq),
            ("sent_at_ms", sent_at_ms),
            ("windows", windows),
            ("events", events),
            ("clock_synced", clock_synced),
            ("dropped", dropped),
            ("rejected", rejected),
            ("version", version),
        ):
            object.__setattr__(batch, name, value)
        batch._check(windows_checked=True)
        return batch

    def _check(self, *, windows_checked: bool) -> None:
        if type(self.version) is not int or self.version not in SUPPORTED_VERSIONS:
            raise _fail("v", f"unknown schema version {self.version!r}")
        if not is_device_id(self.device):
            raise _fail("device", f"{self.device!r} is not a device id ({DEVICE_ID_RULE})")
        boot_id = self.boot_id
        if not (
            isinstance(boot_id, str)
            and len(boot_id) == 32
            and all(c in "0123456789abcdef" for c in boot_id)
        ):
            raise _fail("boot_id", "expected 32 lowercase hex characters")
        _check_int("seq", self.seq, 0, MAX_SEQ)
        _check_timestamp("sent_at_ms", self.sent_at_ms)
        _check_int("dropped", self.dropped, 0, MAX_SEQ)
        _check_int("rejected", self.rejected, 0, MAX_SEQ)
        if type(self.clock_synced) is not bool:
            raise _fail("clock_synced", "expected true or false")
        if len(self.windows) > MAX_WINDOWS_PER_BATCH:
            raise _fail("windows", f"more than {MAX_WINDOWS_PER_BATCH} windows")
        if len(self.events) > MAX_EVENTS_PER_BATCH:
            raise _fail("events", f"more than {MAX_EVENTS_PER_BATCH} events")
        if not windows_checked and not all(type(w) is Window for w in self.windows):
            raise _fail("windows", "every entry must be a Window")
        if not all(type(e) is Event for e in self.events):
            raise _fail("events", "every entry must be an Event")
        if windows_checked:
            return
        keys = {(w.metric, w.start_ms, w.period_s) for w in self.windows}
        if len(keys) != len(self.windows):
            raise _fail("windows", "the same (metric, start, period) appears twice")
