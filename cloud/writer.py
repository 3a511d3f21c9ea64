"""The batch writer: many MQTT batches, one database transaction, exactly once.

Inside the caller's transaction `BatchWriter.write` first claims each batch's
(device, boot_id, seq) in the ingest ledger (INSERT ... ON CONFLICT DO NOTHING
RETURNING); only the claimed ones are stored, so a redelivered batch is
skipped by the same commit that would have stored it twice. Rows go in with
binary COPY, rollups with one upsert per table, then the sequence streams
and gaps, then device freshness. Each step sends its keys sorted so
concurrent workers take row locks in one order.

Device and metric ids are cached in memory; unknown names are registered in
a short transaction of their own before the batch (`prepare`), so the batch
itself never makes a round trip per row.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg

from millrace.cloud import gaps, rollups
from millrace.wire import Batch, EventValue, Window

log = logging.getLogger(__name__)

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# Dead-letter payloads are kept for diagnosis, not archived: cap what one hostile
# client can make us store.
DEAD_LETTER_PAYLOAD_MAX_BYTES: Final = 64 * 1024
DEAD_LETTER_TEXT_MAX_CHARS: Final = 2000

READING_COLUMNS: Final = (
    "ts",
    "device_id",
    "metric_id",
    "period_s",
    "count",
    "sum",
    "min",
    "max",
    "first",
    "last",
    "sumsq",
    "rejected",
)
READING_TYPES: Final = (
    "timestamptz",
    "int4",
    "int4",
    "int4",
    "int8",
    "float8",
    "float8",
    "float8",
    "float8",
    "float8",
    "float8",
    "int4",
)
EVENT_COLUMNS: Final = ("ts", "device_id", "metric_id", "kind", "value", "text")
EVENT_TYPES: Final = ("timestamptz", "int4", "int4", "text", "float8", "text")

Key = tuple[str, str, int]  # device, boot_id, seq


@dataclass(frozen=True, slots=True)
class Incoming:
    """A validated batch and when this worker received it."""

    batch: Batch
    received_at: datetime


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that will never be stored, and why."""

    topic: str
    device: str | None
    code: str
    reason: str
    content_type: str | None
    payload: bytes
    received_at: datetime


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What one `write` stored; `windows` feeds the alert engine."""

    stored_batches: int
    duplicate_batches: int
    readings: int
    events: int
    rollup_rows: int
    gaps_opened: int
    windows: tuple[tuple[str, Window], ...]  # (device, window), for the alert engine
    stored_keys: frozenset[Key]


def to_datetime(ms: int) -> datetime:
    """Exact conversion of epoch milliseconds (float division would round)."""
    return _EPOCH + timedelta(milliseconds=ms)


def _merge_repeated_windows(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Merge rows of one transaction that share a window key (earlier row = earlier part)."""
    merged: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for row in rows:
        key = row[:4]
        before = merged.get(key)
        merged[key] = row if before is None else _merge_window_rows(before, row)
    return list(merged.values())


def _merge_window_rows(a: tuple[Any, ...], b: tuple[Any, ...]) -> tuple[Any, ...]:
    ts, device_id, metric_id, period_s = a[:4]
    return (
        ts,
        device_id,
        metric_id,
        period_s,
        a[4] + b[4],
        a[5] + b[5],
        min(a[6], b[6]),
        max(a[7], b[7]),
        a[8],
        b[9],
        a[10] + b[10],
        a[11] + b[11],
    )


def store_readings(cur: psycopg.Cursor[Any], rows: Iterable[tuple[Any, ...]]) -> int:
    """COPY window rows; a window already stored in part is merged into, not refused.

    An agent stopped with SIGTERM closes its open windows early; after its restart the rest
    of such a window arrives under a new boot_id with the same (device, metric, ts, period).
    Both parts are real readings, so they merge exactly like a rollup: counts, sums and sums
    of squares add, min and max combine, first stays and last is the later part's. The fast
    path streams `rows` into a plain COPY (a generator builds them while the server stores
    the previous ones); only a transaction that meets such a window, stored before or twice
    among `rows`, pays for the merge. Returns how many rows came in.
    """
    source = iter(rows)
    kept: list[tuple[Any, ...]] = []

    def keep() -> Iterator[tuple[Any, ...]]:
        for row in source:
            kept.append(row)
            yield row

    try:
        with cur.connection.transaction():  # a savepoint: a conflict undoes only the COPY
            copy_rows(cur, "readings", READING_COLUMNS, READING_TYPES, keep())
        return len(kept)
    except psycopg.errors.UniqueViolation:
        kept.extend(source)  # whatever the COPY had not taken yet
        log.info("merging %s window rows into windows stored in part before", len(kept))
    merged = kept
    if len({row[:4] for row in kept}) != len(kept):
        merged = _merge_repeated_windows(kept)
    cur.execute(_MERGE_STAGING_CREATE)
    copy_rows(cur, "readings_merge", READING_COLUMNS, READING_TYPES, merged)
    cur.execute(_MERGE_INTO_READINGS)
    return len(kept)


_MERGE_STAGING_CREATE: Final = """
CREATE TEMP TABLE IF NOT EXISTS readings_merge
    (LIKE readings INCLUDING DEFAULTS) ON COMMIT DELETE ROWS
"""
_MERGE_INTO_READINGS: Final = """
INSERT INTO readings AS r (ts, device_id, metric_id, period_s, count, sum, min, max, first,
                           last, sumsq, rejected)
SELECT ts, device_id, metric_id, period_s, count, sum, min, max, first, last, sumsq, rejected
  FROM readings_merge
 ORDER BY device_id, metric_id, ts, period_s
ON CONFLICT (device_id, metric_id, ts, period_s) DO UPDATE
   SET count = r.count + excluded.count,
       sum = r.sum + excluded.sum,
       min = LEAST(r.min, excluded.min),
       max = GREATEST(r.max, excluded.max),
       last = excluded.last,
       sumsq = r.sumsq + excluded.sumsq,
       rejected = r.rejected + excluded.rejected
"""


def copy_rows(
    cur: psycopg.Cursor[Any],
    table: str,
    columns: Sequence[str],
    types: Sequence[str],
    rows: Iterable[Sequence[object]],
) -> None:
    """Binary COPY of `rows` into `table` (the floor of bench/ingest.py uses this too)."""
    statement = psycopg.sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        psycopg.sql.Identifier(table),
        psycopg.sql.SQL(", ").join(map(psycopg.sql.Identifier, columns)),
    )
    with cur.copy(statement) as copy:
        copy.set_types(list(types))
        for row in rows:
            copy.write_row(row)


class IdCache:
    """Name -> id for devices and metrics; ids never change once assigned."""

    __slots__ = ("devices", "metrics")

    def __init__(self) -> None:
        self.devices: dict[str, int] = {}
        self.metrics: dict[str, int] = {}

    def clear(self) -> None:
        self.devices.clear()
        self.metrics.clear()

    def ensure(self, conn: psycopg.Connection[Any], devices: set[str], metrics: set[str]) -> None:
        """Register unknown names (committed at once, so the cache never holds a rolled-back id)."""
        new_devices = sorted(devices - self.devices.keys())
        new_metrics = sorted(metrics - self.metrics.keys())
        if not new_devices and not new_metrics:
            return
        with conn.transaction(), conn.cursor() as cur:
            for table, names, cache in (
                ("devices", new_devices, self.devices),
                ("metrics", new_metrics, self.metrics),
            ):
                if not names:
                    continue
                ident = psycopg.sql.Identifier(table)
                cur.execute(
                    psycopg.sql.SQL(
                        "INSERT INTO {} (name) SELECT unnest(%b::text[]) ORDER BY 1"
                        " ON CONFLICT (name) DO NOTHING"
                    ).format(ident),
                    [names],
                )
                cur.execute(
                    psycopg.sql.SQL("SELECT name, id FROM {} WHERE name = ANY(%s)").format(ident),
                    [names],
                )
                cache.update(cur.fetchall())
        log.info("registered devices=%s metrics=%s", new_devices, new_metrics)


_LEDGER_INSERT: Final = """
INSERT INTO ingest_ledger (
    device_id, boot_id, seq, sent_at, received_at, windows, events, dropped, rejected,
    clock_synced)
SELECT * FROM unnest(
    %b::int4[], %b::uuid[], %b::int8[], %b::timestamptz[], %b::timestamptz[], %b::int4[],
    %b::int4[], %b::int8[], %b::int8[], %b::bool[])
ON CONFLICT DO NOTHING
RETURNING device_id, boot_id, seq
"""

_STREAMS_INSERT: Final = """
INSERT INTO ingest_streams (device_id, boot_id, first_seq, max_seq, batches, first_at, last_at)
SELECT d, b, f, m, n, t, t FROM unnest(
    %b::int4[], %b::uuid[], %b::int8[], %b::int8[], %b::int8[], %b::timestamptz[])
    AS u(d, b, f, m, n, t)
ON CONFLICT DO NOTHING
RETURNING device_id, boot_id
"""

_STREAMS_LOCK: Final = """
SELECT s.device_id, s.boot_id, s.max_seq
FROM ingest_streams s
JOIN unnest(%b::int4[], %b::uuid[]) AS u(d, b) ON s.device_id = u.d AND s.boot_id = u.b
ORDER BY s.device_id, s.boot_id
FOR UPDATE OF s
"""

_STREAMS_UPDATE: Final = """
UPDATE ingest_streams s SET
    first_seq = least(s.first_seq, u.f), max_seq = u.m, batches = s.batches + u.n,
    last_at = greatest(s.last_at, u.t)
FROM unnest(%b::int4[], %b::uuid[], %b::int8[], %b::int8[], %b::int8[], %b::timestamptz[])
    AS u(d, b, f, m, n, t)
WHERE s.device_id = u.d AND s.boot_id = u.b
"""

_GAPS_SELECT: Final = """
SELECT g.device_id, g.boot_id, g.seq_from, g.seq_to
FROM sequence_gaps g
JOIN unnest(%b::int4[], %b::uuid[]) AS u(d, b) ON g.device_id = u.d AND g.boot_id = u.b
"""

_GAPS_DELETE: Final = """
DELETE FROM sequence_gaps g
USING unnest(%b::int4[], %b::uuid[]) AS u(d, b)
WHERE g.device_id = u.d AND g.boot_id = u.b
"""

_GAPS_INSERT: Final = """
INSERT INTO sequence_gaps (device_id, boot_id, seq_from, seq_to, detected_at)
SELECT * FROM unnest(%b::int4[], %b::uuid[], %b::int8[], %b::int8[], %b::timestamptz[])
ON CONFLICT (device_id, boot_id, seq_from) DO UPDATE SET seq_to = excluded.seq_to
"""

_DEVICES_SEEN: Final = """
UPDATE devices d SET
    last_data_at = greatest(d.last_data_at, u.t),
    last_seen_at = greatest(d.last_seen_at, u.t)
FROM (SELECT * FROM unnest(%b::int4[], %b::timestamptz[]) AS u(id, t) ORDER BY id) AS u
WHERE d.id = u.id
"""

_DEAD_LETTER_COLUMNS: Final = (
    "received_at",
    "topic",
    "device",
    "code",
    "reason",
    "content_type",
    "payload",
    "payload_bytes",
)
_DEAD_LETTER_TYPES: Final = (
    "timestamptz",
    "text",
    "text",
    "text",
    "text",
    "text",
    "bytea",
    "int4",
)


def _clean_text(value: str | None, limit: int = DEAD_LETTER_TEXT_MAX_CHARS) -> str | None:
    """Text PostgreSQL can store: no NUL, no lone surrogates, bounded length."""
    if value is None:
        return None
    cleaned = value.replace("\x00", "\\x00")[:limit]
    return cleaned.encode("utf-8", "backslashreplace").decode("utf-8")


def write_dead_letters(cur: psycopg.Cursor[Any], letters: Sequence[DeadLetter]) -> None:
    """Store refused messages (payload capped) for the data-quality view."""
    if not letters:
        return
    rows = [
        (
            d.received_at,
            _clean_text(d.topic) or "",
            _clean_text(d.device),
            _clean_text(d.code) or "unknown",
            _clean_text(d.reason) or "",
            _clean_text(d.content_type),
            d.payload[:DEAD_LETTER_PAYLOAD_MAX_BYTES],
            len(d.payload),
        )
        for d in letters
    ]
    copy_rows(cur, "dead_letters", _DEAD_LETTER_COLUMNS, _DEAD_LETTER_TYPES, rows)


def _event_row(
    ts: datetime, device_id: int, metric_id: int, value: EventValue
) -> tuple[object, ...]:
    if isinstance(value, bool):
        return (ts, device_id, metric_id, "bool", 1.0 if value else 0.0, None)
    if isinstance(value, str):
        return (ts, device_id, metric_id, "text", None, value)
    return (ts, device_id, metric_id, "num", float(value), None)


class BatchWriter:
    """Writes validated batches; one instance per worker (it owns the id cache)."""

    def __init__(self) -> None:
        self.ids = IdCache()

    def prepare(self, conn: psycopg.Connection[Any], batches: Iterable[Batch]) -> None:
        """Make sure every device and metric of `batches` has an id (call outside the batch tx)."""
        devices: set[str] = set()
        metrics: set[str] = set()
        for batch in batches:
            devices.add(batch.device)
            metrics.update(w.metric for w in batch.windows)
            metrics.update(e.metric for e in batch.events)
        self.ids.ensure(conn, devices, metrics)

    def write(
        self,
        conn: psycopg.Connection[Any],
        incoming: Sequence[Incoming],
        *,
        report: Callable[[str], bool] | None = None,
    ) -> WriteResult:
        """Store `incoming` inside the caller's open transaction; duplicates are skipped.

        `report(metric)` says which stored windows to return, as (device, window), for the
        alert rules; None returns all. Most metrics have no rule: the engine skips them unseen.
        """
        unique: dict[Key, Incoming] = {}
        for item in incoming:
            b = item.batch
            unique.setdefault((b.device, b.boot_id, b.seq), item)
        with conn.cursor() as cur:
            claimed = self._claim(cur, unique)
            fresh = [unique[k] for k in sorted(claimed)]
            if not fresh:
                return WriteResult(0, len(incoming), 0, 0, 0, 0, (), frozenset())
            readings, events, hourly, stored = self._copy(cur, fresh, report)
            rollup_rows = rollups.write_rollups(cur, hourly)
            opened = self._streams(cur, fresh)
            self._devices_seen(cur, fresh)
        return WriteResult(
            stored_batches=len(fresh),
            duplicate_batches=len(incoming) - len(fresh),
            readings=readings,
            events=events,
            rollup_rows=rollup_rows,
            gaps_opened=opened,
            windows=tuple(stored),
            stored_keys=frozenset(claimed),
        )

    def _claim(self, cur: psycopg.Cursor[Any], unique: dict[Key, Incoming]) -> set[Key]:
        """Insert ledger rows; the keys that were new are ours to store."""
        keys = sorted(unique, key=lambda k: (self.ids.devices[k[0]], k[1], k[2]))
        batches = [unique[k].batch for k in keys]
        cur.execute(
            _LEDGER_INSERT,
            [
                [self.ids.devices[b.device] for b in batches],
                [uuid.UUID(hex=b.boot_id) for b in batches],
                [b.seq for b in batches],
                [to_datetime(b.sent_at_ms) for b in batches],
                [unique[k].received_at for k in keys],
                [len(b.windows) for b in batches],
                [len(b.events) for b in batches],
                [b.dropped for b in batches],
                [b.rejected for b in batches],
                [b.clock_synced for b in batches],
            ],
        )
        names = {v: k for k, v in self.ids.devices.items()}
        return {(names[d], boot.hex, seq) for d, boot, seq in cur.fetchall()}

    def _copy(
        self,
        cur: psycopg.Cursor[Any],
        fresh: list[Incoming],
        report: Callable[[str], bool] | None,
    ) -> tuple[int, int, dict[rollups.RollupKey, rollups.Accumulator], list[tuple[str, Window]]]:
        device_ids = self.ids.devices
        metric_ids = self.ids.metrics
        times: dict[int, datetime] = {}
        event_rows: list[tuple[object, ...]] = []
        hourly: dict[rollups.RollupKey, rollups.Accumulator] = {}
        add_hourly = rollups.add_hourly
        stored: list[tuple[str, Window]] = []

        def readings() -> Iterator[tuple[object, ...]]:
            """Rows for the COPY, built while it streams; rollups and alerts on the way."""
            for item in fresh:
                batch = item.batch
                device_id = device_ids[batch.device]
                for w in batch.windows:
                    ts = times.get(w.start_ms)
                    if ts is None:
                        ts = times[w.start_ms] = to_datetime(w.start_ms)
                    metric_id = metric_ids[w.metric]
                    add_hourly(hourly, device_id, metric_id, w)
                    if report is None or report(w.metric):
                        stored.append((batch.device, w))
                    yield (
                        ts, device_id, metric_id, w.period_s, w.count, w.sum, w.min, w.max,
                        w.first, w.last, w.sumsq, w.rejected,
                    )  # fmt: skip

        has_windows = any(item.batch.windows for item in fresh)
        reading_count = store_readings(cur, readings()) if has_windows else 0
        for item in fresh:
            device_id = device_ids[item.batch.device]
            for e in item.batch.events:
                event_rows.append(
                    _event_row(to_datetime(e.ts_ms), device_id, metric_ids[e.metric], e.value)
                )
        if event_rows:
            copy_rows(cur, "events", EVENT_COLUMNS, EVENT_TYPES, event_rows)
        return reading_count, len(event_rows), hourly, stored

    def _streams(self, cur: psycopg.Cursor[Any], fresh: list[Incoming]) -> int:
        """Advance each (device, boot_id) high-water mark and record gaps; returns gaps opened."""
        seqs: dict[tuple[int, uuid.UUID], list[int]] = defaultdict(list)
        last_at: dict[tuple[int, uuid.UUID], datetime] = {}
        for item in fresh:
            b = item.batch
            key = (self.ids.devices[b.device], uuid.UUID(hex=b.boot_id))
            seqs[key].append(b.seq)
            last_at[key] = max(last_at.get(key, item.received_at), item.received_at)
        keys = sorted(seqs)

        def columns(ks: list[tuple[int, uuid.UUID]], maxes: dict[object, int]) -> list[object]:
            return [
                [k[0] for k in ks],
                [k[1] for k in ks],
                [min(seqs[k]) for k in ks],
                [maxes[k] for k in ks],
                [len(seqs[k]) for k in ks],
                [last_at[k] for k in ks],
            ]

        updates: dict[tuple[int, uuid.UUID], gaps.StreamUpdate] = {
            k: gaps.advance(None, (), seqs[k]) for k in keys
        }
        cur.execute(_STREAMS_INSERT, columns(keys, {k: u.max_seq for k, u in updates.items()}))
        inserted = {(d, b) for d, b in cur.fetchall()}
        existing = [k for k in keys if k not in inserted]
        late: set[tuple[int, uuid.UUID]] = set()
        if existing:
            cur.execute(_STREAMS_LOCK, [[k[0] for k in existing], [k[1] for k in existing]])
            prev_max = {(d, b): m for d, b, m in cur.fetchall()}
            late = {k for k in existing if min(seqs[k]) <= prev_max[k]}
            open_gaps: dict[tuple[int, uuid.UUID], list[gaps.Gap]] = defaultdict(list)
            if late:
                ordered = sorted(late)
                cur.execute(_GAPS_SELECT, [[k[0] for k in ordered], [k[1] for k in ordered]])
                for device_id, boot, low, high in cur.fetchall():
                    open_gaps[(device_id, boot)].append((low, high))
            for k in existing:
                updates[k] = gaps.advance(prev_max[k], open_gaps.get(k, ()), seqs[k])
            cur.execute(
                _STREAMS_UPDATE, columns(existing, {k: updates[k].max_seq for k in existing})
            )
            # Streams whose stored gaps shrank: rewrite their gap rows from the new state.
            rewrite = sorted(k for k in late if updates[k].changed_gaps)
            if rewrite:
                cur.execute(_GAPS_DELETE, [[k[0] for k in rewrite], [k[1] for k in rewrite]])
        # Late streams hold all their gaps in the update, the others only the new ones.
        rows = [
            (k[0], k[1], low, high)
            for k in keys
            if updates[k].changed_gaps
            for low, high in updates[k].gaps
        ]
        opened = sum(u.opened for u in updates.values())
        if rows:
            now = max(last_at.values())
            cur.execute(
                _GAPS_INSERT,
                [
                    [r[0] for r in rows],
                    [r[1] for r in rows],
                    [r[2] for r in rows],
                    [r[3] for r in rows],
                    [now] * len(rows),
                ],
            )
        if opened:
            log.warning("sequence gaps opened=%s", opened)
        return opened

    def _devices_seen(self, cur: psycopg.Cursor[Any], fresh: list[Incoming]) -> None:
        seen: dict[int, datetime] = {}
        for item in fresh:
            device_id = self.ids.devices[item.batch.device]
            seen[device_id] = max(seen.get(device_id, item.received_at), item.received_at)
        ids = sorted(seen)
        cur.execute(_DEVICES_SEEN, [ids, [seen[i] for i in ids]])
