"""Storage at rest: bytes per stored window, hot (`readings`) vs packed, and the dashboard's
queries before and after packing, in one run.

A day of 10 s windows of realistic signals (sensor resolution, slow drift, noise: a
0.1 degC temperature, a 0.01 bar pressure, an energy counter, a flow stepping between
set points; 1 s polling, aggregated with the edge's own float operations) is COPYed
into `readings` in arrival order (every device's windows of one period together, as
the ingest writes them), then packed by the retention schedule's own code
(cloud/packing.py) as a login of the millrace_retention role, whose heap block reads of
`readings` are counted (pg_statio) against the blocks its chunks hold (less the two
buffer hits per window of its DELETE and RETURNING on the page the scan holds; the
DELETE also touches the visibility map once per all-visible page, 1 more a block here,
since the chunk was vacuumed as autovacuum does a day-old one). That role
may not VACUUM the chunks before PostgreSQL 17, so the owner then does what autovacuum
would (VACUUM, another read of the chunk, counted apart) and the packing's next run
gives back the emptied chunk's index pages. Sizes come from `hypertable_detailed_size`
after VACUUM, at rest counting `readings_packed` and what is left of `readings`; query
times are medians of the dashboard's `series` at the resolutions it picks for 1 h,
6 h and 24 h, on the same random (device, metric, range) draws: today's hot-only query
text, the two-form query on hot data, and the two-form query on packed data.

Run: .venv/bin/python bench/storage.py [--devices 10] [--signals 8] [--hours 24] [--draws 25]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
from common import BENCH_PG_SETTINGS, DATABASE, machine, print_table
from psycopg import sql
from sqlalchemy import BigInteger, Connection, Double, cast, create_engine, func, select
from sqlalchemy.pool import NullPool

from millrace.cloud.dbupgrade import RETENTION_ROLE, upgrade
from millrace.cloud.packing import pack_windows, release_emptied
from millrace.cloud.schema.core import devices, metrics, readings
from millrace.dashboards import queries
from millrace.dashboards.resolution import Resolution, pick_resolution
from millrace.ops.stack.postgres import PostgresCluster
from millrace.wire.aggregate import AGGREGATE_FIELDS, Aggregate

PERIOD_S = 10
POLL_S = 1
TARGET_REST_BYTES = 30.0
RANGES_H = (1, 6, 24)
DRAWS = 25  # random (device, metric, start) per range
KINDS = ("temperature", "pressure", "counter", "flow")


def _signal(kind: str, rng: random.Random) -> Callable[[], float]:
    """One sensor's next reading, at its resolution."""
    state = {"x": rng.uniform(15, 30), "n": float(rng.randint(10**5, 10**7)), "set": 25.0}
    if kind == "temperature":  # 0.1 degC, drifting slowly, noise of a cheap probe

        def temperature() -> float:
            state["x"] += rng.gauss(0, 0.005)
            return round(state["x"] + rng.gauss(0, 0.04), 1)

        return temperature
    if kind == "pressure":  # 0.01 bar around a few bar

        def pressure() -> float:
            state["x"] = 4.0 + 0.999 * (state["x"] - 4.0) + rng.gauss(0, 0.003)
            return round(state["x"] + rng.gauss(0, 0.004), 2)

        return pressure
    if kind == "counter":  # an energy meter in Wh, never going back

        def counter() -> float:
            state["n"] += rng.choice((2, 3, 3, 4))
            return state["n"]

        return counter

    def flow() -> float:  # m3/h stepping between set points, 0.1 resolution
        if rng.random() < 1 / 1800:
            state["set"] = rng.choice((0.0, 12.5, 25.0, 40.0))
        return round(state["set"] + rng.gauss(0, 0.15), 1) if state["set"] else 0.0

    return flow


def windows(
    device_ids: list[int], metric_ids: list[int], start: datetime, hours: int, seed: int
) -> Iterator[tuple[Any, ...]]:
    """readings rows in arrival order: each period, every device's every metric."""
    rng = random.Random(seed)
    series = [
        (d, m, _signal(KINDS[i % len(KINDS)], rng))
        for d in device_ids
        for i, m in enumerate(metric_ids)
    ]
    per_window = PERIOD_S // POLL_S
    for slot in range(hours * 3600 // PERIOD_S):
        ts = start + timedelta(seconds=slot * PERIOD_S)
        for device_id, metric_id, read in series:
            agg = Aggregate.of([read() for _ in range(per_window)])
            yield (ts, device_id, metric_id, PERIOD_S, *(getattr(agg, f) for f in AGGREGATE_FIELDS))


# The packing runs as this login of the millrace_retention role, as the schedule does.
PACKER_LOGIN = "bench_retention"


def sizes(conn: psycopg.Connection[Any], table: str) -> tuple[int, int, int]:
    """(heap, index, toast) bytes of a hypertable."""
    row = conn.execute(
        "SELECT table_bytes, index_bytes, toast_bytes FROM hypertable_detailed_size(%s)", (table,)
    ).fetchone()
    assert row is not None
    return int(row[0] or 0), int(row[1] or 0), int(row[2] or 0)


_HEAP_BLOCKS = """
SELECT sum(pg_relation_size(s.relid) / current_setting('block_size')::int),
       sum(s.heap_blks_read + s.heap_blks_hit)
FROM timescaledb_information.chunks k
JOIN pg_statio_all_tables s ON s.schemaname = k.chunk_schema AND s.relname = k.chunk_name
WHERE k.hypertable_name = 'readings'
"""


def heap_blocks(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """(blocks in `readings` chunks now, heap block reads of them so far, this session's too)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(_HEAP_BLOCKS).fetchone()
    assert row is not None
    return int(row[0] or 0), int(row[1] or 0)


def wal_lsn(conn: psycopg.Connection[Any]) -> int:
    """Bytes of WAL the server has written so far (the cluster's: nothing else runs here)."""
    return int(conn.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchall()[0][0])


def parts(size: tuple[int, int, int], n: int) -> str:
    return f"heap {size[0] / n:.1f} + index {size[1] / n:.1f} + toast {size[2] / n:.1f}"


def today_series(
    conn: Connection,
    *,
    device: str,
    metric: str,
    resolution: Resolution,
    start: datetime,
    end: datetime,
) -> pd.DataFrame:
    """The series query as it was before packing: `readings` only (the peer)."""
    r = readings
    bucket = func.time_bucket(timedelta(seconds=resolution.bucket_s), r.c.ts).label("ts")
    total = func.sum(r.c["count"])
    stmt = (
        select(
            bucket,
            (func.sum(r.c["sum"]) / cast(total, Double)).label("mean"),
            func.min(r.c["min"]).label("min"),
            func.max(r.c["max"]).label("max"),
            cast(func.coalesce(total, 0), BigInteger).label("count"),
            cast(func.coalesce(func.sum(r.c.rejected), 0), BigInteger).label("rejected"),
            func.count().label("windows"),
        )
        .where(
            r.c.device_id == select(devices.c.id).where(devices.c.name == device).scalar_subquery(),
            r.c.metric_id == select(metrics.c.id).where(metrics.c.name == metric).scalar_subquery(),
            r.c.period_s == resolution.period_s,
            r.c.ts >= start,
            r.c.ts < end,
        )
        .group_by(bucket)
        .order_by(bucket)
    )
    result = conn.execute(stmt)
    frame = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
    return frame


Draw = tuple[str, str, Resolution, datetime, datetime]


def draws(
    names: list[str], metric_names: list[str], start: datetime, hours: int, n: int
) -> list[Draw]:
    rng = random.Random(18)
    out = []
    for range_h in RANGES_H:
        resolution = pick_resolution(range_s=range_h * 3600, period_s=PERIOD_S)
        for _ in range(n):
            offset = rng.randrange(0, max(1, (hours - range_h) * 360 + 1)) * PERIOD_S
            begin = start + timedelta(seconds=offset)
            out.append(
                (
                    rng.choice(names),
                    rng.choice(metric_names),
                    resolution,
                    begin,
                    begin + timedelta(hours=range_h),
                )
            )
    return out


Variant = tuple[str, Connection, Callable[..., pd.DataFrame]]


def timed(
    variants: list[Variant], plan: list[Draw]
) -> dict[str, tuple[dict[int, float], list[pd.DataFrame]]]:
    """Median seconds per range and the frames, per variant; each draw runs every variant in
    turn, so load on a shared machine hits them alike. The first pass only warms caches."""
    seconds: dict[str, dict[int, list[float]]] = {v[0]: {h: [] for h in RANGES_H} for v in variants}
    frames: dict[str, list[pd.DataFrame]] = {v[0]: [] for v in variants}
    for attempt in range(2):
        for i, (device, metric, resolution, begin, end) in enumerate(plan):
            for name, conn, query in variants:
                t0 = time.perf_counter()
                frame = query(
                    conn, device=device, metric=metric, resolution=resolution, start=begin, end=end
                )
                elapsed = time.perf_counter() - t0
                conn.rollback()
                if attempt:
                    seconds[name][RANGES_H[i * len(RANGES_H) // len(plan)]].append(elapsed)
                    frames[name].append(frame)
    return {
        name: ({h: statistics.median(v) for h, v in by_range.items()}, frames[name])
        for name, by_range in seconds.items()
    }


def same(a: list[pd.DataFrame], b: list[pd.DataFrame]) -> bool:
    return all(x.equals(y) for x, y in zip(a, b, strict=True))


def _ids(conn: psycopg.Connection[Any], table: str, names: list[str]) -> list[int]:
    statement = sql.SQL("INSERT INTO {} (name) VALUES (%s) RETURNING id").format(
        sql.Identifier(table)
    )
    return [int(conn.execute(statement, (n,)).fetchall()[0][0]) for n in names]


def _engine(dsn: str) -> Any:
    return create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(dsn), poolclass=NullPool
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--signals", type=int, default=8)
    parser.add_argument("--hours", type=int, default=24)
    parser.add_argument("--draws", type=int, default=DRAWS)
    args = parser.parse_args()
    start = (datetime.now(UTC) - timedelta(days=3)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    names = [f"gw{i:04d}" for i in range(args.devices)]
    metric_names = [f"{KINDS[i % len(KINDS)]}.{i:02d}" for i in range(args.signals)]
    columns = ", ".join(("ts", "device_id", "metric_id", "period_s", *AGGREGATE_FIELDS))
    base = Path(tempfile.mkdtemp(prefix="millrace-bench-pg-"))
    cluster = PostgresCluster(base, settings=BENCH_PG_SETTINGS)
    cluster.init()
    cluster.start()
    try:
        # Two databases with the same windows: one stays hot, the other is packed.
        dsns = {}
        for name in ("hot", "packed"):
            cluster.create_database(f"{DATABASE}_{name}")
            dsns[name] = cluster.dsn_for(f"{DATABASE}_{name}")
            upgrade(dsns[name])
        with (
            psycopg.connect(dsns["hot"], autocommit=True) as hot_db,
            psycopg.connect(dsns["packed"], autocommit=True) as packed_db,
        ):
            for db in (hot_db, packed_db):
                device_ids = _ids(db, "devices", names)
                metric_ids = _ids(db, "metrics", metric_names)
            t0 = time.perf_counter()
            with hot_db.cursor() as cur, cur.copy(f"COPY readings ({columns}) FROM STDIN") as copy:
                for row in windows(device_ids, metric_ids, start, args.hours, seed=1):
                    copy.write_row(row)
            load_s = time.perf_counter() - t0
            with (
                hot_db.cursor().copy(
                    f"COPY (SELECT {columns} FROM readings) TO STDOUT (FORMAT binary)"
                ) as out,
                packed_db.cursor().copy(
                    f"COPY readings ({columns}) FROM STDIN (FORMAT binary)"
                ) as into,
            ):
                for data in out:
                    into.write(data)
            for db in (hot_db, packed_db):
                db.execute("VACUUM ANALYZE readings")
            n_windows = int(hot_db.execute("SELECT count(*) FROM readings").fetchall()[0][0])
            hot = sizes(hot_db, "readings")
            # Packing takes whole chunks: every (1-day) chunk the windows fill has ended here.
            pack_before = start + timedelta(days=-(-args.hours // 24))
            chunk_blocks, reads_before = heap_blocks(packed_db)
            packed_db.execute(
                sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                    sql.Identifier(PACKER_LOGIN), sql.Identifier(RETENTION_ROLE)
                )
            )
            wal_before = wal_lsn(packed_db)
            with psycopg.connect(dsns["packed"], user=PACKER_LOGIN, autocommit=True) as packer:
                t0 = time.perf_counter()
                report = pack_windows(packer, older_than=pack_before)
                pack_s = time.perf_counter() - t0
            # Less the two hits per window on the page in hand (heap_delete, RETURNING).
            pack_reads = heap_blocks(packed_db)[1] - reads_before - 2 * report.windows
            pack_wal = wal_lsn(packed_db) - wal_before
            t0 = time.perf_counter()
            packed_db.execute("VACUUM readings")  # autovacuum's job for the retention role
            vacuum_s = time.perf_counter() - t0
            vacuum_wal = wal_lsn(packed_db) - wal_before - pack_wal
            vacuum_reads = heap_blocks(packed_db)[1] - reads_before - pack_reads
            vacuum_reads -= 2 * report.windows
            released = release_emptied(packed_db, pack_before)
            packed_db.execute("VACUUM ANALYZE readings_packed")
            packed_db.execute("VACUUM ANALYZE readings")
            packed = sizes(packed_db, "readings_packed")
            left = sizes(packed_db, "readings")
        hot_engine, packed_engine = _engine(dsns["hot"]), _engine(dsns["packed"])
        with hot_engine.connect() as on_hot, packed_engine.connect() as on_packed:
            runs = timed(
                [
                    ("today", on_hot, today_series),
                    ("hot", on_hot, queries.series),
                    ("packed", on_packed, queries.series),
                ],
                draws(names, metric_names, start, args.hours, args.draws),
            )
        hot_engine.dispose()
        packed_engine.dispose()
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    (today_s, today_frames), (hot_s, hot_frames), (packed_s, packed_frames) = (
        runs["today"],
        runs["hot"],
        runs["packed"],
    )
    plan_resolutions = {h: pick_resolution(range_s=h * 3600, period_s=PERIOD_S) for h in RANGES_H}
    assert report.windows == n_windows, (report, n_windows)
    hot_b = sum(hot) / n_windows
    rest_b = (sum(packed) + sum(left)) / n_windows
    identical = same(hot_frames, packed_frames) and same(today_frames, hot_frames)
    ratios = {h: packed_s[h] / today_s[h] for h in RANGES_H}
    print(f"machine: {machine()}")
    rows = [
        (
            "series x windows",
            f"{args.devices * args.signals} x {n_windows // (args.devices * args.signals)}",
            f"{args.devices} devices, {args.signals} signals, 10 s windows of 1 s readings",
        ),
        ("windows", f"{n_windows:,}", f"COPYed in {load_s:.1f} s"),
        (
            "hot bytes / window",
            f"{hot_b:.1f}",
            parts(hot, n_windows),
        ),
        (
            "packed bytes / window",
            f"{rest_b:.1f}",
            f"{parts(packed, n_windows)}; target <= {TARGET_REST_BYTES:.0f}",
        ),
        (
            "left in readings",
            f"{sum(left):,} bytes",
            f"{parts(left, n_windows)} a window; {released} emptied chunks released",
        ),
        ("hot / packed", f"{hot_b / rest_b:.1f}x", ""),
        (
            "packing",
            f"{report.windows / pack_s:,.0f} windows/s",
            f"{report.hours} hour rows, {report.chunks} chunks, {pack_s:.1f} s",
        ),
        (
            "packing reads",
            f"{pack_reads / chunk_blocks:.2f} x",
            f"{pack_reads:,} block reads of readings for {chunk_blocks:,} blocks: the heap"
            f" once, its visibility map once a page (vacuumed), 2 hits a window apart",
        ),
        (
            "WAL written",
            f"{(pack_wal + vacuum_wal) / report.windows:.0f} B/window",
            f"packing {pack_wal / report.windows:.0f}, VACUUM {vacuum_wal / report.windows:.0f}"
            f" bytes a window (a DELETE logs every row and, after a checkpoint, each page;"
            f" TRUNCATE logged almost nothing)",
        ),
        (
            "VACUUM after it",
            f"{vacuum_reads / chunk_blocks:.2f} x",
            f"{vacuum_reads:,} heap block reads (its passes over the dead chunk), {vacuum_s:.1f} s",
        ),
    ]
    for h in RANGES_H:
        res = plan_resolutions[h]
        rows.append(
            (
                f"series {h} h ({res.label})",
                f"{packed_s[h] * 1000:.2f} ms",
                f"today {today_s[h] * 1000:.2f} ms, two-form on hot {hot_s[h] * 1000:.2f} ms;"
                f" packed/today {ratios[h]:.2f}",
            )
        )
    rows.append(
        (
            "answers identical",
            "yes" if identical else "NO",
            "today's query on hot = new on hot = new on packed",
        )
    )
    print_table(rows)
    print(
        f"storage_windows={n_windows} hot_bytes_per_window={hot_b:.1f}"
        f" rest_bytes_per_window={rest_b:.1f} rest_vs_target={rest_b / TARGET_REST_BYTES:.2f}"
        f" shrink={hot_b / rest_b:.1f}"
        + "".join(f" query_{h}h_packed_vs_today={ratios[h]:.2f}" for h in RANGES_H)
        + "".join(f" query_{h}h_hot_vs_today={hot_s[h] / today_s[h]:.2f}" for h in RANGES_H)
        + f" pack_reads_per_block={pack_reads / chunk_blocks:.2f}"
        + f" vacuum_reads_per_block={vacuum_reads / chunk_blocks:.2f}"
        + f" pack_wal_bytes_per_window={pack_wal / report.windows:.0f}"
        + f" vacuum_wal_bytes_per_window={vacuum_wal / report.windows:.0f}"
        + f" answers_identical={int(identical)}"
    )
    ok = rest_b <= TARGET_REST_BYTES and identical and all(r <= 1.0 for r in ratios.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
