"""The durable outbox: batches wait in SQLite (WAL) until the cloud receipts them.

One transaction per flush, one per group of acknowledgements; nothing per
reading (SD cards wear out). Ids only grow (AUTOINCREMENT), so the publisher
can walk the queue with a cursor and resend in order after a restart. Caps
in bytes and age drop the oldest batches first and count every drop in the
same transaction, so the count survives a crash. Only a corrupt file is moved
aside (its batches counted as dropped); a locked or unreadable one stops the
start-up instead, so nothing is discarded that a restart could still send.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from millrace.edge.batching import Encoded
from millrace.errors import MillraceError

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    boot_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    encoding TEXT NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL,
    UNIQUE (boot_id, seq)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS closed (metric TEXT PRIMARY KEY, end_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    boot_id TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    floor_ms INTEGER NOT NULL,
    clean INTEGER NOT NULL
);
"""
# The end of the last window closed per metric only moves forward, in the flush's own
# transaction: it is durable exactly when the windows are.
_CLOSED = (
    "INSERT INTO closed (metric, end_ms) VALUES (?, ?)"
    " ON CONFLICT (metric) DO UPDATE SET end_ms = max(end_ms, excluded.end_ms)"
)
_INSERT = (
    "INSERT INTO batches (boot_id, seq, created_ms, encoding, size, payload)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
# Busy waits only happen when another process (e.g. `edge check`, an operator's sqlite3)
# holds the file.
BUSY_TIMEOUT_SECONDS = 5.0
# A lock still held after this fails the start-up (systemd restarts the agent) instead of
# the file being taken for corrupt; well inside systemd's default 90 s start timeout.
OPEN_LOCKED_MAX_WAIT_SECONDS = 30.0
# Pause between attempts to open a locked outbox, doubling up to the cap.
OPEN_RETRY_FIRST_SECONDS = 0.1
OPEN_RETRY_MAX_SECONDS = 2.0
# Primary result codes (the low byte of extended ones such as SQLITE_CORRUPT_INDEX).
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


@dataclass(frozen=True, slots=True)
class Row:
    """A stored batch as the publisher needs it."""

    id: int
    boot_id: str
    seq: int
    encoding: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class PreviousRun:
    """What the outbox knew of the agent run before this one (`Outbox.begin_run`).

    `clean` is False after a power cut, a watchdog kill or SIGKILL: the run never reached
    its orderly stop. `closed_ms` is, per metric, the end of the last window durably in
    the outbox (from that run or an earlier one), never before `floor_ms`: the start of
    the first run after the last clean stop, before which nothing was lost.
    """

    boot_id: str
    started_ms: int
    clean: bool
    closed_ms: dict[str, int]


@dataclass(frozen=True, slots=True)
class OutboxStats:
    batches: int
    bytes: int
    oldest_age_s: float
    dropped_total: int


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)  # absent on errors raised by the module
    return None if code is None else code & 0xFF


def _salvage_counts(path: Path) -> tuple[int, int]:
    """(batches, dropped) of a corrupt outbox, read-only and as far as it can be read.

    Batches that cannot all be counted are at least the readable ones and at least one:
    an overstated loss is found and checked, a silent one is not.
    """
    batches, complete, dropped = 0, False, 0
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return 1, 0
    with contextlib.closing(db):
        with contextlib.suppress(sqlite3.Error):
            row = db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
            dropped = int(row[0]) if row else 0
        try:
            batches, complete = db.execute("SELECT count(*) FROM batches").fetchone()[0], True
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                for _ in db.execute("SELECT id FROM batches"):
                    batches += 1
    return (batches if complete else max(batches, 1)), dropped


class Outbox:
    """SQLite-backed FIFO of encoded batches, capped by bytes and age."""

    def __init__(self, path: Path | str, *, max_bytes: int, max_age_s: float) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age_ms = int(max_age_s * 1000)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._count = self._bytes = self._dropped = 0
        self._db = self._open()
        # Batches that could not even be written (disk full): counted, never persisted.
        self._lost_unwritten = 0

    def _open(self) -> sqlite3.Connection:
        """Connect; wait out a lock, move a corrupt file aside (counted), refuse anything else."""
        deadline = time.monotonic() + OPEN_LOCKED_MAX_WAIT_SECONDS
        pause = OPEN_RETRY_FIRST_SECONDS
        carried: int | None = None  # dropped count carried over from a corrupt file
        while True:
            try:
                db = self._connect()
            except sqlite3.Error as exc:
                code = _primary_code(exc)
                if code in _CORRUPT_CODES and carried is None:
                    carried = self._move_aside(exc)
                    continue
                if code in _BUSY_CODES:
                    if time.monotonic() + pause > deadline:
                        raise MillraceError(
                            f"outbox {self.path} is locked by another process"
                            f" (waited {OPEN_LOCKED_MAX_WAIT_SECONDS:g} s); not starting,"
                            " nothing in it was discarded"
                        ) from exc
                    log.warning(
                        "outbox %s is locked (%s); retrying in %.1f s", self.path, exc, pause
                    )
                    time.sleep(pause)
                    pause = min(pause * 2, OPEN_RETRY_MAX_SECONDS)
                    continue
                raise MillraceError(f"cannot open outbox {self.path}: {exc}") from exc
            if carried:
                self._set_meta(db, "dropped", carried)  # autocommit: persisted at once
                self._dropped = carried
            return db

    def _move_aside(self, exc: sqlite3.Error) -> int:
        """Rename a corrupt outbox (and its WAL) away; return the dropped count to carry on.

        That is the file's own dropped count plus its batches, abandoned now: the heartbeat's
        counter must not go back, and the loss must show in it.
        """
        abandoned, dropped = _salvage_counts(self.path)
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        log.error(
            "outbox %s is corrupt (%s); moved aside to %s, %d batch(es) abandoned",
            self.path,
            exc,
            aside,
            abandoned,
        )
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                src.rename(Path(f"{aside}{suffix}"))
        return dropped + abandoned

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=BUSY_TIMEOUT_SECONDS,
        )
        try:
            db.execute("PRAGMA journal_mode=WAL").fetchone()
            # FULL: a committed flush survives power loss, not just a process crash.
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            # Everything start-up reads is read here, so a corrupt page it meets lands in _open.
            self._count, self._bytes = db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM batches"
            ).fetchone()
            row = db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
            self._dropped = int(row[0]) if row else 0
        except sqlite3.Error:
            db.close()
            raise
        return db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @property
    def dropped_total(self) -> int:
        """Batches dropped by the caps (or lost to a failed write) since the outbox was created."""
        return self._dropped + self._lost_unwritten

    def append(
        self,
        boot_id: str,
        items: Sequence[Encoded],
        *,
        encoding: str,
        now_ms: int | None = None,
        closed_ms: Mapping[str, int] | None = None,
    ) -> list[int]:
        """Store encoded batches in one transaction, applying the caps; return their ids.

        `closed_ms` (metric -> end of the last window in `items`) advances the record of
        closed windows in the same transaction (`begin_run` reads it after an unclean end).
        """
        if not items:
            return []
        now = _now_ms() if now_ms is None else now_ms
        size_new = sum(len(item.payload) for item in items)
        with self._lock:
            try:
                with self._transaction() as db:
                    count, size, dropped = self._apply_caps(db, now, incoming=size_new)
                    ids = []
                    for item in items:
                        cur = db.execute(
                            _INSERT,
                            (boot_id, item.seq, now, encoding, len(item.payload), item.payload),
                        )
                        ids.append(int(cur.lastrowid or 0))
                    if dropped:
                        self._set_meta(db, "dropped", self._dropped + dropped)
                    if closed_ms:
                        db.executemany(_CLOSED, sorted(closed_ms.items()))
            except sqlite3.Error as exc:
                self._lost_unwritten += len(items)
                log.error("outbox write failed, %d batch(es) lost: %s", len(items), exc)
                return []
            self._count += len(items) - count
            self._bytes += size_new - size
            self._dropped += dropped
            if dropped:
                log.warning("outbox full: dropped %d oldest batch(es)", dropped)
        return ids

    def begin_run(self, boot_id: str, started_ms: int) -> PreviousRun | None:
        """Record this run as started (and not yet cleanly stopped); return the previous one.

        One transaction: a crash right after it leaves this run recorded as unclean, so
        the next start reports the hole from the same closed window ends.
        """
        with self._lock, self._transaction() as db:
            row = db.execute("SELECT boot_id, started_ms, floor_ms, clean FROM run").fetchone()
            previous = None
            floor_ms = started_ms
            if row is not None:
                prev_boot, prev_started, prev_floor, clean = row
                closed = {
                    str(metric): max(int(end_ms), int(prev_floor))
                    for metric, end_ms in db.execute("SELECT metric, end_ms FROM closed")
                }
                previous = PreviousRun(str(prev_boot), int(prev_started), bool(clean), closed)
                if not clean:
                    # A hole not yet reported stays reportable from where it began.
                    floor_ms = int(prev_floor)
            if floor_ms == started_ms:
                # After a clean stop (or none) nothing is missing up to this start. An end
                # past it belongs to a window the stop closed early, holding readings only
                # up to the stop: lowered, so a kill before that window's time comes round
                # again reports the hole from this start, not from that window's end.
                db.execute("UPDATE closed SET end_ms = ?", (started_ms,))
            db.execute(
                "INSERT OR REPLACE INTO run (id, boot_id, started_ms, floor_ms, clean)"
                " VALUES (1, ?, ?, ?, 0)",
                (boot_id, started_ms, floor_ms),
            )
        return previous

    def mark_clean_stop(self) -> None:
        """The run stopped in order: its open windows are in the outbox, nothing was lost."""
        with self._lock, self._transaction() as db:
            db.execute("UPDATE run SET clean = 1")

    def _set_meta(self, db: sqlite3.Connection, key: str, value: int) -> None:
        db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _apply_caps(
        self, db: sqlite3.Connection, now_ms: int, *, incoming: int
    ) -> tuple[int, int, int]:
        """Delete expired and, oldest first, over-budget batches; return (rows, bytes, dropped)."""
        rows = size = 0
        for (row_size,) in db.execute(
            "DELETE FROM batches WHERE created_ms < ? RETURNING size", (now_ms - self.max_age_ms,)
        ).fetchall():
            rows += 1
            size += row_size
        excess = self._bytes - size + incoming - self.max_bytes
        if excess > 0:
            victims: list[int] = []
            for row_id, row_size in db.execute("SELECT id, size FROM batches ORDER BY id"):
                if excess <= 0:
                    break
                victims.append(row_id)
                excess -= row_size
                size += row_size
                rows += 1
            db.executemany("DELETE FROM batches WHERE id = ?", ((v,) for v in victims))
        return rows, size, rows

    def expire(self, now_ms: int | None = None) -> int:
        """Apply the age cap now (between flushes); return how many batches were dropped."""
        now = _now_ms() if now_ms is None else now_ms
        with self._lock:
            with self._transaction() as db:
                rows, size, dropped = self._apply_caps(db, now, incoming=-(2**62))
                if dropped:
                    self._set_meta(db, "dropped", self._dropped + dropped)
            self._count -= rows
            self._bytes -= size
            self._dropped += dropped
        return dropped

    def ack(self, ids: Iterable[int]) -> int:
        """Delete acknowledged batches (one transaction); unknown ids are ignored."""
        ids = list(ids)
        if not ids:
            return 0
        removed = size = 0
        with self._lock:
            with self._transaction() as db:
                for row_id in ids:
                    row = db.execute(
                        "DELETE FROM batches WHERE id = ? RETURNING size", (row_id,)
                    ).fetchone()
                    if row:
                        removed += 1
                        size += row[0]
            self._count -= removed
            self._bytes -= size
        return removed

    def apply_receipt(
        self, boot_id: str, watermark: int, ranges: Sequence[tuple[int, int]]
    ) -> list[int]:
        """Delete the batches a cloud receipt covers (one transaction); return their ids.

        Only a receipt deletes: it says the database has the batch, where a PUBACK
        only says the broker has it (docs/guarantees.md).
        """
        removed: list[int] = []
        size = 0
        with self._lock:
            with self._transaction() as db:
                spans = [(-1, watermark), *ranges]
                for low, high in spans:
                    for row_id, row_size in db.execute(
                        "DELETE FROM batches WHERE boot_id = ? AND seq BETWEEN ? AND ?"
                        " RETURNING id, size",
                        (boot_id, low, high),
                    ).fetchall():
                        removed.append(int(row_id))
                        size += row_size
            self._count -= len(removed)
            self._bytes -= size
        return removed

    def rows_by_ids(self, ids: Iterable[int]) -> list[Row]:
        """The stored batches among `ids`, oldest first (receipted ones are gone)."""
        wanted = sorted(set(ids))
        if not wanted:
            return []
        with self._lock:
            out: list[Row] = []
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                cur = self._db.execute(
                    "SELECT id, boot_id, seq, encoding, payload FROM batches"
                    f" WHERE id IN ({marks}) ORDER BY id",
                    chunk,
                )
                out.extend(Row(*row) for row in cur.fetchall())
            return out

    def rows_after(self, after_id: int, *, limit: int, upto_id: int | None = None) -> list[Row]:
        """Stored batches with after_id < id (<= upto_id), oldest first."""
        with self._lock:
            cur = self._db.execute(
                "SELECT id, boot_id, seq, encoding, payload FROM batches"
                " WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
                (after_id, 2**62 if upto_id is None else upto_id, limit),
            )
            return [Row(*row) for row in cur.fetchall()]

    def max_id(self) -> int:
        """The newest id ever assigned (0 if none)."""
        with self._lock:
            row = self._db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'batches'"
            ).fetchone()
            return int(row[0]) if row else 0

    def stats(self, now_ms: int | None = None) -> OutboxStats:
        now = _now_ms() if now_ms is None else now_ms
        with self._lock:
            row = self._db.execute("SELECT created_ms FROM batches ORDER BY id LIMIT 1").fetchone()
            oldest = max(0.0, (now - row[0]) / 1000) if row else 0.0
            return OutboxStats(self._count, self._bytes, oldest, self.dropped_total)

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()
