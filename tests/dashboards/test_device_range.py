"""The Device page opens on a range that fits the data: a plant that started two minutes
ago shows those two minutes across the chart, not a sliver at the right edge of 6 h."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from streamlit.testing.v1 import AppTest

from millrace.dashboards.ui import fit_range_s, span_text
from tests.dashboards.conftest import PASSWORDS, Plant, write_config

APP = Path(__file__).resolve().parents[2] / "dashboards" / "app.py"
NOW = datetime(2026, 12, 6, 5, 0, tzinfo=UTC)
SIX_H = 6 * 3600


@pytest.mark.parametrize(
    ("age", "expected_s"),
    [
        (timedelta(seconds=30), 120),  # the minimum
        (timedelta(minutes=2, seconds=1), 130),  # 10 s steps under 10 min
        (timedelta(minutes=47, seconds=5), 48 * 60),  # whole minutes above
        (timedelta(hours=5, minutes=59, seconds=30), SIX_H),
        (timedelta(days=400), SIX_H),  # the maximum
    ],
)
def test_fit_range_starts_at_the_oldest_data(age: timedelta, expected_s: int) -> None:
    got = fit_range_s(NOW - age, NOW, minimum_s=120, maximum_s=SIX_H)
    assert got == expected_s
    assert got >= min(age.total_seconds(), SIX_H)  # the oldest data is inside the range


def test_fit_range_without_data_is_the_maximum() -> None:
    assert fit_range_s(None, NOW, minimum_s=120, maximum_s=SIX_H) == SIX_H


def test_span_text() -> None:
    shown = [span_text(s) for s in (0, 130, 120, 2880, 10_860, 10_870, SIX_H)]
    assert shown == ["0 s", "2 min 10 s", "2 min", "48 min", "3 h 1 min", "3 h 1 min 10 s", "6 h"]


def _domain(spec: object) -> list[dict[str, int]] | None:
    if isinstance(spec, dict):
        scale = spec.get("scale")
        if isinstance(scale, dict) and "domain" in scale:
            return scale["domain"]  # type: ignore[no-any-return]
        values = list(spec.values())
    elif isinstance(spec, list):
        values = spec
    else:
        return None
    return next((d for v in values if (d := _domain(v)) is not None), None)


def _wall_time(d: dict[str, int]) -> datetime:
    return datetime(d["year"], d["month"], d["date"], d["hours"], d["minutes"], d["seconds"])


@pytest.mark.integration
def test_device_page_opens_on_the_span_of_a_young_plants_data(
    plant_factory: Callable[..., Plant],
    users_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    young = plant_factory(hours=2 / 60)  # the plant started two minutes ago
    config = write_config(tmp_path, dsn=young.dash_dsn, users=users_file)
    monkeypatch.setenv("MILLRACE_DASH_CONFIG", str(config))
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.run()
    at.text_input[0].set_value("vera")
    at.text_input[1].set_value(PASSWORDS["vera"][1])
    at.button[0].click().run()
    at.switch_page("views/device.py").run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert at.segmented_control(key="device_range").value == "Fit"
    assert any("Range fitted to the data" in c.value for c in at.caption)
    charts = at.get("vega_lite_chart")
    assert charts
    berlin = ZoneInfo("Europe/Berlin")
    first = young.truth.start.astimezone(berlin).replace(tzinfo=None)
    for chart in charts:
        domain = _domain(json.loads(chart.proto.spec))
        assert domain is not None
        start, end = _wall_time(domain[0]), _wall_time(domain[1])
        assert start <= first, (start, first)
        # Two minutes of data fill most of the chart: the range is minutes, not hours.
        assert end - start <= timedelta(minutes=4), (start, end)
