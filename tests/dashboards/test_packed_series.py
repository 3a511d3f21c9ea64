"""The series query answers the same before and after packing, with late windows in between.

One device's windows are packed (cloud/packing.py); a reference device holds the same
windows, shifted by whole days, only in `readings`. Values are multiples of 1/8, so
the frames must be equal exactly; queries run as the dashboard's role.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pandas as pd
import psycopg
import pytest
from sqlalchemy import Connection, create_engine
from sqlalchemy.pool import NullPool

from millrace.cloud import dbupgrade
from millrace.cloud.packing import pack_windows
from millrace.dashboards import queries
from millrace.dashboards.resolution import Resolution
from tests.cloud.packing_support import (
    PERIOD_S,
    Key,
    ids,
    random_aggregate,
    random_windows,
    store,
)
from tests.dashboards.plant import dashboard_dsn

pytestmark = pytest.mark.integration

BASE = datetime(2026, 11, 1, tzinfo=UTC)
SHIFT = timedelta(days=20)  # the reference device's copy; packing stops at BASE + 10 days
HOURS = 3
H = timedelta(hours=1)
S = timedelta(seconds=1)
# (start, end) around the edges of hours and windows, at several bucket widths.
RANGES = [
    (BASE - 10 * S, BASE + HOURS * H),
    (BASE + 5 * S, BASE + 2 * H),
    (BASE + H - 10 * S, BASE + H + 10 * S),
    (BASE + 50 * 60 * S, BASE + 2 * H + 10 * 60 * S),
    (BASE + 2 * H, BASE + 2 * H + 3590 * S),
]
BUCKETS_S = (10, 60, 300, 1800)


@pytest.fixture
def db(fresh_db: str) -> str:
    dbupgrade.upgrade(fresh_db)
    return fresh_db


@pytest.fixture
def dash(db: str) -> Iterator[Connection]:
    dsn = dashboard_dsn(db)
    engine = create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(dsn), poolclass=NullPool
    )
    with engine.connect() as connection:
        yield connection


def _shifted(windows: dict[Key, object], device_id: int, by: timedelta) -> dict[Key, object]:
    return {(ts + by, device_id, m, p): agg for (ts, _, m, p), agg in windows.items()}


def answers(dash: Connection, device: str, shift: timedelta = timedelta(0)) -> list[pd.DataFrame]:
    frames = []
    for start, end in RANGES:
        for bucket_s in BUCKETS_S:
            frame = queries.series(
                dash,
                device=device,
                metric="temp",
                resolution=Resolution("windows", bucket_s, PERIOD_S),
                start=start + shift,
                end=end + shift,
            )
            frame["ts"] = frame["ts"] - shift
            frames.append(frame)
    dash.rollback()  # a fresh snapshot for the next call
    return frames


def assert_same(a: list[pd.DataFrame], b: list[pd.DataFrame]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        pd.testing.assert_frame_equal(x, y, check_exact=True)


def total(frames: list[pd.DataFrame], column: str) -> int:
    return int(sum(f[column].sum() for f in frames))


def hot_rows(conn: psycopg.Connection) -> int:
    """Windows of the packed device still in `readings`."""
    row = conn.execute("SELECT count(*) FROM readings WHERE ts < %s", (BASE + SHIFT,)).fetchone()
    return int(row[0]) if row else -1


def test_series_is_identical_before_and_after_packing_with_late_windows(
    db: str, dash: Connection
) -> None:
    rng = random.Random(1818)
    with psycopg.connect(db, autocommit=True) as conn:
        packed, metric = ids(conn, "packed-1", "temp")
        ref, _ = ids(conn, "ref-1", "temp")
        windows = random_windows(
            rng, device_id=packed, metric_id=metric, hour=BASE, hours=HOURS, missing=0.05
        )
        store(conn, windows)
        store(conn, _shifted(windows, ref, SHIFT))
        before = answers(dash, "packed-1")
        assert sum(len(f) for f in before) > 0 and any(f["windows"].sum() > 1 for f in before)

        pack_windows(conn, older_than=BASE + 10 * 24 * H)
        assert hot_rows(conn) == 0
        assert_same(answers(dash, "packed-1"), before)

        # Late: rests of windows closed early at both edges of hours, and a window never sent.
        missing = next(
            BASE + i * 10 * S
            for i in range(HOURS * 360)
            if (BASE + i * 10 * S, packed, metric, PERIOD_S) not in windows
        )
        late_at = [BASE, BASE + H - 10 * S, BASE + H, BASE + 2 * H + 3590 * S, missing]
        late = {(ts, packed, metric, PERIOD_S): random_aggregate(rng) for ts in late_at}
        store(conn, late)
        store(conn, _shifted(late, ref, SHIFT))
        reference = answers(dash, "ref-1", SHIFT)
        assert total(reference, "count") > total(before, "count")

        assert_same(answers(dash, "packed-1"), reference)  # late windows hot, the rest packed
        pack_windows(conn, older_than=BASE + 10 * 24 * H)
        assert hot_rows(conn) == 0
        assert_same(answers(dash, "packed-1"), reference)  # merged into the packed rows
        dash.exec_driver_sql("SET TIME ZONE 'America/Chicago'")  # hour bounds are UTC hours
        assert_same(answers(dash, "packed-1"), reference)
