"""Which window periods the platform stores: one rule for the edge and the cloud.

Rollups are hourly, so a window must lie inside one hour: its period divides 3600.
The cloud accepts `STANDARD_PERIODS_S` unless its `validation.allowed_periods_s`
says otherwise (and that list may only name divisors of an hour); the edge refuses,
in `edge check` and in the `set` command, any period outside `STANDARD_PERIODS_S`,
so a period the cloud would dead-letter never reaches the outbox.
"""

from __future__ import annotations

from typing import Final

SECONDS_PER_HOUR: Final = 3600
STANDARD_PERIODS_S: Final = (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1800, 3600)
STANDARD_PERIODS_TEXT: Final = ", ".join(str(p) for p in STANDARD_PERIODS_S)


def divides_hour(period_s: int) -> bool:
    """True when windows of `period_s` tile an hour (each lies in one hourly rollup)."""
    return 0 < period_s <= SECONDS_PER_HOUR and SECONDS_PER_HOUR % period_s == 0


def period_problem(period_s: int) -> str | None:
    """Why the cloud would refuse windows of `period_s` by default, or None if it stores them."""
    if period_s in STANDARD_PERIODS_S:
        return None
    return f"{period_s} s is not a window period the cloud stores (one of {STANDARD_PERIODS_TEXT})"
