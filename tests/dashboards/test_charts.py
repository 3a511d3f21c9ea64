"""Chart helpers that need no browser: the CSV export of the device page."""

from __future__ import annotations

import csv
import io
from zoneinfo import ZoneInfo

import pandas as pd
import pytest

from millrace.dashboards.charts import CSV_COLUMNS, series_csv


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
