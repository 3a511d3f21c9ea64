"""Batches: one per flush when it fits, split under the payload limit, seq monotonic."""

from __future__ import annotations

import pytest

from millrace.edge import batching
from millrace.edge.batching import MAX_ROWS_PER_BATCH, SeqCounter, build_batches
from millrace.wire import MAX_PAYLOAD_BYTES, Batch, Event, Window, decode_batch

BOOT = "0123456789abcdef0123456789abcdef"
BASE_MS = 1_699_999_980_000


def windows(n: int) -> list[Window]:
    return [Window(f"metric.{i}", BASE_MS, 10, 3, 6.0, 1.0, 3.0, 1.0, 3.0, 14.0) for i in range(n)]


def test_small_flush_is_one_batch_with_counters() -> None:
    seqs = SeqCounter()
    (item,) = build_batches(
        device="dev-a",
        boot_id=BOOT,
        seqs=seqs,
        sent_at_ms=BASE_MS,
        windows=windows(3),
        events=[Event("door", BASE_MS, True)],
        rejected=4,
        dropped=2,
        clock_synced=False,
    )
    batch = decode_batch(item.payload)
    assert isinstance(batch, Batch)
    assert (batch.seq, len(batch.windows), len(batch.events)) == (0, 3, 1)
    assert (batch.rejected, batch.dropped, batch.clock_synced) == (4, 2, False)
    assert seqs.next == 1


def test_big_flush_is_split_and_seqs_continue() -> None:
    seqs = SeqCounter()
    seqs.next = 7
    items = build_batches(
        device="dev-a",
        boot_id=BOOT,
        seqs=seqs,
        sent_at_ms=BASE_MS,
        windows=windows(MAX_ROWS_PER_BATCH * 2 + 5),
        events=[],
        rejected=1,
        dropped=0,
        clock_synced=True,
        encoding="json",
    )
    assert [i.seq for i in items] == [7, 8, 9]
    decoded = [decode_batch(i.payload, content_type="application/json") for i in items]
    assert all(isinstance(b, Batch) for b in decoded)
    assert sum(len(b.windows) for b in decoded) == MAX_ROWS_PER_BATCH * 2 + 5  # type: ignore[union-attr]
    assert [b.rejected for b in decoded] == [1, 1, 1]  # type: ignore[union-attr]
    assert all(len(i.payload) <= MAX_PAYLOAD_BYTES for i in items)


def test_oversized_chunks_are_halved_until_they_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = 5_000
    monkeypatch.setattr(batching, "MAX_ROWS_PER_BATCH", rows)
    third = 1 / 3
    long = [
        Window("m" * 99 + str(i % 10), BASE_MS + 10_000 * (i // 10), 10, 1, *[third] * 5, 1 / 9)
        for i in range(rows)
    ]
    items = build_batches(
        device="dev-a",
        boot_id=BOOT,
        seqs=SeqCounter(),
        sent_at_ms=BASE_MS,
        windows=long,
        events=[],
        rejected=0,
        dropped=0,
        clock_synced=True,
        encoding="json",
    )
    assert len(items) > 1
    assert all(len(i.payload) <= MAX_PAYLOAD_BYTES for i in items)
    assert sum(i.windows for i in items) == rows
