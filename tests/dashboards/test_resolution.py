"""Chart resolution from the time range: about a point per pixel, from the right table."""

from __future__ import annotations

import pytest

from millrace.dashboards.resolution import (
    DAY_SECONDS,
    HOUR_SECONDS,
    TARGET_POINTS,
    Resolution,
    candidates,
    format_seconds,
    pick_resolution,
)


@pytest.mark.parametrize(
    ("range_s", "period_s", "expected"),
    [
        (3600, 10, Resolution("windows", 10, 10)),
        (3 * HOUR_SECONDS + 1, 10, Resolution("windows", 10, 10)),  # 1080 points: still raw
        (4 * HOUR_SECONDS, 10, Resolution("windows", 30, 10)),  # 15 s is no multiple of 10 s
        (4 * HOUR_SECONDS, 5, Resolution("windows", 15, 5)),
        (6 * HOUR_SECONDS, 10, Resolution("windows", 30, 10)),
        (DAY_SECONDS, 10, Resolution("windows", 120, 10)),
        (DAY_SECONDS, 60, Resolution("windows", 120, 60)),
        (7 * DAY_SECONDS, 10, Resolution("windows", 600, 10)),
        (30 * DAY_SECONDS, 10, Resolution("hourly", 3600, 10)),
        (365 * DAY_SECONDS, 1, Resolution("hourly", 12 * 3600, 1)),
        (3 * 365 * DAY_SECONDS, 10, Resolution("daily", DAY_SECONDS, 10)),
        (50 * 365 * DAY_SECONDS, 10, Resolution("daily", 7 * DAY_SECONDS, 10)),
        (3600, 3600, Resolution("windows", 3600, 3600)),
    ],
)
def test_pick_resolution(range_s: int, period_s: int, expected: Resolution) -> None:
    assert pick_resolution(range_s=range_s, period_s=period_s) == expected


@pytest.mark.parametrize("period_s", [1, 2, 5, 10, 15, 30, 60, 300, 900, 3600])
def test_every_choice_is_a_multiple_of_the_period_and_fits_the_budget(period_s: int) -> None:
    for range_s in (60, 3600, 86_400, 7 * 86_400, 90 * 86_400, 365 * 86_400):
        chosen = pick_resolution(range_s=range_s, period_s=period_s)
        assert chosen.bucket_s % period_s == 0
        assert range_s / chosen.bucket_s <= TARGET_POINTS
        finer = [c for c in candidates(period_s) if c.bucket_s < chosen.bucket_s]
        assert all(range_s / c.bucket_s > TARGET_POINTS for c in finer)  # the finest that fits


def test_window_buckets_stay_below_an_hour() -> None:
    sources = {c.bucket_s: c.source for c in candidates(10)}
    assert all(s == "windows" for b, s in sources.items() if b < HOUR_SECONDS)
    assert all(s != "windows" for b, s in sources.items() if b >= HOUR_SECONDS)


@pytest.mark.parametrize(
    ("resolution", "label"),
    [
        (Resolution("windows", 10, 10), "10 s windows (raw)"),
        (Resolution("windows", 300, 10), "5 min buckets of 10 s windows"),
        (Resolution("hourly", 3600, 10), "hourly rollups"),
        (Resolution("hourly", 21600, 10), "6 h buckets of hourly rollups"),
        (Resolution("daily", 86400, 10), "daily rollups (UTC days)"),
        (Resolution("daily", 7 * 86400, 10), "7 d buckets of daily rollups (UTC days)"),
    ],
)
def test_labels_say_what_a_point_is(resolution: Resolution, label: str) -> None:
    assert resolution.label == label


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (1, 90, 120, 3600, 5400, 86400)] == [
        "1 s",
        "90 s",
        "2 min",
        "1 h",
        "90 min",
        "1 d",
    ]


def test_period_must_be_positive() -> None:
    with pytest.raises(ValueError):
        pick_resolution(range_s=3600, period_s=0)
