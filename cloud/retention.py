"""Retention on a schedule: drop old chunks (both TimescaleDB editions), compress where licensed.

The Apache-2 build of TimescaleDB (what Debian ships and CI runs) has
`drop_chunks` but no retention or compression policies, so millrace runs its
own schedule: `RetentionScheduler` calls `run_retention` every interval.
Hypertables lose whole chunks once a chunk's *entire* range is older than the
age (so data up to one chunk interval older than the age may remain); plain
tables lose rows by DELETE. Where `SHOW timescaledb.license` says `timescale`,
`enable_compression_if_available` also compresses chunks past a (shorter) age;
on the Apache edition it reports "not available" and does nothing, and the
schedule packs windows past `pack_after_days` instead (cloud/packing.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final

import psycopg
from psycopg import sql

from millrace.cloud.dbupgrade import DROP_CHUNKS_FUNCTION
from millrace.cloud.packing import (
    DEFAULT_PACK_AFTER_DAYS,
    PackReport,
    pack_windows,
    storage_at_rest,
)
from millrace.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_AGES_DAYS: Final[Mapping[str, float]] = MappingProxyType(
    {
        "readings": 90,
        "events": 365,
        "rollup_hourly": 2 * 365,
        "rollup_daily": 10 * 365,
        "dead_letters": 30,
        "ingest_ledger": 30,
        # Sequence bookkeeping: a boot silent this long is over, a gap this old is history.
        "ingest_streams": 30,
        "sequence_gaps": 30,
        # Holes left by unclean ends: few rows, and the history of what was lost.
        "data_holes": 365,
        "device_health_history": 30,
        # Alert notifications sent or given up (cloud/alerts/notify.py); pending ones stay.
        "notifications": 90,
        # Broker moves and database primary changes (the Redundancy page's history).
        "ops_events": 365,
    }
)
# Chunks this old are compressed where the Timescale edition allows: a week keeps the
# chunks late backlog may still write to uncompressed.
DEFAULT_COMPRESS_AFTER_DAYS: Final[Mapping[str, float]] = MappingProxyType(
    {
        "readings": 7,
        "events": 7,
        "rollup_hourly": 60,
        "device_health_history": 7,
    }
)
# Once an hour is plenty for ages counted in days; the first run waits a minute so a
# starting worker gets to its backlog first.
DEFAULT_INTERVAL_SECONDS: Final = 3600.0
DEFAULT_FIRST_DELAY_SECONDS: Final = 60.0
# Dropping a chunk needs an exclusive lock on it: wait briefly, then try next time
# rather than stall ingest behind us.
LOCK_TIMEOUT: Final = "5s"
# One scheduler at a time across all workers (pg_try_advisory_lock key: "millrace" + 1).
ADVISORY_LOCK_KEY: Final = 0x6D696C6C72616301
_SET_LOCK_TIMEOUT: Final = sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT))


@dataclass(frozen=True, slots=True)
class PlainTableRule:
    """How retention deletes rows from a table that is not a hypertable."""

    time_column: str
    extra_condition: str = ""  # a fixed SQL predicate; only constants from this module


# Plain tables retention knows; hypertables are found in the catalog at run time, so a
# table works either way. Alerts and the audit log are kept unless an age is configured.
RETAINED_TABLES: Final[Mapping[str, PlainTableRule]] = MappingProxyType(
    {
        "ingest_ledger": PlainTableRule("received_at"),
        # Both keep ingest_streams.open_gaps true: see _delete_streams and _delete_gaps.
        "ingest_streams": PlainTableRule("last_at"),
        "sequence_gaps": PlainTableRule("detected_at"),
        "data_holes": PlainTableRule("recorded_at"),
        "alerts": PlainTableRule("raised_at", "state = 'cleared'"),
        "notifications": PlainTableRule("created_at", "state <> 'pending'"),
        "audit_log": PlainTableRule("at"),
        "dead_letters": PlainTableRule("received_at"),
        "device_health_history": PlainTableRule("received_at"),
        "ops_events": PlainTableRule("at"),
        "readings": PlainTableRule("ts"),
        "events": PlainTableRule("ts"),
        "rollup_hourly": PlainTableRule("bucket"),
        "rollup_daily": PlainTableRule("bucket"),
    }
)

# Tables holding the same data in another form go with it, at its age: the packed
# windows are readings (cloud/packing.py).
FOLLOWERS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {"readings": ("readings_packed",)}
)

# (segment by, order by) for compressed chunks: the dashboard reads one device and
# metric over a range, so segments per (device, metric) ordered by time decompress least.
COMPRESSION_SETTINGS: Final[Mapping[str, tuple[str, str]]] = MappingProxyType(
    {
        "readings": ("device_id, metric_id", "ts DESC, period_s"),
        "events": ("device_id, metric_id", "ts DESC"),
        "rollup_hourly": ("device_id, metric_id", "bucket DESC"),
        "rollup_daily": ("device_id, metric_id", "bucket DESC"),
        "device_health_history": ("device_id", "received_at DESC"),
    }
)


def _check_ages(ages: Mapping[str, float], key: str) -> dict[str, float]:
    checked: dict[str, float] = {}
    for table, days in ages.items():
        if table not in RETAINED_TABLES:
            known = ", ".join(sorted(RETAINED_TABLES))
            raise ConfigError(f"{key}.{table}", f"unknown table; one of {known}")
        if isinstance(days, bool) or not isinstance(days, int | float) or not days > 0:
            raise ConfigError(f"{key}.{table}", f"expected a number of days > 0, got {days!r}")
        checked[table] = float(days)
    return checked


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long each table keeps data (days); tables not named are kept forever.

    `pack_after_days`: `readings` chunks that ended this long ago are packed on the
    Apache edition (cloud/packing.py); None leaves them in `readings`.
    """

    ages_days: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_AGES_DAYS))
    compress_after_days: Mapping[str, float] = field(
        default_factory=lambda: dict(DEFAULT_COMPRESS_AFTER_DAYS)
    )
    pack_after_days: float | None = DEFAULT_PACK_AFTER_DAYS

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "ages_days", MappingProxyType(_check_ages(self.ages_days, "retention"))
        )
        compress = _check_ages(self.compress_after_days, "compression")
        for table in compress:
            if table not in COMPRESSION_SETTINGS:
                raise ConfigError(f"compression.{table}", "compression is not set up for it")
        object.__setattr__(self, "compress_after_days", MappingProxyType(compress))
        days = self.pack_after_days
        if days is not None and (
            isinstance(days, bool) or not isinstance(days, int | float) or not days > 0
        ):
            raise ConfigError(
                "retention.pack_after_days", f"expected a number of days > 0, got {days!r}"
            )

    @classmethod
    def from_days(cls, ages_days: Mapping[str, float], **kw: Any) -> RetentionPolicy:
        """A policy from the ingest config's `[retention]` table (table = days)."""
        return cls(ages_days=dict(ages_days), **kw)

    def cutoff(self, table: str, now: datetime) -> datetime:
        """Rows of `table` older than this are dropped."""
        return now - timedelta(days=self.ages_days[table])


def _hypertables(conn: psycopg.Connection[Any]) -> set[str]:
    rows = conn.execute(
        "SELECT hypertable_name FROM timescaledb_information.hypertables"
        " WHERE hypertable_schema = current_schema()"
    ).fetchall()
    return {r[0] for r in rows}


def _existing_tables(conn: psycopg.Connection[Any]) -> set[str]:
    # pg_tables, not information_schema: the retention role holds no privilege on the
    # hypertables it prunes through the drop_chunks wrapper, and information_schema hides them.
    rows = conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
    ).fetchall()
    return {r[0] for r in rows}


def run_retention(
    conn: psycopg.Connection[Any], policy: RetentionPolicy, *, now: datetime | None = None
) -> dict[str, int]:
    """Apply the policy once: {table: chunks dropped (hypertables) or rows deleted (plain)}.

    A table's followers (`FOLLOWERS`) are pruned at its age and counted in its figure.
    Each table is its own transaction (a savepoint if the caller holds one), so a
    lock timeout on one table skips only that table (logged; retried next run).
    """
    now = now or datetime.now(UTC)
    hypertables = _hypertables(conn)
    existing = _existing_tables(conn)
    done: dict[str, int] = {}
    for source in sorted(policy.ages_days):
        cutoff = policy.cutoff(source, now)
        for table in (source, *FOLLOWERS.get(source, ())):
            if table not in existing:
                logger.debug("retention: table %s does not exist, skipped", table)
                continue
            try:
                n = _prune(conn, table, cutoff, hypertable=table in hypertables)
            except psycopg.errors.LockNotAvailable:
                logger.warning("retention: %s is busy (lock timeout), retried next run", table)
                continue
            done[source] = done.get(source, 0) + n
            if n:
                logger.info("retention: %s dropped %s older than %s", table, n, cutoff)
    return done


def _prune(conn: psycopg.Connection[Any], table: str, cutoff: datetime, *, hypertable: bool) -> int:
    """One table in its own transaction: chunks dropped (hypertable) or rows deleted."""
    with conn.transaction():
        conn.execute(_SET_LOCK_TIMEOUT)
        if not hypertable:
            return _delete_rows(conn, table, cutoff)
        # The owner-only drop_chunks, through db upgrade's wrapper (least privilege).
        cur = conn.execute(
            sql.SQL("SELECT {}(%s::regclass, %s)").format(sql.Identifier(DROP_CHUNKS_FUNCTION)),
            (table, cutoff),
        )
        row = cur.fetchone()
        return int(row[0]) if row else 0


# Stream rows are locked first, in key order, as the ingest writer locks them
# (cloud/ingest/streams.py), so retention and ingest never wait on each other in a cycle.
_LOCK_OLD_STREAMS: Final = """
SELECT device_id, boot_id FROM ingest_streams WHERE last_at < %s
ORDER BY device_id, boot_id FOR UPDATE
"""
_DELETE_GAPS_OF_OLD_STREAMS: Final = """
DELETE FROM sequence_gaps g USING ingest_streams s
WHERE s.last_at < %s AND g.device_id = s.device_id AND g.boot_id = s.boot_id
"""
_LOCK_STREAMS_WITH_OLD_GAPS: Final = """
SELECT s.device_id, s.boot_id FROM ingest_streams s
WHERE EXISTS (SELECT 1 FROM sequence_gaps g
              WHERE g.device_id = s.device_id AND g.boot_id = s.boot_id AND g.detected_at < %s)
ORDER BY s.device_id, s.boot_id FOR UPDATE OF s
"""
_DELETE_OLD_GAPS: Final = """
WITH gone AS (
    DELETE FROM sequence_gaps WHERE detected_at < %s RETURNING device_id, boot_id
), per_stream AS (
    SELECT device_id, boot_id, count(*) AS n FROM gone GROUP BY device_id, boot_id
), recounted AS (
    UPDATE ingest_streams s SET open_gaps = greatest(s.open_gaps - p.n, 0)
    FROM per_stream p WHERE s.device_id = p.device_id AND s.boot_id = p.boot_id
)
SELECT count(*) FROM gone
"""


def _delete_streams(conn: psycopg.Connection[Any], cutoff: datetime) -> int:
    """Streams (boots) silent since `cutoff`, with their gaps: a gap never outlives its stream."""
    conn.execute(_LOCK_OLD_STREAMS, (cutoff,))
    conn.execute(_DELETE_GAPS_OF_OLD_STREAMS, (cutoff,))
    return conn.execute("DELETE FROM ingest_streams WHERE last_at < %s", (cutoff,)).rowcount


def _delete_gaps(conn: psycopg.Connection[Any], cutoff: datetime) -> int:
    """Gaps detected before `cutoff`; their streams' `open_gaps` counts go down with them."""
    conn.execute(_LOCK_STREAMS_WITH_OLD_GAPS, (cutoff,))
    row = conn.execute(_DELETE_OLD_GAPS, (cutoff,)).fetchone()
    return int(row[0]) if row else 0


def _delete_rows(conn: psycopg.Connection[Any], table: str, cutoff: datetime) -> int:
    if table == "ingest_streams":
        return _delete_streams(conn, cutoff)
    if table == "sequence_gaps":
        return _delete_gaps(conn, cutoff)
    rule = RETAINED_TABLES[table]
    predicate = sql.SQL("{} < %s").format(sql.Identifier(rule.time_column))
    if rule.extra_condition:
        predicate = sql.SQL("{} AND ({})").format(predicate, sql.SQL(rule.extra_condition))
    cur = conn.execute(
        sql.SQL("DELETE FROM {} WHERE {}").format(sql.Identifier(table), predicate), (cutoff,)
    )
    return cur.rowcount


# --- compression (Timescale License edition only) --------------------------------------


@dataclass(frozen=True, slots=True)
class CompressionReport:
    """What compression did: `available` false (with the reason) on the Apache edition."""

    available: bool
    license: str
    reason: str = ""
    compressed_chunks: Mapping[str, int] = field(default_factory=dict)


def timescale_license(conn: psycopg.Connection[Any]) -> str:
    """The running TimescaleDB's `timescaledb.license` ("apache" or "timescale")."""
    row = conn.execute("SHOW timescaledb.license").fetchone()
    return str(row[0]) if row else ""


def enable_compression_if_available(
    conn: psycopg.Connection[Any], policy: RetentionPolicy, *, now: datetime | None = None
) -> CompressionReport:
    """Where licensed, turn compression on and compress chunks past their age; else report why not.

    Idempotent: settings are only set on tables not yet compressed, and chunks
    already compressed are skipped.
    """
    license_name = timescale_license(conn)
    if license_name != "timescale":
        reason = (
            f"timescaledb.license is {license_name!r}: compression needs the Timescale "
            "License edition (the Apache-2 build has hypertables and drop_chunks only)"
        )
        logger.info("compression not available: %s", reason)
        return CompressionReport(False, license_name, reason)
    now = now or datetime.now(UTC)
    hypertables = _hypertables(conn)
    enabled = {
        r[0]
        for r in conn.execute(
            "SELECT hypertable_name FROM timescaledb_information.hypertables"
            " WHERE hypertable_schema = current_schema() AND compression_enabled"
        ).fetchall()
    }
    compressed: dict[str, int] = {}
    for table, days in sorted(policy.compress_after_days.items()):
        if table not in hypertables:
            continue
        segment_by, order_by = COMPRESSION_SETTINGS[table]
        with conn.transaction():
            if table not in enabled:
                conn.execute(
                    sql.SQL(
                        "ALTER TABLE {} SET (timescaledb.compress,"
                        " timescaledb.compress_segmentby = {}, timescaledb.compress_orderby = {})"
                    ).format(sql.Identifier(table), sql.Literal(segment_by), sql.Literal(order_by))
                )
            row = conn.execute(
                "SELECT count(compress_chunk(format('%%I.%%I', chunk_schema, chunk_name)::regclass,"
                "                            if_not_compressed => true))"
                "  FROM timescaledb_information.chunks"
                " WHERE hypertable_schema = current_schema() AND hypertable_name = %s"
                "   AND NOT is_compressed AND range_end < %s",
                (table, now - timedelta(days=days)),
            ).fetchone()
        compressed[table] = int(row[0]) if row else 0
    return CompressionReport(True, license_name, "", compressed)


# --- the schedule ------------------------------------------------------------------------


class RetentionScheduler:
    """A daemon thread running retention (and compression, where licensed) every interval.

    `connect` opens a fresh connection per run (autocommit is set here), so a
    database restart between runs costs nothing. Across workers, a session
    advisory lock lets one run at a time; the others skip that round.
    """

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection[Any]],
        policy: RetentionPolicy,
        *,
        interval_s: float = DEFAULT_INTERVAL_SECONDS,
        first_delay_s: float = DEFAULT_FIRST_DELAY_SECONDS,
        compress: bool = True,
    ) -> None:
        if interval_s <= 0 or first_delay_s < 0:
            raise ConfigError("retention.interval_s", "must be > 0 (first delay >= 0)")
        self._connect = connect
        self._policy = policy
        self._interval_s = interval_s
        self._first_delay_s = first_delay_s
        self._compress = compress
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.runs = 0
        self.last_result: dict[str, int] | None = None
        self.last_compression: CompressionReport | None = None
        self.last_packing: PackReport | None = None
        self.last_error: str | None = None

    def start(self) -> None:
        """Start the thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="millrace-retention", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the thread to stop and wait for it (a run in progress finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _loop(self) -> None:
        delay = self._first_delay_s
        while not self._stop.wait(delay):
            self.run_once()
            delay = self._interval_s

    def run_once(self) -> dict[str, int] | None:
        """One round now; None when another worker holds the lock or the database failed."""
        try:
            with self._connect() as conn:
                conn.autocommit = True
                got = conn.execute("SELECT pg_try_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
                row = got.fetchone()
                if not (row and row[0]):
                    logger.debug("retention: another worker is running it; skipped")
                    return None
                try:
                    result = run_retention(conn, self._policy)
                    self.last_packing = self._pack(conn)
                    if self._compress:
                        self.last_compression = enable_compression_if_available(conn, self._policy)
                finally:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
        except psycopg.Error as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            logger.warning("retention run failed (retried next interval): %s", self.last_error)
            return None
        self.runs += 1
        self.last_result = result
        self.last_error = None
        return result

    def _pack(self, conn: psycopg.Connection[Any]) -> PackReport | None:
        """Pack old windows on the Apache edition; where licensed, compression does it."""
        days = self._policy.pack_after_days
        if days is None or storage_at_rest(timescale_license(conn)) != "pack":
            return None
        older_than = datetime.now(UTC) - timedelta(days=days)
        return pack_windows(conn, older_than=older_than, should_stop=self._stop.is_set)
