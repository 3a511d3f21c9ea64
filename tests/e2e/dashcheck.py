"""Do the dashboard's query functions show what the reconciliation proved is in the database?

Each check returns a list of discrepancies (empty when the dashboard agrees), so a failing
test prints every one of them. Queries run as the dashboard's least-privilege login.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import psycopg
from sqlalchemy import Connection, create_engine
from sqlalchemy.pool import NullPool

from millrace.dashboards import queries
from millrace.dashboards.resolution import HOUR_SECONDS, Resolution
from tests.e2e.reconcile import RELATIVE_TOLERANCE, Reconciliation, Stored

# A coarser chart bucket the device page uses for longer ranges (resolution.py).
MINUTE_BUCKET_SECONDS = 60


def dashboard_connection(dsn: str) -> Connection:
    """A SQLAlchemy connection as the dashboard's login, in UTC (as dashboards/data.py)."""
    engine = create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(dsn, options="-c timezone=UTC"),
        poolclass=NullPool,
    )
    return engine.connect()


def utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RELATIVE_TOLERANCE * max(1.0, abs(a), abs(b))


def _ms(ts: object) -> int:
    assert isinstance(ts, datetime)
    return round(ts.timestamp() * 1000)


def _totals(windows: Iterable[Stored]) -> tuple[int, float, float, float, int, int]:
    chosen = list(windows)
    return (
        sum(w.count for w in chosen),
        math.fsum(w.sum for w in chosen),
        min(w.min for w in chosen),
        max(w.max for w in chosen),
        sum(w.rejected for w in chosen),
        len(chosen),
    )


def _compare_buckets(
    conn: Connection,
    *,
    device: str,
    metric: str,
    windows: Sequence[Stored],
    resolution: Resolution,
    start: datetime,
    end: datetime,
) -> list[str]:
    frame = queries.series(
        conn, device=device, metric=metric, resolution=resolution, start=start, end=end
    )
    width_ms = resolution.bucket_s * 1000
    expected: dict[int, list[Stored]] = defaultdict(list)
    for w in windows:
        expected[w.start_ms - w.start_ms % width_ms].append(w)
    where = f"{device} {metric} ({resolution.label})"
    problems = []
    seen = set()
    for row in frame.itertuples(index=False):
        bucket = _ms(row.ts)
        seen.add(bucket)
        if bucket not in expected:
            problems.append(f"{where}: point at {bucket} with no stored window")
            continue
        count, total, low, high, rejected, n = _totals(expected[bucket])
        got = (row.count, row.mean * row.count, row.min, row.max, row.rejected, row.windows)
        if not (
            got[0] == count
            and _close(got[1], total)
            and _close(got[2], low)
            and _close(got[3], high)
            and got[4] == rejected
            and got[5] == n
        ):
            want = (count, total, low, high, rejected, n)
            problems.append(f"{where} @{bucket}: dashboard {got}, database {want}")
    problems += [f"{where}: bucket {b} missing" for b in sorted(set(expected) - seen)]
    return problems


def series_problems(
    conn: Connection,
    stored: Sequence[Stored],
    reconciliation: Reconciliation,
    *,
    period_s: int,
    start: datetime,
    end: datetime,
) -> tuple[list[str], int]:
    """The device page's series at window resolution, in minute buckets and from the
    hourly rollups, against the stored windows; window points also against the truth
    counts of exactly reconciled windows. Returns (problems, points compared)."""
    by_series: dict[tuple[str, str], list[Stored]] = defaultdict(list)
    for w in stored:
        if w.source == "readings":
            by_series[(w.gateway, w.metric)].append(w)
    truth_counts = {
        (r.gateway, r.metric, r.start_ms): r.must
        for r in reconciliation.results
        if r.verdict == "exact"
    }
    problems: list[str] = []
    points = 0
    resolutions = (
        Resolution("windows", period_s, period_s),
        Resolution("windows", MINUTE_BUCKET_SECONDS, period_s),
        Resolution("hourly", HOUR_SECONDS, period_s),
    )
    for (device, metric), windows in sorted(by_series.items()):
        for resolution in resolutions:
            problems += _compare_buckets(
                conn,
                device=device,
                metric=metric,
                windows=windows,
                resolution=resolution,
                start=start,
                end=end,
            )
        frame = queries.series(
            conn,
            device=device,
            metric=metric,
            resolution=resolutions[0],
            start=start,
            end=end,
        )
        for row in frame.itertuples(index=False):
            points += 1
            truth = truth_counts.get((device, metric, _ms(row.ts)))
            if truth is not None and truth != row.count:
                problems.append(f"{device} {metric} @{_ms(row.ts)}: {row.count} != truth {truth}")
    return problems, points


def device_metric_problems(
    conn: Connection, stored: Sequence[Stored], *, period_s: int
) -> list[str]:
    """The device page's metric list: every metric, the window period and how many windows."""
    expected: dict[str, dict[str, int]] = defaultdict(dict)
    for w in stored:
        if w.source == "readings":
            expected[w.gateway][w.metric] = expected[w.gateway].get(w.metric, 0) + 1
    problems = []
    names = set(queries.device_names(conn))
    for device, metrics in sorted(expected.items()):
        if device not in names:
            problems.append(f"{device} not in device_names")
        frame = queries.device_metrics(conn, device=device)
        got = {row.metric: (row.windows, row.period_s) for row in frame.itertuples(index=False)}
        want = {metric: (n, period_s) for metric, n in metrics.items()}
        if got != want:
            problems.append(f"{device}: device_metrics {got} != stored {want}")
    return problems
