"""Which stored table and bucket width a chart reads, chosen from its time range.

A chart should hold about one point per pixel: more points cost the database
and the browser without showing anything new, fewer hide detail. Raw windows
serve short ranges, buckets of windows the middle, hourly and daily rollups
the long ones. Pure, so the choice is unit-tested without a database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Source = Literal["windows", "hourly", "daily"]

HOUR_SECONDS: Final = 3600
DAY_SECONDS: Final = 86_400
# About the plot width of a chart on a wall screen or a laptop, in pixels.
TARGET_POINTS: Final = 1200
# Bucket widths that read well on an axis; each source only uses multiples of its own unit.
_WINDOW_BUCKETS_S: Final = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800)
_HOURLY_BUCKETS_S: Final = (3600, 2 * 3600, 3 * 3600, 6 * 3600, 12 * 3600)
_DAILY_BUCKETS_S: Final = (DAY_SECONDS, 7 * DAY_SECONDS)


@dataclass(frozen=True, slots=True)
class Resolution:
    """Read `source` (windows of `period_s`, or its rollups) in buckets of `bucket_s`."""

    source: Source
    bucket_s: int
    period_s: int

    @property
    def label(self) -> str:
        """What a point on the chart is, in words an operator reads at a glance."""
        if self.source == "windows":
            if self.bucket_s == self.period_s:
                return f"{format_seconds(self.period_s)} windows (raw)"
            bucket, period = format_seconds(self.bucket_s), format_seconds(self.period_s)
            return f"{bucket} buckets of {period} windows"
        if self.source == "hourly":
            if self.bucket_s == HOUR_SECONDS:
                return "hourly rollups"
            return f"{format_seconds(self.bucket_s)} buckets of hourly rollups"
        if self.bucket_s == DAY_SECONDS:
            return "daily rollups (UTC days)"
        return f"{format_seconds(self.bucket_s)} buckets of daily rollups (UTC days)"


def format_seconds(seconds: float) -> str:
    """A compact duration: 10 s, 5 min, 2 h, 7 d."""
    seconds = int(seconds)
    for unit, size in (("d", DAY_SECONDS), ("h", HOUR_SECONDS), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def candidates(period_s: int) -> list[Resolution]:
    """Every resolution for windows of `period_s`, finest first."""
    found = [Resolution("windows", period_s, period_s)]
    found += [
        Resolution("windows", width, period_s)
        for width in _WINDOW_BUCKETS_S
        if width > period_s and width % period_s == 0 and width < HOUR_SECONDS
    ]
    found += [Resolution("hourly", width, period_s) for width in _HOURLY_BUCKETS_S]
    found += [Resolution("daily", width, period_s) for width in _DAILY_BUCKETS_S]
    return found


def pick_resolution(
    *, range_s: float, period_s: int, target_points: int = TARGET_POINTS
) -> Resolution:
    """The finest resolution that keeps `range_s` within about `target_points` points."""
    if period_s <= 0:
        raise ValueError("period_s must be positive")
    options = candidates(period_s)
    for option in options:
        if range_s / option.bucket_s <= target_points:
            return option
    return options[-1]
