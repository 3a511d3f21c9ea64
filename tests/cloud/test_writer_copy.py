"""The writer's own binary COPY encoding of readings rows is byte for byte psycopg's."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import psycopg
from psycopg import adapt

# psycopg's formatter behind Copy.write_row: the reference the writer's struct must match.
from psycopg._copy_base import BinaryFormatter

from millrace.cloud.ingest.writer import (
    _COPY_SIGNATURE,
    _COPY_TRAILER,
    READING_TYPES,
    reading_chunks,
    to_datetime,
)

INT4 = (-(2**31), 2**31 - 1)
INT8 = (-(2**63), 2**63 - 1)
FLOATS = (-0.0, 0.0, 5e-324, -5e-324, -1.7976931348623157e308, 1.7976931348623157e308, -123.456)
# datetime's range, 2000-01-01 and a millisecond either side of it, the epoch.
TIMES_MS = (
    int((datetime(1, 1, 1, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1000),
    -1,
    0,
    946_684_799_999,
    946_684_800_000,
    946_684_800_001,
    int((datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)).timestamp() * 1000),
)


def _window(rng: random.Random, **fixed: Any) -> SimpleNamespace:
    """A window-shaped row: `reading_chunks` reads attributes, so values outside what the
    wire allows (timestamps before 2000, int64 counts) can be encoded too."""
    values = {
        "metric": rng.choice(("m.low", "m.high")),
        "start_ms": rng.choice(TIMES_MS),
        "period_s": rng.choice((*INT4, 1, 86_400)),
        "count": rng.choice((*INT8, 1, 1_000_000_000)),
        "rejected": rng.choice((*INT4, 0)),
        **{f: rng.choice(FLOATS) for f in ("sum", "min", "max", "first", "last", "sumsq")},
    }
    values.update(fixed)
    return SimpleNamespace(**values)


def _row(w: SimpleNamespace, device_id: int, metric_id: int) -> tuple[Any, ...]:
    """The row as the writer gave it to psycopg's write_row before."""
    key = (to_datetime(w.start_ms), device_id, metric_id, w.period_s)
    return (*key, w.count, w.sum, w.min, w.max, w.first, w.last, w.sumsq, w.rejected)


def _psycopg_bytes(rows: list[tuple[Any, ...]]) -> bytes:
    tx = adapt.Transformer()
    tx.set_dumper_types(
        [psycopg.postgres.types[t].oid for t in READING_TYPES], psycopg.pq.Format.BINARY
    )
    formatter = BinaryFormatter(tx)
    out = bytearray()
    for row in rows:
        out += formatter.write_row(row)
    return bytes(out + formatter.end())


def test_reading_chunks_equal_psycopg_write_row_for_edge_values() -> None:
    rng = random.Random(18)
    edges = [
        _window(rng, start_ms=ms, count=count, period_s=period, rejected=rejected, sum=x, min=x)
        for ms in TIMES_MS
        for count, period, rejected, x in zip(
            INT8 * 2, INT4 * 2, INT4[::-1] * 2, FLOATS, strict=False
        )
    ]
    windows = edges + [_window(rng) for _ in range(600)]  # past two chunk boundaries
    batches = [
        SimpleNamespace(batch=SimpleNamespace(device=device, windows=windows[i::2]))
        for i, device in enumerate(("dev-a", "dev-b"))
    ]
    device_ids = {"dev-a": INT4[0], "dev-b": INT4[1]}
    metric_ids = {"m.low": -1, "m.high": 2**31 - 1}
    hourly: dict[Any, Any] = {}
    stored: list[tuple[str, Any]] = []

    chunks = list(reading_chunks(batches, device_ids, metric_ids, hourly, stored, None))  # type: ignore[arg-type]

    rows = [
        _row(w, device_ids[b.batch.device], metric_ids[w.metric])
        for b in batches
        for w in b.batch.windows
    ]
    assert len(chunks) == 3
    assert _COPY_SIGNATURE + b"".join(chunks) + _COPY_TRAILER == _psycopg_bytes(rows)
    assert [w for _, w in stored] == [w for b in batches for w in b.batch.windows]
    assert sum(row.parts for row in hourly.values()) == len(rows)
