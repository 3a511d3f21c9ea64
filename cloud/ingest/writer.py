"""The batch writer: many MQTT batches, one database transaction, exactly once.

Inside the caller's transaction `BatchWriter.write` first claims each batch's
(device, boot_id, seq) in the ingest ledger (INSERT ... ON CONFLICT DO NOTHING
RETURNING); only the claimed ones are stored, so a redelivered batch is
skipped by the same commit that would have stored it twice. Rows go in with
binary COPY, hourly rollup partials with another (rollup_drain.py merges them into
the rollup tables later), then the sequence streams and gaps (streams.py), then
device freshness. Each step sends its keys sorted so
concurrent workers take row locks in one order (docs/guarantees.md).
"""

from __future__ import annotations

import dataclasses
import logging
import struct
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg
from psycopg.postgres import types as pg_types
from sqlalchemy import Table
from sqlalchemy.dialects import postgresql

from millrace import topics
from millrace.cloud import rollups
from millrace.cloud.ingest.idcache import IdCache
from millrace.cloud.ingest.letterlimit import DeadLetterLimiter
from millrace.cloud.ingest.limits import IngestLimits
from millrace.cloud.ingest.messages import DeadLetter, Incoming, Key, WriteResult
from millrace.cloud.ingest.metriccap import MetricCap
from millrace.cloud.ingest.streams import record_streams
from millrace.cloud.schema import core as schema
from millrace.wire import (
    CONTENT_TYPE_MSGPACK,
    Aggregate,
    Batch,
    EventValue,
    Window,
    encode_batch,
    merge_all,
)
from millrace.wire.aggregate import AGGREGATE_FIELDS, MERGE_RULES

log = logging.getLogger(__name__)

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# Dead-letter payloads are kept for diagnosis, not archived: cap what one hostile
# client can make us store.
DEAD_LETTER_PAYLOAD_MAX_BYTES: Final = 64 * 1024
DEAD_LETTER_TEXT_MAX_CHARS: Final = 2000
TOO_MANY_METRICS: Final = "too_many_metrics"


def copy_layout(table: Table, *, server_fills: Collection[str]) -> tuple[tuple[str, ...], ...]:
    """(column names, PostgreSQL type names) of a binary COPY into `table`, in table order.

    `server_fills` are the columns the server stamps itself (identities, now()).
    """
    dialect = postgresql.dialect()
    columns = [c for c in table.columns if c.name not in server_fills]
    names = tuple(c.name for c in columns)
    types = tuple(pg_types[c.type.compile(dialect=dialect).lower()].name for c in columns)
    return names, types


READING_COLUMNS, READING_TYPES = copy_layout(schema.readings, server_fills=("ingested_at",))
EVENT_COLUMNS, EVENT_TYPES = copy_layout(schema.events, server_fills=("ingested_at",))
_DEAD_LETTER_COLUMNS, _DEAD_LETTER_TYPES = copy_layout(schema.dead_letters, server_fills=("id",))
# A readings row is its key, then the window's aggregate: `_copy` builds rows in this order.
_READING_KEY: Final = ("ts", "device_id", "metric_id", "period_s")
if (*_READING_KEY, *AGGREGATE_FIELDS) != READING_COLUMNS:
    raise RuntimeError(
        f"readings columns {READING_COLUMNS} are not {_READING_KEY} + the window aggregate:"
        " update BatchWriter._copy and millrace.wire.aggregate together"
    )
_KEY_WIDTH: Final = len(_READING_KEY)


def to_datetime(ms: int) -> datetime:
    """Exact conversion of epoch milliseconds (float division would round)."""
    return _EPOCH + timedelta(milliseconds=ms)


def _merge_repeated_windows(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """One row per window key: rows sharing one are merged in order (earlier = earlier part)."""
    parts: dict[tuple[Any, ...], list[Aggregate]] = {}
    for row in rows:
        parts.setdefault(row[:_KEY_WIDTH], []).append(Aggregate(*row[_KEY_WIDTH:]))
    merged = ((key, merge_all(aggs)) for key, aggs in parts.items())
    return [(*key, *(getattr(agg, f) for f in AGGREGATE_FIELDS)) for key, agg in merged]


def store_readings(cur: psycopg.Cursor[Any], rows: Iterable[tuple[Any, ...]]) -> int:
    """COPY window rows; a window already stored in part is merged into, not refused.

    An agent stopped with SIGTERM closes its open windows early; after its restart the rest
    of such a window arrives under a new boot_id with the same (device, metric, ts, period).
    Both parts are real readings, so they merge like any two aggregates
    (`millrace.wire.Aggregate.merge`, the earlier part first). The fast
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
    _merge_readings(cur, kept)
    return len(kept)


def _merge_readings(cur: psycopg.Cursor[Any], rows: list[tuple[Any, ...]]) -> None:
    """Merge `rows` into the windows stored in part before (`store_readings`' slow path)."""
    log.info("merging %s window rows into windows stored in part before", len(rows))
    merged = rows
    if len({row[:_KEY_WIDTH] for row in rows}) != len(rows):
        merged = _merge_repeated_windows(rows)
    cur.execute(_MERGE_STAGING_CREATE)
    copy_rows(cur, "readings_merge", READING_COLUMNS, READING_TYPES, merged)
    cur.execute(_MERGE_INTO_READINGS)


# PostgreSQL's binary COPY format ("COPY", File Formats): a signature, flags and header
# extension length, then per row an int16 field count and per field an int32 length and the
# value in network order (timestamptz: int64 microseconds since 2000-01-01 UTC), then -1.
_COPY_SIGNATURE: Final = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER: Final = struct.pack(">h", -1)
_PG_EPOCH_MS: Final = 946_684_800_000
_BINARY_FORMATS: Final = {"timestamptz": "q", "int4": "i", "int8": "q", "float8": "d"}
# One readings row; `reading_chunks` passes each field's length before its value.
_READING_ROW: Final = struct.Struct(">h" + "".join(f"i{_BINARY_FORMATS[t]}" for t in READING_TYPES))
_ROWS_PER_CHUNK: Final = 256  # ~33 kB a chunk: psycopg's own COPY buffer is 32 kB


def reading_chunks(
    fresh: Sequence[Incoming],
    device_ids: Mapping[str, int],
    metric_ids: Mapping[str, int],
    hourly: rollups.Rollups,
    stored: list[tuple[str, Window]],
    report: Callable[[str], bool] | None,
) -> Iterator[bytes]:
    """The readings rows of `fresh` in binary COPY format (no signature, no trailer).

    Each window goes into `hourly` (`rollups.add_hourly`) and, if `report(metric)`, into
    `stored` on the way. One struct per row instead of a row tuple through psycopg's
    `write_row` takes a fifth off the committer's CPU (issue 18);
    tests/cloud/test_writer_copy.py holds the bytes equal to psycopg's.
    """
    add_hourly = rollups.add_hourly  # looked up per call: bench/ingest.py swaps it out
    pack_into, size = _READING_ROW.pack_into, _READING_ROW.size
    chunk = bytearray(size * _ROWS_PER_CHUNK)
    end, at = len(chunk), 0
    fields = len(READING_TYPES)
    for item in fresh:
        batch = item.batch
        device_id = device_ids[batch.device]
        for w in batch.windows:
            metric_id = metric_ids[w.metric]
            add_hourly(hourly, device_id, metric_id, w)
            if report is None or report(w.metric):
                stored.append((batch.device, w))
            # READING_COLUMNS' order, each value after its length in bytes.
            pack_into(
                chunk, at, fields, 8, (w.start_ms - _PG_EPOCH_MS) * 1000, 4, device_id,
                4, metric_id, 4, w.period_s, 8, w.count, 8, w.sum, 8, w.min, 8, w.max,
                8, w.first, 8, w.last, 8, w.sumsq, 4, w.rejected,
            )  # fmt: skip
            at += size
            if at == end:
                yield bytes(chunk)
                at = 0
    if at:
        yield bytes(chunk[:at])


def _reading_rows(
    fresh: Sequence[Incoming], device_ids: Mapping[str, int], metric_ids: Mapping[str, int]
) -> list[tuple[Any, ...]]:
    """The rows `reading_chunks` encodes, as tuples (for the merge, which is rare)."""
    rows: list[tuple[Any, ...]] = []
    for item in fresh:
        device_id = device_ids[item.batch.device]
        for w in item.batch.windows:
            key = (to_datetime(w.start_ms), device_id, metric_ids[w.metric], w.period_s)
            rows.append((*key, w.count, w.sum, w.min, w.max, w.first, w.last, w.sumsq, w.rejected))
    return rows


def _store_chunks(cur: psycopg.Cursor[Any], chunks: Iterator[bytes]) -> bool:
    """COPY `chunks` into readings; False (and `chunks` run out) on a window stored before."""
    try:
        # A savepoint: a conflict undoes only the COPY.
        with cur.connection.transaction(), cur.copy(_COPY_READINGS) as copy:
            copy.write(_COPY_SIGNATURE)
            for chunk in chunks:
                copy.write(chunk)
            copy.write(_COPY_TRAILER)
        return True
    except psycopg.errors.UniqueViolation:
        for _ in chunks:  # the windows the COPY had not taken yet still go into the rollups
            pass
        return False


def _merge_into_readings() -> str:
    """The upsert that merges staged rows into stored ones: the contract's merge rules."""
    by_rule = {
        "add": "{c} = r.{c} + excluded.{c}",
        "least": "{c} = least(r.{c}, excluded.{c})",
        "greatest": "{c} = greatest(r.{c}, excluded.{c})",
        "later": "{c} = excluded.{c}",
    }  # "earlier": the stored part came first, its value stays
    sets = [by_rule[rule].format(c=c) for c, rule in MERGE_RULES.items() if rule != "earlier"]
    key = ", ".join(c.name for c in schema.readings.primary_key.columns)
    columns = ", ".join(READING_COLUMNS)
    return f"""
INSERT INTO readings AS r ({columns})
SELECT {columns} FROM readings_merge ORDER BY {key}
ON CONFLICT ({key}) DO UPDATE SET {", ".join(sets)}
"""


_MERGE_STAGING_CREATE: Final = """
CREATE TEMP TABLE IF NOT EXISTS readings_merge
    (LIKE readings INCLUDING DEFAULTS) ON COMMIT DELETE ROWS
"""
_MERGE_INTO_READINGS: Final = _merge_into_readings()


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


_COPY_READINGS: Final = psycopg.sql.SQL("COPY readings ({}) FROM STDIN (FORMAT BINARY)").format(
    psycopg.sql.SQL(", ").join(map(psycopg.sql.Identifier, READING_COLUMNS))
)


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

_DEVICES_SEEN: Final = """
UPDATE devices d SET
    last_data_at = greatest(d.last_data_at, u.t),
    last_seen_at = greatest(d.last_seen_at, u.t)
FROM (SELECT * FROM unnest(%b::int4[], %b::timestamptz[]) AS u(id, t) ORDER BY id) AS u
WHERE d.id = u.id
"""


def _clean_text(value: str | None, limit: int = DEAD_LETTER_TEXT_MAX_CHARS) -> str | None:
    """Text PostgreSQL can store: no NUL, no lone surrogates, bounded length."""
    if value is None:
        return None
    cleaned = value.replace("\x00", "\\x00")[:limit]
    return cleaned.encode("utf-8", "backslashreplace").decode("utf-8")


_OVERFLOW_UPSERT: Final = """
INSERT INTO dead_letter_overflow AS o (device, suppressed, first_at, last_at)
SELECT d, n, t, t FROM unnest(%b::text[], %b::int8[], %b::timestamptz[]) AS u(d, n, t)
ORDER BY d
ON CONFLICT (device) DO UPDATE SET
    suppressed = o.suppressed + excluded.suppressed, last_at = greatest(o.last_at, excluded.last_at)
"""


def write_dead_letters(
    cur: psycopg.Cursor[Any],
    letters: Sequence[DeadLetter],
    *,
    limiter: DeadLetterLimiter | None = None,
) -> int:
    """Store refused messages (payload capped) for the data-quality view.

    With a `limiter`, letters over their device's rate are only counted, per device, in
    `dead_letter_overflow`. Returns how many letters were suppressed.
    """
    suppressed: dict[str, int] = {}
    if limiter is not None and letters:
        last = {d.device or "": d.received_at for d in letters}
        letters, suppressed = limiter.admit(letters)
        if suppressed:
            devices = sorted(suppressed)
            cur.execute(
                _OVERFLOW_UPSERT,
                [devices, [suppressed[d] for d in devices], [last[d] for d in devices]],
            )
            log.warning("dead letters over their rate, counted not stored: %s", suppressed)
    if not letters:
        return sum(suppressed.values())
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
    return sum(suppressed.values())


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

    def __init__(
        self,
        limits: IngestLimits | None = None,
        *,
        letters: DeadLetterLimiter | None = None,
        on_suppressed: Callable[[int], object] | None = None,
    ) -> None:
        """`on_suppressed(n)` hears of dead letters over their rate (the worker's counter)."""
        limits = limits or IngestLimits()
        self.ids = IdCache(limits.id_cache_names)
        self.max_gaps = limits.max_gaps_per_stream
        self.cap = MetricCap(limits.max_metrics_per_device)
        self.letters = letters or DeadLetterLimiter(
            per_minute=limits.dead_letters_per_minute,
            burst=limits.dead_letter_burst,
            on_suppressed=on_suppressed,
        )

    def prepare(self, conn: psycopg.Connection[Any], batches: Iterable[Batch]) -> None:
        """Give every device and metric of `batches` an id and decide the per-device metric
        cap for them (call outside the batch transaction)."""
        names: dict[str, set[str]] = {}
        for batch in batches:
            metrics = names.setdefault(batch.device, set())
            metrics.update(w.metric for w in batch.windows)
            metrics.update(e.metric for e in batch.events)
        self.ids.ensure(conn, set(names), set().union(*names.values()) if names else set())
        devices, metric_ids = self.ids.devices, self.ids.metrics
        self.cap.check(
            conn, {devices[d]: {metric_ids[m] for m in ms} for d, ms in names.items() if ms}
        )

    def write_dead_letters(self, cur: psycopg.Cursor[Any], letters: Sequence[DeadLetter]) -> int:
        """`write_dead_letters` with this worker's per-device rate limit; returns suppressed."""
        return write_dead_letters(cur, letters, limiter=self.letters)

    def _over_cap(self, item: Incoming) -> tuple[Incoming, DeadLetter | None]:
        """`item` without the windows and events of metrics over its device's cap, and a dead
        letter holding those (None when all may be stored)."""
        b = item.batch
        device_id, metric_ids, admitted = self.ids.devices[b.device], self.ids.metrics, self.cap
        if device_id not in admitted.refusing:
            return item, None  # the common case: one set lookup per batch
        if all(admitted.admitted((device_id, metric_ids[w.metric])) for w in b.windows) and all(
            admitted.admitted((device_id, metric_ids[e.metric])) for e in b.events
        ):
            return item, None
        split: dict[bool, Any] = {True: ([], []), False: ([], [])}
        for w in b.windows:
            split[admitted.admitted((device_id, metric_ids[w.metric]))][0].append(w)
        for e in b.events:
            split[admitted.admitted((device_id, metric_ids[e.metric]))][1].append(e)
        refused = dataclasses.replace(
            b, windows=tuple(split[False][0]), events=tuple(split[False][1])
        )
        kept = dataclasses.replace(b, windows=tuple(split[True][0]), events=tuple(split[True][1]))
        metrics = sorted({w.metric for w in refused.windows} | {e.metric for e in refused.events})
        letter = DeadLetter(
            topic=topics.data_topic(b.device),
            device=b.device,
            code=TOO_MANY_METRICS,
            reason=(
                f"device {b.device!r} already has {self.cap.limit} metrics (the cap):"
                f" {len(metrics)} refused: {', '.join(map(repr, metrics[:20]))}"
            ),
            content_type=CONTENT_TYPE_MSGPACK,
            payload=encode_batch(refused),
            received_at=item.received_at,
        )
        return Incoming(kept, item.received_at), letter

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
        over_cap: dict[Key, DeadLetter] = {}
        for item in incoming:
            b = item.batch
            key = (b.device, b.boot_id, b.seq)
            if key not in unique:
                unique[key], letter = self._over_cap(item)
                if letter is not None:
                    over_cap[key] = letter
        with conn.cursor() as cur:
            claimed = self._claim(cur, unique)
            fresh = [unique[k] for k in sorted(claimed)]
            if not fresh:
                return WriteResult(0, len(incoming), 0, 0, 0, 0, (), frozenset())
            # Only a batch stored now files its refused metrics: a redelivery files nothing.
            refused = [over_cap[k] for k in sorted(claimed) if k in over_cap]
            self.write_dead_letters(cur, refused)
            readings, events, hourly, stored = self._copy(cur, fresh, report)
            rollup_rows = rollups.copy_pending(cur, hourly)
            gaps = record_streams(cur, self.ids.devices, fresh, max_gaps=self.max_gaps)
            self._devices_seen(cur, fresh)
        return WriteResult(
            stored_batches=len(fresh),
            duplicate_batches=len(incoming) - len(fresh),
            readings=readings,
            events=events,
            rollup_rows=rollup_rows,
            gaps_opened=gaps.opened,
            windows=tuple(stored),
            stored_keys=frozenset(claimed),
            gaps_dropped=gaps.dropped,
            metrics_refused=len(refused),
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
        names = {self.ids.devices[k[0]]: k[0] for k in keys}  # not the whole cache
        return {(names[d], boot.hex, seq) for d, boot, seq in cur.fetchall()}

    def _copy(
        self,
        cur: psycopg.Cursor[Any],
        fresh: list[Incoming],
        report: Callable[[str], bool] | None,
    ) -> tuple[int, int, rollups.Rollups, list[tuple[str, Window]]]:
        device_ids = self.ids.devices
        metric_ids = self.ids.metrics
        event_rows: list[tuple[object, ...]] = []
        hourly: rollups.Rollups = {}
        stored: list[tuple[str, Window]] = []
        reading_count = sum(len(item.batch.windows) for item in fresh)
        if reading_count:
            chunks = reading_chunks(fresh, device_ids, metric_ids, hourly, stored, report)
            if not _store_chunks(cur, chunks):
                _merge_readings(cur, _reading_rows(fresh, device_ids, metric_ids))
        for item in fresh:
            device_id = device_ids[item.batch.device]
            for e in item.batch.events:
                event_rows.append(
                    _event_row(to_datetime(e.ts_ms), device_id, metric_ids[e.metric], e.value)
                )
        if event_rows:
            copy_rows(cur, "events", EVENT_COLUMNS, EVENT_TYPES, event_rows)
        return reading_count, len(event_rows), hourly, stored

    def _devices_seen(self, cur: psycopg.Cursor[Any], fresh: list[Incoming]) -> None:
        seen: dict[int, datetime] = {}
        for item in fresh:
            device_id = self.ids.devices[item.batch.device]
            seen[device_id] = max(seen.get(device_id, item.received_at), item.received_at)
        ids = sorted(seen)
        cur.execute(_DEVICES_SEEN, [ids, [seen[i] for i in ids]])
