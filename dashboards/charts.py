"""Altair charts with the dashboard's conventions: local wall-clock x axis named
with its time zone (24-hour clock, the date where it changes), units in the y
title, min-max band under the mean.

Inputs are DataFrames whose time column already holds naive local times
(ui.to_local), so the browser's own time zone never shifts what is drawn.
"""

from __future__ import annotations

import csv
from datetime import datetime
from typing import Final
from zoneinfo import ZoneInfo

import altair as alt
import pandas as pd

CHART_HEIGHT_PX: Final = 280
BAND_OPACITY: Final = 0.25
STATUS_COLORS: Final = {"online": "#2e7d32", "stale": "#f9a825", "offline": "#c62828"}
SEVERITY_COLORS: Final = {"critical": "#c62828", "warning": "#ef6c00", "info": "#1565c0"}
MEAN_COLOR: Final = "#1565c0"
EVENT_COLOR: Final = "#6a1b9a"


# Tick labels of every time axis, by the coarsest unit a tick falls on (Vega's time
# multi-format): times of day on the 24-hour clock, the date at midnight where the day
# changes. Vega's default would write "12:25" for 00:25 and "03 PM" for 15:00.
TIME_AXIS_FORMAT: Final = {
    "year": "%Y",
    "quarter": "%b %Y",
    "month": "%b %Y",
    "week": "%-d %b",
    "date": "%-d %b",
    "hours": "%H:%M",
    "minutes": "%H:%M",
    "seconds": "%H:%M:%S",
    "milliseconds": "%H:%M:%S.%L",
}
FIRST_TICK_DATE_FORMAT: Final = "%-d %b %Y"
# The first tick names its date under the time, so a range inside one day still says which
# day it is (a first tick at midnight already is the date).
TIME_AXIS_LABEL_EXPR: Final = (
    "datum.index == 0 && "
    "hours(datum.value) + minutes(datum.value) + seconds(datum.value) > 0"
    f" ? [datum.label, timeFormat(datum.value, '{FIRST_TICK_DATE_FORMAT}')] : datum.label"
)


Domain = tuple[datetime, datetime] | None


def _local_datetime(value: datetime) -> alt.DateTime:
    # Vega reads DateTime objects (like the naive ISO strings of the data) as wall time.
    return alt.DateTime(
        year=value.year,
        month=value.month,
        date=value.day,
        hours=value.hour,
        minutes=value.minute,
        seconds=value.second,
    )


def _time_axis(tz_name: str, domain: Domain = None, column: str = "ts") -> alt.X:
    """x = wall-clock time of the configured zone; `domain` (naive local) pins the range."""
    scale = (
        alt.Scale(domain=[_local_datetime(domain[0]), _local_datetime(domain[1])])
        if domain
        else alt.Undefined
    )
    axis = alt.Axis(labelOverlap=True, format=TIME_AXIS_FORMAT, labelExpr=TIME_AXIS_LABEL_EXPR)
    return alt.X(f"{column}:T", title=f"Time ({tz_name})", axis=axis, scale=scale)


def _y_title(name: str, unit: str | None) -> str:
    return f"{name} ({unit})" if unit else name


def band_chart(
    frame: pd.DataFrame,
    *,
    metric: str,
    unit: str | None,
    tz_name: str,
    events: pd.DataFrame | None = None,
    domain: Domain = None,
    height: int = CHART_HEIGHT_PX,
) -> alt.LayerChart:
    """Mean line over a shaded min-max band; events as vertical markers."""
    y_title = _y_title(metric, unit)
    base = alt.Chart(frame).encode(x=_time_axis(tz_name, domain))
    tooltip = [
        alt.Tooltip("ts:T", title="Time", format="%Y-%m-%d %H:%M:%S"),
        alt.Tooltip("mean:Q", title="Mean", format=",.4~f"),
        alt.Tooltip("min:Q", title="Min", format=",.4~f"),
        alt.Tooltip("max:Q", title="Max", format=",.4~f"),
        alt.Tooltip("count:Q", title="Readings", format=","),
    ]
    band = base.mark_area(opacity=BAND_OPACITY, color=MEAN_COLOR).encode(
        y=alt.Y("min:Q", title=y_title, scale=alt.Scale(zero=False)), y2="max:Q"
    )
    line = base.mark_line(color=MEAN_COLOR, strokeWidth=1.8).encode(
        y=alt.Y("mean:Q", title=y_title), tooltip=tooltip
    )
    layers: list[alt.Chart] = [band, line]
    if len(frame) <= 60:  # few points: show each one, so single points are visible
        layers.append(
            base.mark_point(color=MEAN_COLOR, filled=True, size=30).encode(
                y="mean:Q", tooltip=tooltip
            )
        )
    if events is not None and not events.empty:
        layers.append(
            alt.Chart(events)
            .mark_rule(color=EVENT_COLOR, strokeDash=[4, 3], opacity=0.7)
            .encode(
                x="ts:T",
                tooltip=[
                    alt.Tooltip("ts:T", title="Time", format="%Y-%m-%d %H:%M:%S"),
                    alt.Tooltip("metric:N", title="Event"),
                    alt.Tooltip("shown:N", title="Value"),
                ],
            )
        )
    return alt.layer(*layers).properties(height=height)  # type: ignore[return-value]


def lines(
    frame: pd.DataFrame,
    *,
    y: str,
    y_title: str,
    tz_name: str,
    color: str | None = None,
    color_title: str | None = None,
    domain: Domain = None,
    height: int = CHART_HEIGHT_PX,
) -> alt.Chart:
    """One or more lines over time (`color` splits series)."""
    encoding: dict[str, object] = {
        "x": _time_axis(tz_name, domain),
        "y": alt.Y(f"{y}:Q", title=y_title),
        "tooltip": [
            alt.Tooltip("ts:T", title="Time", format="%Y-%m-%d %H:%M:%S"),
            *([alt.Tooltip(f"{color}:N", title=color_title or color)] if color else []),
            alt.Tooltip(f"{y}:Q", title=y_title, format=",.3~f"),
        ],
    }
    if color:
        encoding["color"] = alt.Color(f"{color}:N", title=color_title or color)
    chart = alt.Chart(frame).mark_line(point=len(frame) <= 60, interpolate="step-after")
    return chart.encode(**encoding).properties(height=height)


def stacked_bars(
    frame: pd.DataFrame,
    *,
    y: str,
    y_title: str,
    tz_name: str,
    color: str,
    color_title: str,
    domain: Domain = None,
    height: int = CHART_HEIGHT_PX,
) -> alt.Chart:
    """Counts per time bucket, stacked by a category (e.g. dead letters by reason)."""
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=_time_axis(tz_name, domain),
            y=alt.Y(f"{y}:Q", title=y_title, stack="zero"),
            color=alt.Color(f"{color}:N", title=color_title),
            tooltip=[
                alt.Tooltip("ts:T", title="Time", format="%Y-%m-%d %H:%M"),
                alt.Tooltip(f"{color}:N", title=color_title),
                alt.Tooltip(f"{y}:Q", title=y_title, format=","),
            ],
        )
        .properties(height=height)
    )


def category_bars(
    frame: pd.DataFrame,
    *,
    category: str,
    value: str,
    value_title: str,
    colors: dict[str, str] | None = None,
    height: int = 180,
) -> alt.Chart:
    """Horizontal bars, one per category (statuses, reason codes)."""
    color = (
        alt.Color(
            f"{category}:N",
            scale=alt.Scale(domain=list(colors), range=list(colors.values())),
            legend=None,
        )
        if colors
        else alt.Color(f"{category}:N", legend=None)
    )
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            y=alt.Y(f"{category}:N", title=None, sort="-x"),
            x=alt.X(f"{value}:Q", title=value_title, axis=alt.Axis(format="d", tickMinStep=1)),
            color=color,
            tooltip=[f"{category}:N", alt.Tooltip(f"{value}:Q", format=",")],
        )
        .properties(height=height)
    )


CSV_COLUMNS: Final = (
    "time",
    "device",
    "metric",
    "unit",
    "resolution",
    "mean",
    "min",
    "max",
    "count",
    "rejected",
)


# OWASP CSV injection rule: a cell starting with one of these is a formula to a spreadsheet.
FORMULA_PREFIXES: Final = ("=", "+", "-", "@", "\t", "\r")


def neutralise_cell(value: object) -> object:
    """A text cell a spreadsheet would run as a formula, prefixed with a quote; others as is."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def safe_csv(frame: pd.DataFrame) -> bytes:
    """`frame` as UTF-8 CSV with every text cell neutralised: the one way the dashboard exports."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object or pd.api.types.is_string_dtype(out[column]):
            out[column] = out[column].map(neutralise_cell)
    out.columns = [str(neutralise_cell(str(c))) for c in out.columns]
    # Every text cell quoted: pandas leaves a bare CR unquoted, which starts a new row.
    return out.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC).encode("utf-8")


def series_csv(parts: list[pd.DataFrame], tz: ZoneInfo) -> bytes:
    """The drawn points as CSV: ISO times in `tz` with their UTC offset, one row per point.

    Each part is a queries.series() frame plus device, metric, unit and resolution columns.
    """
    frame = pd.concat(parts, ignore_index=True)
    frame["time"] = [t.isoformat() for t in pd.to_datetime(frame["ts"], utc=True).dt.tz_convert(tz)]
    return safe_csv(frame[list(CSV_COLUMNS)])
