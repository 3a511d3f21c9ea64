"""Receipts: after a commit, tell each device which of its batches the database holds.

An edge deletes a batch from its outbox only on a receipt (docs/guarantees.md), so
receipts are read back from the ledger after COMMIT, never from what this worker
remembers: a batch that is already in the ledger (a duplicate, resent because its
receipt was lost) is receipted again, and a restarted worker answers the same.

One query for all (device, boot_id) streams touched by the commit batch, one receipt
per stream. A receipt lists the commit's own seqs above the stream's watermark (the
end of its run of seqs contiguous from 0), never every seq above it: a stream with
holes (batches its outbox cap dropped, or a device sending every other seq) would
otherwise be answered with all its ranges again after every commit. The watermark is
cached per stream and advanced by reading at most WATERMARK_STEP seqs above it per
commit, so its cost stays bounded too; a lagging watermark only says less, the ranges
still cover every batch committed.

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

# Seqs read above a stream's cached watermark per commit to advance it: bounded work
# per stream and commit, whatever holes the stream has.
WATERMARK_STEP: Final = 256
# Streams whose watermark is cached; the oldest is forgotten first (it is re-read).
MAX_CACHED_STREAMS: Final = 100_000

# Per stream `i` of the commit batch: the ledger's seqs just above its cached watermark
# and which of the commit's seqs (`cs` for stream `ci`) the ledger holds, in one query.
_LEDGER_SEQS: Final = """
WITH s AS (
    SELECT s.i, d.id AS device_id, s.boot_id, s.above
    FROM unnest(%(names)s::text[], %(boots)s::uuid[], %(above)s::bigint[])
         WITH ORDINALITY AS s(name, boot_id, above, i)
    JOIN devices d ON d.name = s.name
)
SELECT s.i, l.seq FROM s CROSS JOIN LATERAL (
    SELECT seq FROM ingest_ledger
    WHERE device_id = s.device_id AND boot_id = s.boot_id
      AND seq > s.above AND seq <= s.above + %(step)s
) l
UNION
SELECT s.i, l.seq
FROM unnest(%(ci)s::bigint[], %(cs)s::bigint[]) AS c(i, seq)
JOIN s ON s.i = c.i
JOIN ingest_ledger l ON l.device_id = s.device_id AND l.boot_id = s.boot_id AND l.seq = c.seq
ORDER BY 1, 2
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
        commit_index = [i + 1 for i, (_, seqs) in enumerate(ordered) for _ in seqs]
        commit_seqs = [seq for _, seqs in ordered for seq in seqs]
        rows = conn.execute(
            _LEDGER_SEQS,
            {
                "names": [device for (device, _), _ in ordered],
                "boots": [uuid.UUID(hex=boot_id) for (_, boot_id), _ in ordered],
                "above": olds,
                "step": WATERMARK_STEP,
                "ci": commit_index,
                "cs": commit_seqs,
            },
        ).fetchall()
        read: dict[int, list[int]] = defaultdict(list)
        for index, seq in rows:
            read[int(index) - 1].append(int(seq))
        out: list[Receipt] = []
        for index, ((device, boot_id), committed) in enumerate(ordered):
            in_ledger = read.get(index, [])  # sorted by the query
            watermark = advance_watermark(olds[index], in_ledger)
            self._remember((device, boot_id), watermark)
            listed = set(in_ledger).intersection(committed)
            out.extend(receipts_for(device, boot_id, watermark, listed, ts_ms=now_ms))
        return out

    def _remember(self, stream: Stream, watermark: int) -> None:
        if watermark == NO_WATERMARK:
            return
        self._watermarks.pop(stream, None)
        self._watermarks[stream] = watermark  # newest last
        if len(self._watermarks) > MAX_CACHED_STREAMS:
            del self._watermarks[next(iter(self._watermarks))]
