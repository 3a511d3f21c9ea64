"""Outbox bookkeeping: FIFO by id, delete on ack, caps drop oldest and count, restart-safe."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from millrace.edge import outbox
from millrace.edge.batching import Encoded
from millrace.edge.outbox import Outbox
from millrace.errors import MillraceError

BOOT_A = "a" * 32
BOOT_B = "b" * 32
NOW = 1_699_999_980_000


def enc(seq: int, size: int = 100) -> Encoded:
    return Encoded(seq, bytes([seq % 256]) * size, 1, 0)


def open_outbox(path: Path, *, max_bytes: int = 10_000, max_age_s: float = 3600) -> Outbox:
    return Outbox(path, max_bytes=max_bytes, max_age_s=max_age_s)


def test_append_and_walk_in_order(tmp_path: Path) -> None:
    box = open_outbox(tmp_path / "o.sqlite")
    ids = box.append(BOOT_A, [enc(0), enc(1)], encoding="msgpack", now_ms=NOW)
    ids += box.append(BOOT_A, [enc(2)], encoding="json", now_ms=NOW)
    assert ids == sorted(ids) and len(set(ids)) == 3
    rows = box.rows_after(0, limit=10)
    assert [(r.boot_id, r.seq, r.encoding) for r in rows] == [
        (BOOT_A, 0, "msgpack"),
        (BOOT_A, 1, "msgpack"),
        (BOOT_A, 2, "json"),
    ]
    assert [r.seq for r in box.rows_after(ids[0], limit=10, upto_id=ids[1])] == [1]
    stats = box.stats(NOW + 5_000)
    assert (stats.batches, stats.bytes, stats.oldest_age_s) == (3, 300, 5.0)
    assert box.max_id() == ids[-1]


def test_ack_deletes_only_those_ids_and_ids_never_repeat(tmp_path: Path) -> None:
    box = open_outbox(tmp_path / "o.sqlite")
    ids = box.append(BOOT_A, [enc(0), enc(1), enc(2)], encoding="msgpack", now_ms=NOW)
    assert box.ack([ids[0], ids[2], 999]) == 2
    assert [r.seq for r in box.rows_after(0, limit=10)] == [1]
    box.ack([ids[1]])
    assert box.stats(NOW).batches == 0
    (new,) = box.append(BOOT_A, [enc(3)], encoding="msgpack", now_ms=NOW)
    assert new > ids[-1]


def test_restart_resends_pending_batches_in_order_with_original_keys(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    box = open_outbox(path)
    box.append(BOOT_A, [enc(0), enc(1), enc(2)], encoding="msgpack", now_ms=NOW)
    first = box.rows_after(0, limit=1)[0]
    box.ack([first.id])
    # No close(): the process dies here.
    reopened = open_outbox(path)
    reopened.append(BOOT_B, [enc(0)], encoding="msgpack", now_ms=NOW)
    rows = reopened.rows_after(0, limit=10)
    assert [(r.boot_id, r.seq) for r in rows] == [(BOOT_A, 1), (BOOT_A, 2), (BOOT_B, 0)]
    assert rows[0].payload == enc(1).payload
    assert reopened.stats(NOW).bytes == 300


def test_byte_cap_drops_the_oldest_and_counts_exactly(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    box = open_outbox(path, max_bytes=1_000)
    for seq in range(25):
        box.append(BOOT_A, [enc(seq)], encoding="msgpack", now_ms=NOW)
    assert [r.seq for r in box.rows_after(0, limit=100)] == list(range(15, 25))
    assert box.dropped_total == 15
    stats = box.stats(NOW)
    assert (stats.batches, stats.bytes, stats.dropped_total) == (10, 1_000, 15)
    assert open_outbox(path, max_bytes=1_000).dropped_total == 15  # persisted


def test_age_cap_drops_and_counts(tmp_path: Path) -> None:
    box = open_outbox(tmp_path / "o.sqlite", max_age_s=60)
    box.append(BOOT_A, [enc(0), enc(1)], encoding="msgpack", now_ms=NOW)
    box.append(BOOT_A, [enc(2)], encoding="msgpack", now_ms=NOW + 30_000)
    assert box.expire(NOW + 60_001) == 2
    assert [r.seq for r in box.rows_after(0, limit=10)] == [2]
    box.append(BOOT_A, [enc(3)], encoding="msgpack", now_ms=NOW + 90_001)
    assert [r.seq for r in box.rows_after(0, limit=10)] == [3]
    assert box.dropped_total == 3


def test_ack_of_a_dropped_batch_is_harmless(tmp_path: Path) -> None:
    box = open_outbox(tmp_path / "o.sqlite", max_bytes=200)
    (old,) = box.append(BOOT_A, [enc(0)], encoding="msgpack", now_ms=NOW)
    box.append(BOOT_A, [enc(1), enc(2)], encoding="msgpack", now_ms=NOW)
    assert box.ack([old]) == 0
    assert box.stats(NOW).bytes == 200


def test_one_transaction_per_flush(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    box = open_outbox(path)
    box.append(BOOT_A, [enc(0), enc(1), enc(2)], encoding="msgpack", now_ms=NOW)
    # A second connection sees all three at once (they were committed together).
    other = sqlite3.connect(path)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert other.execute("SELECT count(*) FROM batches").fetchone()[0] == 3
    other.close()


# Another process takes the outbox's file lock, as `sqlite3 outbox.sqlite` in a shell can.
_HOLDERS = {
    "wal, exclusive locking mode": "PRAGMA locking_mode=EXCLUSIVE",
    "rollback journal": "PRAGMA journal_mode=DELETE",
}
_HOLD_LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute(sys.argv[2])
db.execute("BEGIN EXCLUSIVE")
db.execute("SELECT count(*) FROM batches").fetchone()
print("locked", flush=True)
time.sleep(float(sys.argv[3]))
db.execute("COMMIT")
"""
LOCK_HELD_SECONDS = 1.5


@contextlib.contextmanager
def lock_held(path: Path, pragma: str, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """Hold BEGIN EXCLUSIVE on `path` in another process for `seconds` (or until killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(path), pragma, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def outbox_with_five_batches(path: Path) -> None:
    box = open_outbox(path)
    box.append(BOOT_A, [enc(seq) for seq in range(5)], encoding="msgpack", now_ms=NOW)
    box.close()


@pytest.mark.parametrize("pragma", _HOLDERS.values(), ids=_HOLDERS.keys())
def test_locked_outbox_is_waited_for_not_moved_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pragma: str
) -> None:
    path = tmp_path / "o.sqlite"
    outbox_with_five_batches(path)
    # The lock outlasts SQLite's busy timeout (as a 5 s lock outlasted the 5 s default).
    monkeypatch.setattr(outbox, "BUSY_TIMEOUT_SECONDS", 0.2)
    with lock_held(path, pragma, LOCK_HELD_SECONDS) as holder:
        started = time.monotonic()
        box = open_outbox(path)
        assert time.monotonic() - started > LOCK_HELD_SECONDS / 2  # it really waited
        assert holder.wait(10) == 0
    assert not list(tmp_path.glob("o.sqlite.corrupt-*"))
    assert [r.seq for r in box.rows_after(0, limit=10)] == [0, 1, 2, 3, 4]
    assert box.dropped_total == 0


def test_outbox_locked_too_long_fails_start_up_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "o.sqlite"
    outbox_with_five_batches(path)
    monkeypatch.setattr(outbox, "BUSY_TIMEOUT_SECONDS", 0.1)
    monkeypatch.setattr(outbox, "OPEN_LOCKED_MAX_WAIT_SECONDS", 0.5)
    holder = _HOLDERS["wal, exclusive locking mode"]
    with lock_held(path, holder, 60), pytest.raises(MillraceError, match="locked") as raised:
        open_outbox(path)
    assert str(path) in str(raised.value)
    assert not list(tmp_path.glob("o.sqlite.corrupt-*"))
    assert open_outbox(path).stats(NOW).batches == 5  # once the lock is gone


def test_an_outbox_that_cannot_be_opened_is_not_taken_for_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    path.mkdir()  # SQLITE_CANTOPEN, like an I/O error: nothing to move aside
    with pytest.raises(MillraceError, match="cannot open outbox"):
        open_outbox(path)
    assert path.is_dir() and not list(tmp_path.glob("o.sqlite.corrupt-*"))


def test_a_file_that_is_not_a_database_is_moved_aside_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    path.write_bytes(b"this is not a database" * 100)  # SQLITE_NOTADB
    box = open_outbox(path)
    assert box.stats(NOW).batches == 0
    assert list(tmp_path.glob("o.sqlite.corrupt-*"))
    # Nothing in it can be counted: the loss still reaches the heartbeat, as at least one.
    assert box.dropped_total == 1
    box.append(BOOT_A, [enc(0)], encoding="msgpack", now_ms=NOW)
    assert box.stats(NOW).batches == 1
    box.close()
    assert open_outbox(path).dropped_total == 1  # persisted


def test_a_corrupt_page_moves_the_outbox_aside_and_counts_its_batches(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    box = open_outbox(path, max_bytes=500)
    for seq in range(7):
        box.append(BOOT_A, [enc(seq)], encoding="msgpack", now_ms=NOW)
    assert (box.stats(NOW).batches, box.dropped_total) == (5, 2)
    box.close()  # checkpoints the WAL into the file
    with contextlib.closing(sqlite3.connect(path)) as db:
        page_bytes = db.execute("PRAGMA page_size").fetchone()[0]
        (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'batches'").fetchone()
    with path.open("r+b") as f:  # the batches' page: SQLITE_CORRUPT once a row is read
        f.seek((root - 1) * page_bytes)
        f.write(b"\xa5" * 64)
    box = open_outbox(path, max_bytes=500)
    assert list(tmp_path.glob("o.sqlite.corrupt-*"))
    assert box.stats(NOW).batches == 0
    assert box.dropped_total == 2 + 5  # the file's own drops carried on, its batches added
    box.close()
    assert open_outbox(path).dropped_total == 7


# -- loss is visible: the run record and the last closed window per metric ------------------


def test_unclean_end_is_known_at_the_next_start_with_the_last_closed_window_ends(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.sqlite"
    box = open_outbox(path)
    assert box.begin_run(BOOT_A, NOW) is None  # the first run ever: nothing before it
    box.append(BOOT_A, [enc(0)], encoding="msgpack", now_ms=NOW, closed_ms={"t": NOW + 5_000})
    box.append(
        BOOT_A,
        [enc(1)],
        encoding="msgpack",
        now_ms=NOW,
        closed_ms={"t": NOW + 10_000, "p": NOW + 10_000},
    )
    # An older window of "t" (a longer period's lane) never moves its end back.
    box.append(BOOT_A, [enc(2)], encoding="msgpack", now_ms=NOW, closed_ms={"t": NOW})
    box.close()  # no mark_clean_stop: SIGKILL, power cut or watchdog
    box = open_outbox(path)
    previous = box.begin_run(BOOT_B, NOW + 60_000)
    assert previous is not None
    assert (previous.boot_id, previous.started_ms, previous.clean) == (BOOT_A, NOW, False)
    assert previous.closed_ms == {"t": NOW + 10_000, "p": NOW + 10_000}


def test_clean_stop_is_known_at_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    box = open_outbox(path)
    box.begin_run(BOOT_A, NOW)
    box.append(BOOT_A, [enc(0)], encoding="msgpack", now_ms=NOW, closed_ms={"t": NOW + 5_000})
    box.mark_clean_stop()
    box.close()
    box = open_outbox(path)
    previous = box.begin_run(BOOT_B, NOW + 60_000)
    assert previous is not None and previous.clean and previous.boot_id == BOOT_A


def test_a_run_killed_before_closing_a_window_reports_from_the_last_clean_start(
    tmp_path: Path,
) -> None:
    """The hole never starts before the first run after a clean stop (that stop lost nothing)."""
    path = tmp_path / "o.sqlite"
    box = open_outbox(path)
    box.begin_run(BOOT_A, NOW)
    box.append(BOOT_A, [enc(0)], encoding="msgpack", now_ms=NOW, closed_ms={"t": NOW + 5_000})
    box.mark_clean_stop()
    boot_c = "c" * 32
    assert box.begin_run(BOOT_B, NOW + 3_600_000) is not None  # then killed at once
    previous = box.begin_run(boot_c, NOW + 3_700_000)  # then killed at once again
    assert previous is not None and not previous.clean
    assert previous.closed_ms == {"t": NOW + 3_600_000}
    # An unreported hole stays reportable from where it began.
    again = box.begin_run("d" * 32, NOW + 3_800_000)
    assert again is not None and again.boot_id == boot_c
    assert again.closed_ms == {"t": NOW + 3_600_000}


def test_a_window_closed_early_by_a_clean_stop_does_not_hide_the_next_runs_hole(
    tmp_path: Path,
) -> None:
    """Found on a booted gateway: `systemctl restart` (SIGTERM closes the open window early,
    its end in the future), then the new run froze at once and the watchdog killed it; its
    hole began at the early-closed window's end, after the freeze."""
    path = tmp_path / "o.sqlite"
    box = open_outbox(path)
    box.begin_run(BOOT_A, NOW)
    stop_ms = NOW + 5_300
    box.append(BOOT_A, [enc(0)], encoding="msgpack", now_ms=stop_ms, closed_ms={"t": NOW + 6_000})
    box.mark_clean_stop()
    box.begin_run(BOOT_B, NOW + 5_500)  # restarted at once, then frozen and killed
    previous = box.begin_run("c" * 32, NOW + 40_000)
    assert previous is not None and previous.boot_id == BOOT_B and not previous.clean
    assert previous.closed_ms == {"t": NOW + 5_500}
