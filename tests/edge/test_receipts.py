"""Edge receipt handling: only a receipt deletes a batch; unreceipted ones go again later."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from millrace.edge.batching import Encoded
from millrace.edge.config import load_config
from millrace.edge.outbox import Outbox
from millrace.edge.receipts import JITTER_SPAN, Unreceipted
from millrace.errors import ConfigError

BOOT_A = "a" * 32
BOOT_B = "b" * 32
NOW_MS = 1_699_999_980_000


def enc(seq: int) -> Encoded:
    return Encoded(seq, bytes([seq % 256]) * 50, 1, 0)


def test_outbox_deletes_only_the_batches_a_receipt_covers(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_bytes=10**6, max_age_s=3600)
    ids_a = box.append(BOOT_A, [enc(s) for s in range(8)], encoding="msgpack", now_ms=NOW_MS)
    ids_b = box.append(BOOT_B, [enc(s) for s in range(3)], encoding="msgpack", now_ms=NOW_MS)
    removed = box.apply_receipt(BOOT_A, 2, [(4, 5), (7, 7)])
    assert sorted(removed) == [ids_a[s] for s in (0, 1, 2, 4, 5, 7)]
    left = [(r.boot_id, r.seq) for r in box.rows_after(0, limit=100)]
    assert left == [(BOOT_A, 3), (BOOT_A, 6), (BOOT_B, 0), (BOOT_B, 1), (BOOT_B, 2)]
    assert box.stats(now_ms=NOW_MS).batches == 5
    assert box.apply_receipt(BOOT_A, 2, [(4, 5)]) == []  # a repeated receipt is harmless
    assert [r.id for r in box.rows_by_ids([ids_a[0], ids_a[3], ids_b[2], 10**9])] == [
        ids_a[3],
        ids_b[2],
    ]
    box.close()
    reopened = Outbox(tmp_path / "o.sqlite", max_bytes=10**6, max_age_s=3600)
    assert reopened.stats(now_ms=NOW_MS).batches == 5  # the count matches the file


def test_outbox_cap_still_drops_the_oldest_unreceipted_batches_and_counts_them(
    tmp_path: Path,
) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_bytes=200, max_age_s=3600)
    box.append(BOOT_A, [enc(0), enc(1), enc(2), enc(3)], encoding="msgpack", now_ms=NOW_MS)
    box.append(BOOT_A, [enc(4)], encoding="msgpack", now_ms=NOW_MS)
    assert [r.seq for r in box.rows_after(0, limit=10)] == [1, 2, 3, 4]
    assert box.dropped_total == 1
    assert box.apply_receipt(BOOT_A, -1, [(0, 1)]) != []  # seq 0 is gone, seq 1 deleted
    assert box.dropped_total == 1 and box.stats(now_ms=NOW_MS).batches == 3


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0


def test_unreceipted_batches_come_due_after_a_bounded_jittered_wait() -> None:
    clock = Clock()
    waiting = Unreceipted(wait_s=30.0, rng=random.Random(7))
    for row_id in (3, 1, 2):
        waiting.sent(row_id, clock.now)
    assert waiting.due(clock.now + 30.0 - 1e-6, limit=10) == []  # never before wait_s
    next_due = waiting.next_due()
    assert next_due is not None and clock.now + 30.0 <= next_due <= clock.now + 60.0
    assert waiting.due(clock.now + 30.0 * JITTER_SPAN, limit=2) == [1, 2]  # oldest first, paced
    assert waiting.due(clock.now + 30.0 * JITTER_SPAN, limit=2) == [3]
    assert len(waiting) == 0 and waiting.next_due() is None


def test_receipted_batches_are_never_resent_and_a_resend_waits_again() -> None:
    waiting = Unreceipted(wait_s=10.0, rng=random.Random(1))
    waiting.sent(1, 0.0)
    waiting.sent(2, 0.0)
    waiting.forget([1])
    assert waiting.due(100.0, limit=10) == [2]
    waiting.sent(2, 100.0)  # its PUBACK after the resend
    assert waiting.due(109.9, limit=10) == []
    assert waiting.due(120.0, limit=10) == [2]
    draws = Unreceipted(wait_s=10.0, rng=random.Random(3))
    for row_id in range(200):
        draws.sent(row_id, 0.0)
    spread = {round(at, 3) for at in draws._due.values()}
    assert len(spread) > 100 and min(spread) >= 10.0 and max(spread) <= 20.0  # jittered
    with pytest.raises(ValueError, match="receipt_wait_s"):
        Unreceipted(wait_s=0.0)


def _config(tmp_path: Path, broker_extra: str) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(
        f"""
device_id = "dev-a"
[broker]
host = "localhost"
ca = "ca.pem"
cert = "c.pem"
key = "k.pem"
{broker_extra}
[outbox]
path = "{tmp_path / "outbox.sqlite"}"
[state]
dir = "{tmp_path / "state"}"
[[signals]]
metric = "sim.temp"
driver = "sim"
"""
    )
    return path


def test_edge_config_receipt_wait_has_a_sane_default_and_is_validated(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, ""))
    assert config.broker.receipt_wait_s == 30.0 and config.broker.resend_unrouted is True
    config = load_config(_config(tmp_path, "receipt_wait_s = 2\nresend_unrouted = false"))
    assert config.broker.receipt_wait_s == 2.0 and config.broker.resend_unrouted is False
    for bad in ("receipt_wait_s = 0", "receipt_wait_s = -1", 'receipt_wait_s = "30"'):
        with pytest.raises(ConfigError, match="receipt_wait_s"):
            load_config(_config(tmp_path, bad))
