"""Pipeline: calibration, validity, deadband, change events, failures as rejected."""

from __future__ import annotations

import math
from pathlib import Path

from millrace.edge.config import SignalConfig, parse_config
from millrace.edge.pipeline import Pipeline, event_value

BASE_MS = 1_699_999_980_000

CONFIG = """
device_id = "dev-a"
[broker]
host = "localhost"
ca = "ca.crt"
cert = "c.crt"
key = "c.key"
[windows]
period_s = 10
grace_s = 1
[outbox]
path = "o.sqlite"
[state]
dir = "s"
[[signals]]
metric = "temp"
driver = "sim"
scale = 0.1
offset = -5
valid_min = 0
valid_max = 100
[[signals]]
metric = "running"
driver = "sim"
kind = "state"
[[signals]]
metric = "mode"
driver = "sim"
kind = "enum"
states = { "0" = "idle", "2" = "run" }
[[signals]]
metric = "level"
driver = "sim"
deadband = 0.5
"""


def make() -> tuple[Pipeline, tuple[SignalConfig, ...]]:
    config = parse_config(CONFIG, base=Path("/"))
    return Pipeline(config.signals, periods_s=[10], grace_ms=1000), config.signals


def test_calibration_and_range() -> None:
    pipe, _ = make()
    pipe.reading(0, BASE_MS + 1, 250)  # 250 * 0.1 - 5 = 20
    pipe.reading(0, BASE_MS + 2, 2000)  # 195: above valid_max -> rejected
    pipe.reading(0, BASE_MS + 3, float("nan"))
    pipe.reading(0, BASE_MS + 4, "garbage")
    pipe.failure(0, BASE_MS + 5, "timeout")
    drained = pipe.drain(BASE_MS + 20_000)
    (window,) = drained.windows
    assert (window.metric, window.count, window.sum, window.rejected) == ("temp", 1, 20.0, 4)
    assert pipe.rejected_total == 4 and pipe.readings_total == 5
    assert pipe.error_counts() == {"temp": 1}
    assert drained.rejected == 0


def test_deadband_holds_the_previous_value_but_counts_every_reading() -> None:
    pipe, _ = make()
    for i, value in enumerate([10.0, 10.3, 10.4, 11.0, 10.8]):
        pipe.reading(3, BASE_MS + i, value)
    (window,) = pipe.drain(BASE_MS + 20_000).windows
    assert window.count == 5
    # 10.3 and 10.4 are within 0.5 of 10.0, 10.8 within 0.5 of 11.0: held.
    assert (window.first, window.last, window.max) == (10.0, 11.0, 11.0)
    assert window.sum == 10.0 + 10.0 + 10.0 + 11.0 + 11.0


def test_state_and_enum_signals_send_events_on_change_only() -> None:
    pipe, _ = make()
    for i, raw in enumerate([0, 0, 1, True, "OFF", 0]):
        pipe.reading(1, BASE_MS + i, raw)
    for i, raw in enumerate([0, 0, 2, 2.0, 7, "2"]):
        pipe.reading(2, BASE_MS + 10 + i, raw)
    events = pipe.drain(BASE_MS + 1).events
    running = [(e.ts_ms - BASE_MS, e.value) for e in events if e.metric == "running"]
    mode = [(e.ts_ms - BASE_MS, e.value) for e in events if e.metric == "mode"]
    assert running == [(0, False), (2, True), (4, False)]
    assert mode == [(10, "idle"), (12, "run"), (14, 7), (15, "run")]
    assert pipe.pending_events == 0


def test_unusable_event_values_and_failures_are_counted_as_batch_rejects() -> None:
    pipe, _ = make()
    pipe.reading(1, BASE_MS, "maybe")
    pipe.failure(2, BASE_MS, "CRC")
    drained = pipe.drain(BASE_MS + 1)
    assert drained.events == () and drained.rejected == 2
    assert pipe.error_counts() == {"mode": 1}
    assert not pipe.drain(BASE_MS + 2)


def test_late_readings_are_rejected_in_the_totals() -> None:
    pipe, _ = make()
    pipe.reading(0, BASE_MS + 1, 100)
    pipe.drain(BASE_MS + 11_000)
    pipe.reading(0, BASE_MS + 2, 100)  # its window has closed
    drained = pipe.drain(BASE_MS + 12_000)
    assert drained.rejected == 1 and pipe.rejected_total == 1


def test_event_value_conversions() -> None:
    _, signals = make()
    state, enum = signals[1], signals[2]
    assert event_value(state, "on") is True and event_value(state, 0.0) is False
    assert event_value(state, math.nan) is None and event_value(state, "x") is None
    assert event_value(enum, 0) == "idle" and event_value(enum, 2.5) == 2.5
    assert event_value(enum, "fault") == "fault" and event_value(enum, "x" * 65) is None
