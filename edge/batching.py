"""Closed windows and events -> encoded batches keyed by (device, boot_id, seq) (pure).

A flush normally fits one batch; a large one (many metrics, a long close
after an outage) is split so every payload stays under the wire limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from millrace.wire import MAX_PAYLOAD_BYTES, Batch, Encoding, Event, Window, encode_batch

# ~80 bytes per window in MessagePack, ~150 in JSON: 2,000 keeps a batch near 300 KB at worst.
MAX_ROWS_PER_BATCH = 2_000


@dataclass(frozen=True, slots=True)
class Encoded:
    """A batch ready for the outbox."""

    seq: int
    payload: bytes
    windows: int
    events: int


class SeqCounter:
    """Monotonic seq per boot_id, starting at 0."""

    def __init__(self) -> None:
        self.next = 0

    def take(self) -> int:
        seq, self.next = self.next, self.next + 1
        return seq


def _chunks(
    windows: Sequence[Window], events: Sequence[Event], size: int
) -> list[tuple[Sequence[Window], Sequence[Event]]]:
    chunks: list[tuple[Sequence[Window], Sequence[Event]]] = []
    w = e = 0
    while w < len(windows) or e < len(events) or not chunks:
        w_end = min(len(windows), w + size)
        e_end = min(len(events), e + max(0, size - (w_end - w)))
        chunks.append((windows[w:w_end], events[e:e_end]))
        w, e = w_end, e_end
    return chunks


def build_batches(
    *,
    device: str,
    boot_id: str,
    seqs: SeqCounter,
    sent_at_ms: int,
    windows: Sequence[Window],
    events: Sequence[Event],
    rejected: int,
    dropped: int,
    clock_synced: bool,
    encoding: Encoding = "msgpack",
) -> list[Encoded]:
    """Encode windows and events into as few batches as the payload limit allows.

    `rejected` (readings rejected since the agent started, i.e. per boot_id) and
    `dropped` (the outbox's drops since it was created) are cumulative counters
    and ride on every batch, so a lost batch never loses a count.
    """
    pending = _chunks(windows, events, MAX_ROWS_PER_BATCH)
    result: list[Encoded] = []
    while pending:
        chunk_windows, chunk_events = pending.pop(0)
        batch = Batch(
            device=device,
            boot_id=boot_id,
            seq=seqs.next,
            sent_at_ms=sent_at_ms,
            windows=tuple(chunk_windows),
            events=tuple(chunk_events),
            clock_synced=clock_synced,
            dropped=dropped,
            rejected=rejected,
        )
        payload = encode_batch(batch, encoding=encoding)
        rows = len(chunk_windows) + len(chunk_events)
        if len(payload) > MAX_PAYLOAD_BYTES and rows > 1:
            pending[:0] = _chunks(chunk_windows, chunk_events, max(1, rows // 2))
            continue
        result.append(Encoded(seqs.take(), payload, len(chunk_windows), len(chunk_events)))
    return result
