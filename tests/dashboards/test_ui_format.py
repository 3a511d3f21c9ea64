"""Short values for metric cards: counts and rates that fit a card uncut."""

from __future__ import annotations

import pytest

from millrace.dashboards.ui import MAX_METRIC_VALUE_CHARS, compact_count, rate, seconds


@pytest.mark.parametrize(
    ("count", "shown"),
    [
        (0, "0"),
        (7, "7"),
        (99_999, "99,999"),
        (100_000, "100 k"),
        (123_456, "123 k"),
        (999_999, "1 M"),
        (1_234_567, "1.23 M"),
        (999_999_999, "1 G"),
        (1_234_567_890, "1.23 G"),
    ],
)
def test_compact_count(count: int, shown: str) -> None:
    assert compact_count(count) == shown


@pytest.mark.parametrize(
    ("per_second", "shown"),
    [
        (0.0, "0.0/s"),
        (0.74, "0.7/s"),
        (999.96, "1,000/s"),
        (1234.5, "1,234/s"),
        (123_456, "123 k/s"),
    ],
)
def test_rate(per_second: float, shown: str) -> None:
    assert rate(per_second) == shown


def test_card_values_fit_whatever_the_magnitude() -> None:
    for exponent in range(13):
        for mantissa in (1, 1.2345, 4.9999, 9.9999):
            value = mantissa * 10**exponent
            assert len(compact_count(value)) <= MAX_METRIC_VALUE_CHARS, value
            if value < 10**11:  # a rate beyond 100 G/s is not a plant's
                assert len(rate(value)) <= MAX_METRIC_VALUE_CHARS, value


@pytest.mark.parametrize(
    ("value", "shown"),
    [(0.354, "0.35 s"), (9.999, "10.0 s"), (12.34, "12.3 s"), (89.96, "90 s"), (3579.5, "60 min")],
)
def test_seconds(value: float, shown: str) -> None:
    assert seconds(value) == shown
    assert len(shown) <= MAX_METRIC_VALUE_CHARS
