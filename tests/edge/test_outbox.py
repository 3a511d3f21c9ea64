"""Outbox bookkeeping: FIFO by id, delete on ack, caps drop oldest and count, restart-safe."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from millrace.edge.batching import Encoded
from millrace.edge.outbox import Outbox

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


def test_a_corrupt_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    box = open_outbox(path)
    assert box.stats(NOW).batches == 0
    assert list(tmp_path.glob("o.sqlite.corrupt-*"))
    box.append(BOOT_A, [enc(0)], encoding="msgpack", now_ms=NOW)
    assert box.stats(NOW).batches == 1
