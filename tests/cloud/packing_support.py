"""Randomized windows for the packing tests, stored through the ingest writer's readings path.

Values are multiples of 1/8, so every sum and sum of squares is exact in float64 and
results must match bit for bit whatever order the database adds them in.
"""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

import psycopg

from millrace.cloud.ingest.writer import store_readings
from millrace.wire.aggregate import AGGREGATE_FIELDS, Aggregate, merge_all

PERIOD_S = 10
SLOTS_PER_HOUR = 3600 // PERIOD_S
Key = tuple[datetime, int, int, int]  # ts, device_id, metric_id, period_s


def random_aggregate(rng: random.Random) -> Aggregate:
    values = [rng.randint(-800, 800) / 8 for _ in range(rng.randint(1, 12))]
    return Aggregate.of(values, rejected=rng.choice((0, 0, 0, 2)))


def random_windows(
    rng: random.Random,
    *,
    device_id: int,
    metric_id: int,
    hour: datetime,
    hours: int,
    missing: float = 0.0,
) -> dict[Key, Aggregate]:
    """Windows of `hours` hours from `hour`, each slot left out with probability `missing`."""
    out: dict[Key, Aggregate] = {}
    for slot in range(hours * SLOTS_PER_HOUR):
        if rng.random() >= missing:
            ts = hour + timedelta(seconds=slot * PERIOD_S)
            out[(ts, device_id, metric_id, PERIOD_S)] = random_aggregate(rng)
    return out


def store(conn: psycopg.Connection[Any], windows: dict[Key, Aggregate]) -> None:
    """Store windows as the ingest does (COPY, or merged into a part stored before).

    Then the statistics are flushed, as an ingest session's are within a second of its
    commit: packing selects an emptied chunk again by its count of live rows.
    """
    rows = [(*key, *(getattr(agg, f) for f in AGGREGATE_FIELDS)) for key, agg in windows.items()]
    with conn.transaction(), conn.cursor() as cur:
        store_readings(cur, rows)
    flush_stats(conn)


def flush_stats(conn: psycopg.Connection[Any]) -> None:
    """Make this session's statistics visible to others before its next reply.

    Outside a transaction only: inside one, they are flushed after its commit.
    """
    if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        conn.execute("SELECT pg_stat_force_next_flush()")


def ids(conn: psycopg.Connection[Any], device: str, metric: str) -> tuple[int, int]:
    d = conn.execute("INSERT INTO devices (name) VALUES (%s) RETURNING id", (device,)).fetchone()
    m = conn.execute(
        "INSERT INTO metrics (name) VALUES (%s) ON CONFLICT (name) DO UPDATE SET name = %s"
        " RETURNING id",
        (metric, metric),
    ).fetchone()
    assert d and m
    return int(d[0]), int(m[0])


_COLUMNS = ", ".join(AGGREGATE_FIELDS)
_BOTH_FORMS = f"""
SELECT 0 AS part, p.hour + make_interval(secs => coalesce(w.slot, w.i - 1) * p.period_s),
       p.device_id, p.metric_id, p.period_s, {", ".join(f"w.{f}" for f in AGGREGATE_FIELDS)}
FROM readings_packed p,
     unnest(p.slots, {", ".join(f"p.{f}" for f in AGGREGATE_FIELDS)})
         WITH ORDINALITY AS w(slot, {_COLUMNS}, i)
UNION ALL
SELECT 1, ts, device_id, metric_id, period_s, {_COLUMNS} FROM readings
ORDER BY 1
"""


def windows_at_rest(conn: psycopg.Connection[Any]) -> dict[Key, Aggregate]:
    """Every stored window from both forms, parts of one window merged (packed part first)."""
    parts: dict[Key, list[Aggregate]] = defaultdict(list)
    for row in conn.execute(_BOTH_FORMS).fetchall():
        parts[tuple(row[1:5])].append(Aggregate(*row[5:]))  # type: ignore[index]
    return {key: merge_all(aggs) for key, aggs in parts.items()}


def merged(*sets: dict[Key, Aggregate]) -> dict[Key, Aggregate]:
    """What the windows of `sets` add up to, earlier sets being earlier parts."""
    out: dict[Key, Aggregate] = {}
    for windows in sets:
        for key, agg in windows.items():
            out[key] = out[key].merge(agg) if key in out else agg
    return out


def waiting_pid(conn: psycopg.Connection[Any], login: str, statement: str) -> int | None:
    """The backend of `login` waiting on a lock in a statement containing `statement`."""
    row = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE usename = %s AND wait_event_type = 'Lock'"
        " AND strpos(query, %s) > 0",
        (login, statement),
    ).fetchone()
    return int(row[0]) if row else None
