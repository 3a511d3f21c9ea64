"""Chart helpers that need no browser: the CSV export of the device page, the time axes."""

from __future__ import annotations

import csv
import io
from zoneinfo import ZoneInfo

import pandas as pd
import pytest

from millrace.dashboards.charts import (
    CSV_COLUMNS,
    TIME_AXIS_FORMAT,
    TIME_AXIS_LABEL_EXPR,
    band_chart,
    lines,
    series_csv,
    stacked_bars,
)


def _part(metric: str, unit: str | None, times: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "ts": pd.to_datetime(times, utc=True),
            "mean": [1.5] * len(times),
            "min": [1.0] * len(times),
            "max": [2.0] * len(times),
            "count": [10] * len(times),
            "rejected": [0] * len(times),
            "windows": [1] * len(times),
        }
    ).assign(device="press-01", metric=metric, unit=unit, resolution="10 s windows (raw)")


def test_csv_has_local_times_with_offsets_and_every_point() -> None:
    parts = [
        _part("temperature", "°C", ["2026-01-15T11:00:00Z", "2026-01-15T11:00:10Z"]),
        _part("pressure", None, ["2026-07-15T11:00:00Z"]),
    ]
    rows = list(csv.DictReader(io.StringIO(series_csv(parts, ZoneInfo("Europe/Berlin")).decode())))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["time"] for r in rows] == [
        "2026-01-15T12:00:00+01:00",
        "2026-01-15T12:00:10+01:00",
        "2026-07-15T13:00:00+02:00",  # summer time: the offset says which
    ]
    assert [r["metric"] for r in rows] == ["temperature", "temperature", "pressure"]
    assert rows[0]["unit"] == "°C"
    assert rows[2]["unit"] == ""
    assert (rows[0]["mean"], rows[0]["min"], rows[0]["max"], rows[0]["count"]) == (
        "1.5",
        "1.0",
        "2.0",
        "10",
    )


HOSTILE_CELLS = (
    '=HYPERLINK("http://evil.example","x")',
    "+1+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(A1)",
)


@pytest.mark.security
@pytest.mark.parametrize("unit", [*HOSTILE_CELLS, "\tx", "\rx"])
def test_csv_export_neutralises_formula_cells(unit: str) -> None:
    part = _part("temperature", unit, ["2026-01-15T11:00:00Z"]).assign(mean=[-3.5], min=[-4.0])
    rows = list(csv.DictReader(io.StringIO(series_csv([part], ZoneInfo("UTC")).decode())))
    assert rows[0]["unit"] == "'" + unit
    # Numbers stay numbers: a negative mean is a value, not a formula.
    assert (rows[0]["mean"], rows[0]["min"]) == ("-3.5", "-4.0")


@pytest.mark.parametrize("unit", ["°C", "kW", "m³/h", "x=1", "1-2"])
def test_csv_export_leaves_plain_cells_alone(unit: str) -> None:
    part = _part("temperature", unit, ["2026-01-15T11:00:00Z"])
    rows = list(csv.DictReader(io.StringIO(series_csv([part], ZoneInfo("UTC")).decode())))
    assert rows[0]["unit"] == unit


# -- time axes: 24-hour clock, the date where it changes


def _time_frame() -> pd.DataFrame:
    ts = pd.date_range("2026-12-05 22:00", "2026-12-06 02:00", freq="10min")
    n = len(ts)
    return pd.DataFrame(
        {"ts": ts, "mean": [1.0] * n, "min": [0.5] * n, "max": [1.5] * n, "count": [10] * n}
    ).assign(outbox_batches=1, code="x", device="d")


def _time_charts() -> dict[str, dict[str, object]]:
    frame = _time_frame()
    return {
        "band_chart": band_chart(frame, metric="t", unit="°C", tz_name="Europe/Berlin").to_dict(),
        "lines": lines(frame, y="outbox_batches", y_title="b", tz_name="UTC").to_dict(),
        "stacked_bars": stacked_bars(
            frame, y="count", y_title="n", tz_name="UTC", color="code", color_title="c"
        ).to_dict(),
    }


def _x_axes(spec: object) -> list[dict[str, object]]:
    """Every axis of an x encoding on a temporal field, anywhere in a Vega-Lite spec."""
    found: list[dict[str, object]] = []
    if isinstance(spec, dict):
        x = spec.get("encoding", {}).get("x") if isinstance(spec.get("encoding"), dict) else None
        if isinstance(x, dict) and x.get("type") == "temporal" and isinstance(x.get("axis"), dict):
            found.append(x["axis"])
        for value in spec.values():
            found += _x_axes(value)
    elif isinstance(spec, list):
        for value in spec:
            found += _x_axes(value)
    return found


def _time_formats(spec: object) -> list[str]:
    """Every d3 time format string in a spec (axis formats, tooltip formats, label expressions)."""
    if isinstance(spec, dict):
        return [f for v in spec.values() for f in _time_formats(v)]
    if isinstance(spec, list):
        return [f for v in spec for f in _time_formats(v)]
    return [spec] if isinstance(spec, str) and "%" in spec else []


@pytest.mark.parametrize("name", ["band_chart", "lines", "stacked_bars"])
def test_time_axes_use_a_24_hour_clock_with_the_date_where_it_changes(name: str) -> None:
    spec = _time_charts()[name]
    axes = _x_axes(spec)
    assert axes, "no temporal x axis found"
    for axis in axes:
        # Vega's default multi-format writes "12:25" for 00:25 and "03 PM" for 15:00.
        assert axis["format"] == TIME_AXIS_FORMAT
        assert axis["labelExpr"] == TIME_AXIS_LABEL_EXPR
    assert TIME_AXIS_FORMAT["hours"] == TIME_AXIS_FORMAT["minutes"] == "%H:%M"
    assert TIME_AXIS_FORMAT["seconds"] == "%H:%M:%S"
    # A tick at midnight shows the date: day and month.
    assert {"%-d", "%b"} <= set(TIME_AXIS_FORMAT["date"].split())
    assert "timeFormat(datum.value, '%-d %b %Y')" in TIME_AXIS_LABEL_EXPR
    # No 12-hour clock or AM/PM anywhere in the chart, tooltips included.
    for fmt in _time_formats(spec):
        assert "%I" not in fmt and "%p" not in fmt and "%l" not in fmt, fmt
