"""Receipts: after a commit, tell each device which of its batches the database holds.

An edge deletes a batch from its outbox only on a receipt (docs/guarantees.md), so
receipts are read back from the ingest ledger after COMMIT, never from what this
worker remembers: a batch that is already in the ledger (a duplicate, resent because
its receipt was lost) is receipted again, and a restarted worker answers the same.
One query for all (device, boot_id) streams touched by the commit batch, one receipt
per stream (split only past MAX_RECEIPT_RANGES ranges). The watermark is the end of the
stream's run of seqs contiguous from 0; this worker caches it per stream (the ledger
only grows within its retention), so each query reads only the seqs above it.

A decodable batch the cloud refuses for good (dead-lettered: too old, in the future,
poison) is receipted too, from its dead letter: it is kept in `dead_letters` for an
operator, and resending it every 30-60 s for the outbox's lifetime would only add
copies there. A batch claiming another device than its topic's is never receipted.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Final

import psycopg

from millrace.cloud.ingest.messages import DeadLetter
from millrace.wire import Batch, Receipt, receipts_for
from millrace.wire.receipt import NO_WATERMARK

log = logging.getLogger(__name__)

# Seqs read above the cached watermark per stream and commit; a stream with a hole
# (batches its outbox cap dropped) keeps its ranges from these plus the commit's own.
MAX_SEQS_READ: Final = 4096
# Streams whose watermark is cached; the oldest is forgotten first (it is re-read).
MAX_CACHED_STREAMS: Final = 100_000

# The first MAX_SEQS_READ seqs above each stream's cached watermark, all streams of a
# commit batch in one round trip (the committer thread runs it after every COMMIT).
_SEQS_ABOVE: Final = """
SELECT s.i, l.seq
FROM unnest(%(names)s::text[], %(boots)s::uuid[], %(above)s::bigint[])
     WITH ORDINALITY AS s(name, boot_id, above, i)
JOIN devices d ON d.name = s.name
CROSS JOIN LATERAL (
    SELECT seq FROM ingest_ledger
    WHERE device_id = d.id AND boot_id = s.boot_id AND seq > s.above
    ORDER BY seq LIMIT %(limit)s
) l
ORDER BY s.i, l.seq
"""

Stream = tuple[str, str]  # device, boot_id


def streams_of(batches: Iterable[Batch]) -> dict[Stream, set[int]]:
    """The seqs of each (device, boot_id) stream in a commit batch."""
    out: dict[Stream, set[int]] = defaultdict(set)
    for batch in batches:
        out[(batch.device, batch.boot_id)].add(batch.seq)
    return dict(out)


def dead_letter_receipts(letters: Iterable[DeadLetter], *, now_ms: int) -> list[Receipt]:
    """Receipts for dead-lettered batches of the device that published them (see above).

    Only letters keyed by classify or the store are answered: their payload decoded as a
    batch of the topic's own device.
    """
    streams: dict[Stream, set[int]] = defaultdict(set)
    for letter in letters:
        if letter.batch_key is not None:
            device, boot_id, seq = letter.batch_key
            streams[(device, boot_id)].add(seq)
    out: list[Receipt] = []
    for (device, boot_id), seqs in sorted(streams.items()):
        out.extend(receipts_for(device, boot_id, NO_WATERMARK, seqs, ts_ms=now_ms))
    return out


def advance_watermark(watermark: int, seqs_above: Iterable[int]) -> int:
    """The end of the contiguous run from `watermark` + 1 through sorted `seqs_above`."""
    for seq in seqs_above:
        if seq != watermark + 1:
            break
        watermark = seq
    return watermark


class ReceiptReader:
    """Builds receipts from the ledger for one worker (committer thread only)."""

    def __init__(self) -> None:
        self._watermarks: dict[Stream, int] = {}

    def receipts(
        self, conn: psycopg.Connection[Any], streams: dict[Stream, set[int]]
    ) -> list[Receipt]:
        """Receipts for `streams` (seqs just committed or found already committed).

        Only seqs the ledger holds are receipted: a batch the database refused is not.
        """
        now_ms = time.time_ns() // 1_000_000
        ordered = sorted(streams.items())
        olds = [self._watermarks.get(stream, NO_WATERMARK) for stream, _ in ordered]
        read: dict[int, list[int]] = defaultdict(list)
        rows = conn.execute(
            _SEQS_ABOVE,
            {
                "names": [device for (device, _), _ in ordered],
                "boots": [uuid.UUID(hex=boot_id) for (_, boot_id), _ in ordered],
                "above": olds,
                "limit": MAX_SEQS_READ,
            },
        ).fetchall()
        for index, seq in rows:
            read[int(index) - 1].append(int(seq))
        out: list[Receipt] = []
        for index, ((device, boot_id), committed) in enumerate(ordered):
            old = olds[index]
            seqs = read.get(index, [])
            watermark = advance_watermark(old, seqs)
            self._remember((device, boot_id), watermark)
            in_ledger = set(seqs)
            # The commit's own seqs beyond what was read must be checked too (a long hole).
            beyond = sorted(s for s in committed if s > watermark and s not in in_ledger)
            if beyond and len(seqs) == MAX_SEQS_READ:
                in_ledger |= self._present(conn, device, boot_id, beyond)
            listed = [s for s in in_ledger if s > watermark]
            out.extend(receipts_for(device, boot_id, watermark, listed, ts_ms=now_ms))
        return out

    def _present(
        self, conn: psycopg.Connection[Any], device: str, boot_id: str, seqs: list[int]
    ) -> set[int]:
        rows = conn.execute(
            "SELECT l.seq FROM ingest_ledger l JOIN devices d ON d.id = l.device_id"
            " WHERE d.name = %s AND l.boot_id = %s AND l.seq = ANY(%s)",
            (device, uuid.UUID(hex=boot_id), seqs),
        ).fetchall()
        return {int(r[0]) for r in rows}

    def _remember(self, stream: Stream, watermark: int) -> None:
        if watermark == NO_WATERMARK:
            return
        self._watermarks.pop(stream, None)
        self._watermarks[stream] = watermark  # newest last
        if len(self._watermarks) > MAX_CACHED_STREAMS:
            del self._watermarks[next(iter(self._watermarks))]
