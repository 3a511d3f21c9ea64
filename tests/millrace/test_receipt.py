"""The Receipt message: round trip, strict decoding, bounded size, covering seqs."""

from __future__ import annotations

import json

import pytest

from millrace.errors import WireError
from millrace.wire import MAX_RECEIPT_RANGES, Receipt, receipts_for
from millrace.wire.messages import MAX_MESSAGE_BYTES
from millrace.wire.receipt import seq_ranges

BOOT = "ab" * 16


def test_receipt_round_trips_and_says_which_seqs_are_committed() -> None:
    receipt = Receipt("dev-a", BOOT, 4, ((7, 9), (12, 12)), 1_700_000_000_000)
    assert Receipt.from_json(receipt.to_json()) == receipt
    assert [s for s in range(15) if receipt.covers(s)] == [0, 1, 2, 3, 4, 7, 8, 9, 12]
    assert not Receipt("dev-a", BOOT, -1).covers(0)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"device": "dev-a", "boot_id": BOOT, "watermark": -2}, "watermark"),
        ({"device": "dev-a", "boot_id": "AB" * 16, "watermark": 1}, "boot_id"),
        ({"device": "a b", "boot_id": BOOT, "watermark": 1}, "device"),
        ({"device": "dev-a", "boot_id": BOOT, "watermark": 1.5}, "watermark"),
        ({"device": "dev-a", "boot_id": BOOT, "watermark": True}, "watermark"),
        ({"device": "dev-a", "boot_id": BOOT, "watermark": 5, "ranges": [[3, 4]]}, "above"),
        ({"device": "dev-a", "boot_id": BOOT, "watermark": 1, "ranges": [[5, 4]]}, "sorted"),
        (
            {"device": "dev-a", "boot_id": BOOT, "watermark": 1, "ranges": [[3, 5], [4, 8]]},
            "disjoint",
        ),
        (
            {"device": "dev-a", "boot_id": BOOT, "watermark": 1, "ranges": [[3, 4], [5, 8]]},
            "disjoint",
        ),
        ({"device": "dev-a", "boot_id": BOOT, "watermark": 1, "ranges": [[3]]}, "[low, high]"),
        ({"device": "dev-a", "boot_id": BOOT, "watermark": 1, "ranges": [[3, "4"]]}, "high"),
        ({"device": "dev-a", "boot_id": BOOT, "watermark": 1, "ranges": {"a": 1}}, "ranges"),
        ({"device": "dev-a", "boot_id": BOOT, "watermark": 2**63}, "watermark"),
        ({"device": "dev-a", "boot_id": BOOT, "watermark": 1, "extra": 1}, "extra"),
        ({"device": "dev-a", "boot_id": BOOT}, "watermark"),
    ],
)
def test_receipt_decoder_refuses_what_could_delete_the_wrong_batches(
    payload: dict[str, object], fragment: str
) -> None:
    with pytest.raises(WireError, match="receipt") as info:
        Receipt.from_json(json.dumps(payload).encode())
    assert fragment in str(info.value)


def test_receipt_size_is_bounded_and_receipts_for_splits_past_the_bound() -> None:
    too_many = tuple((i * 3, i * 3) for i in range(MAX_RECEIPT_RANGES + 1))
    with pytest.raises(WireError, match="more than"):
        Receipt("dev-a", BOOT, -1, too_many)
    seqs = [i * 3 for i in range(3 * MAX_RECEIPT_RANGES)]
    receipts = receipts_for("dev-a", BOOT, -1, seqs)
    assert len(receipts) == 3
    assert all(len(r.to_json()) < MAX_MESSAGE_BYTES // 4 for r in receipts)
    assert sorted(s for r in receipts for s in range(seqs[-1] + 1) if r.covers(s)) == seqs
    worst = Receipt(
        "d" * 63,
        BOOT,
        2**62,
        tuple((2**62 + 3 * i, 2**62 + 3 * i + 1) for i in range(2, 2 + MAX_RECEIPT_RANGES)),
        2**62,
    )
    assert len(worst.to_json()) < MAX_MESSAGE_BYTES


def test_receipts_for_lists_only_seqs_above_the_watermark_merged_into_ranges() -> None:
    assert seq_ranges([5, 3, 4, 9, 10, 12]) == [(3, 5), (9, 10), (12, 12)]
    (only,) = receipts_for("dev-a", BOOT, 4, [1, 4, 6, 7, 9])
    assert only.watermark == 4 and only.ranges == ((6, 7), (9, 9))
    (empty,) = receipts_for("dev-a", BOOT, 4, [])
    assert empty.ranges == ()
