"""The receipt: the cloud tells a device which of its batches are committed.

A batch leaves the edge outbox only on a receipt covering it, never on the
broker's PUBACK, so a broker that dies with batches in a worker's session loses
nothing (docs/guarantees.md). A receipt names one (device, boot_id) stream:
every seq <= `watermark` is stored, and so is every seq in `ranges` (inclusive,
sorted, disjoint, all above the watermark). JSON like the other small messages:
rare, small (bounded by MAX_RECEIPT_RANGES) and readable with mosquitto_sub.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from millrace.errors import WireError
from millrace.wire.messages import _build, _dumps, _loads, _need, _need_device

# A receipt with more ranges is split by the sender (receipts_for); ~40 bytes a range.
MAX_RECEIPT_RANGES = 64
MAX_SEQ = 2**63 - 1
# watermark -1: no seq of the stream is asserted contiguous from 0 (only `ranges` count).
NO_WATERMARK = -1

SeqRange = tuple[int, int]


def _is_boot_id(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)
    )


@dataclass(frozen=True, slots=True)
class Receipt:
    """Committed seqs of one (device, boot_id) stream; see the module docstring."""

    device: str
    boot_id: str
    watermark: int
    ranges: tuple[SeqRange, ...] = ()
    ts_ms: int = 0

    def __post_init__(self) -> None:
        _need_device("receipt", self.device)
        if not _is_boot_id(self.boot_id):
            raise WireError("receipt.boot_id: expected 32 lowercase hex characters")
        _need("receipt", "watermark", self.watermark, int)
        if not NO_WATERMARK <= self.watermark <= MAX_SEQ:
            raise WireError(f"receipt.watermark: {self.watermark} is outside [-1, 2**63-1]")
        _need("receipt", "ts_ms", self.ts_ms, int)
        _need("receipt", "ranges", self.ranges, tuple)
        if len(self.ranges) > MAX_RECEIPT_RANGES:
            raise WireError(f"receipt.ranges: more than {MAX_RECEIPT_RANGES} ranges")
        floor = self.watermark + 1  # the next range must start here or later
        for index, pair in enumerate(self.ranges):
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise WireError(f"receipt.ranges[{index}]: expected [low, high]")
            low, high = pair
            _need("receipt", f"ranges[{index}].low", low, int)
            _need("receipt", f"ranges[{index}].high", high, int)
            if not floor <= low <= high <= MAX_SEQ:
                raise WireError(
                    f"receipt.ranges[{index}]: [{low}, {high}] is not sorted, disjoint and"
                    f" above the watermark {self.watermark}"
                )
            floor = high + 2  # adjacent ranges must be merged: keeps receipts canonical

    def covers(self, seq: int) -> bool:
        """True if batch `seq` of this stream is committed."""
        return seq <= self.watermark or any(low <= seq <= high for low, high in self.ranges)

    def to_json(self) -> bytes:
        return _dumps(self)

    @classmethod
    def from_json(cls, payload: bytes) -> Receipt:
        data = _loads(payload, "receipt")
        ranges = data.get("ranges", [])
        if not isinstance(ranges, list):
            raise WireError("receipt.ranges: expected a list of [low, high]")
        data["ranges"] = tuple(tuple(r) if isinstance(r, list) else r for r in ranges)
        return _build(cls, data, "receipt")


def seq_ranges(seqs: Iterable[int]) -> list[SeqRange]:
    """Sorted, merged inclusive ranges of `seqs`."""
    out: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if out and seq == out[-1][1] + 1:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    return [(low, high) for low, high in out]


def receipts_for(
    device: str, boot_id: str, watermark: int, seqs: Iterable[int], *, ts_ms: int = 0
) -> list[Receipt]:
    """Receipts saying `watermark` and `seqs` are committed, split to respect the size bound."""
    ranges = seq_ranges(s for s in seqs if s > watermark)
    chunks = [ranges[i : i + MAX_RECEIPT_RANGES] for i in range(0, len(ranges), MAX_RECEIPT_RANGES)]
    return [Receipt(device, boot_id, watermark, tuple(chunk), ts_ms) for chunk in chunks or [[]]]
