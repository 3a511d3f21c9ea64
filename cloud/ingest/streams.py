"""Sequence streams and gaps: each (device, boot_id) stream's high-water mark and holes.

A gap is an inclusive range of seqs above which a later seq was already
committed. Batches may arrive out of order (two workers, redelivery after a
crash), so a late seq shrinks or splits an open gap instead of being an error.
`advance` is the pure bookkeeping; `record_streams` applies it to `ingest_streams`
and `sequence_gaps` inside the batch transaction, locking each stream's row so two
workers taking turns on one device see one high-water mark.
"""

from __future__ import annotations

import bisect
import logging
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import psycopg

from millrace.cloud.ingest.messages import Incoming

log = logging.getLogger(__name__)

Gap = tuple[int, int]
# Sorts after every (seq, high) pair with the same seq; seqs are at most 2**63 - 1.
_ABOVE_ANY_SEQ = 2**64


@dataclass(frozen=True, slots=True)
class StreamUpdate:
    """The stream's new high-water mark and open gaps after some new seqs."""

    max_seq: int
    gaps: tuple[Gap, ...]
    changed_gaps: bool
    opened: int  # gaps newly opened by seqs above the old high-water mark


def _remove(gaps: list[Gap], seq: int) -> bool:
    """Take `seq` out of the sorted, disjoint `gaps`; True if it was in one."""
    index = bisect.bisect_right(gaps, (seq, _ABOVE_ANY_SEQ)) - 1
    if index < 0:
        return False
    low, high = gaps[index]
    if not low <= seq <= high:
        return False
    pieces = [(a, b) for a, b in ((low, seq - 1), (seq + 1, high)) if a <= b]
    gaps[index : index + 1] = pieces
    return True


def advance(prev_max: int | None, gaps: Sequence[Gap], new_seqs: Iterable[int]) -> StreamUpdate:
    """Apply newly committed seqs (never seen before) to a stream's state.

    `prev_max` None means a stream never seen: its first seq counts as its start,
    because an agent's earlier batches may have been dropped by its outbox cap
    (reported separately in its health), and a late lower seq is simply stored.
    """
    seqs = sorted(set(new_seqs))
    if not seqs:
        raise ValueError("advance() needs at least one seq")
    current = seqs[0] - 1 if prev_max is None else prev_max
    open_gaps = sorted(gaps)
    changed = False
    opened = 0
    for seq in seqs:
        if seq <= current:
            changed |= _remove(open_gaps, seq)
        else:
            if seq > current + 1:
                open_gaps.append((current + 1, seq - 1))
                opened += 1
            current = seq
    return StreamUpdate(
        max_seq=current, gaps=tuple(open_gaps), changed_gaps=changed or opened > 0, opened=opened
    )


_STREAMS_INSERT: Final = """
INSERT INTO ingest_streams (device_id, boot_id, first_seq, max_seq, batches, first_at, last_at)
SELECT d, b, f, m, n, t, t FROM unnest(
    %b::int4[], %b::uuid[], %b::int8[], %b::int8[], %b::int8[], %b::timestamptz[])
    AS u(d, b, f, m, n, t)
ON CONFLICT DO NOTHING
RETURNING device_id, boot_id
"""

_STREAMS_LOCK: Final = """
SELECT s.device_id, s.boot_id, s.max_seq
FROM ingest_streams s
JOIN unnest(%b::int4[], %b::uuid[]) AS u(d, b) ON s.device_id = u.d AND s.boot_id = u.b
ORDER BY s.device_id, s.boot_id
FOR UPDATE OF s
"""

_STREAMS_UPDATE: Final = """
UPDATE ingest_streams s SET
    first_seq = least(s.first_seq, u.f), max_seq = u.m, batches = s.batches + u.n,
    last_at = greatest(s.last_at, u.t)
FROM unnest(%b::int4[], %b::uuid[], %b::int8[], %b::int8[], %b::int8[], %b::timestamptz[])
    AS u(d, b, f, m, n, t)
WHERE s.device_id = u.d AND s.boot_id = u.b
"""

_GAPS_SELECT: Final = """
SELECT g.device_id, g.boot_id, g.seq_from, g.seq_to
FROM sequence_gaps g
JOIN unnest(%b::int4[], %b::uuid[]) AS u(d, b) ON g.device_id = u.d AND g.boot_id = u.b
"""

_GAPS_DELETE: Final = """
DELETE FROM sequence_gaps g
USING unnest(%b::int4[], %b::uuid[]) AS u(d, b)
WHERE g.device_id = u.d AND g.boot_id = u.b
"""

_GAPS_INSERT: Final = """
INSERT INTO sequence_gaps (device_id, boot_id, seq_from, seq_to, detected_at)
SELECT * FROM unnest(%b::int4[], %b::uuid[], %b::int8[], %b::int8[], %b::timestamptz[])
ON CONFLICT (device_id, boot_id, seq_from) DO UPDATE SET seq_to = excluded.seq_to
"""


def record_streams(
    cur: psycopg.Cursor[Any], device_ids: Mapping[str, int], fresh: Sequence[Incoming]
) -> int:
    """Advance each (device, boot_id) high-water mark and record gaps; returns gaps opened."""
    seqs: dict[tuple[int, uuid.UUID], list[int]] = defaultdict(list)
    last_at: dict[tuple[int, uuid.UUID], datetime] = {}
    for item in fresh:
        b = item.batch
        key = (device_ids[b.device], uuid.UUID(hex=b.boot_id))
        seqs[key].append(b.seq)
        last_at[key] = max(last_at.get(key, item.received_at), item.received_at)
    keys = sorted(seqs)

    def columns(ks: list[tuple[int, uuid.UUID]], maxes: dict[object, int]) -> list[object]:
        return [
            [k[0] for k in ks],
            [k[1] for k in ks],
            [min(seqs[k]) for k in ks],
            [maxes[k] for k in ks],
            [len(seqs[k]) for k in ks],
            [last_at[k] for k in ks],
        ]

    updates: dict[tuple[int, uuid.UUID], StreamUpdate] = {
        k: advance(None, (), seqs[k]) for k in keys
    }
    cur.execute(_STREAMS_INSERT, columns(keys, {k: u.max_seq for k, u in updates.items()}))
    inserted = {(d, b) for d, b in cur.fetchall()}
    existing = [k for k in keys if k not in inserted]
    late: set[tuple[int, uuid.UUID]] = set()
    if existing:
        cur.execute(_STREAMS_LOCK, [[k[0] for k in existing], [k[1] for k in existing]])
        prev_max = {(d, b): m for d, b, m in cur.fetchall()}
        late = {k for k in existing if min(seqs[k]) <= prev_max[k]}
        open_gaps: dict[tuple[int, uuid.UUID], list[Gap]] = defaultdict(list)
        if late:
            ordered = sorted(late)
            cur.execute(_GAPS_SELECT, [[k[0] for k in ordered], [k[1] for k in ordered]])
            for device_id, boot, low, high in cur.fetchall():
                open_gaps[(device_id, boot)].append((low, high))
        for k in existing:
            updates[k] = advance(prev_max[k], open_gaps.get(k, ()), seqs[k])
        cur.execute(_STREAMS_UPDATE, columns(existing, {k: updates[k].max_seq for k in existing}))
        # Streams whose stored gaps shrank: rewrite their gap rows from the new state.
        rewrite = sorted(k for k in late if updates[k].changed_gaps)
        if rewrite:
            cur.execute(_GAPS_DELETE, [[k[0] for k in rewrite], [k[1] for k in rewrite]])
    # Late streams hold all their gaps in the update, the others only the new ones.
    rows = [
        (k[0], k[1], low, high)
        for k in keys
        if updates[k].changed_gaps
        for low, high in updates[k].gaps
    ]
    opened = sum(u.opened for u in updates.values())
    if rows:
        now = max(last_at.values())
        cur.execute(
            _GAPS_INSERT,
            [
                [r[0] for r in rows],
                [r[1] for r in rows],
                [r[2] for r in rows],
                [r[3] for r in rows],
                [now] * len(rows),
            ],
        )
    if opened:
        log.warning("sequence gaps opened=%s", opened)
    return opened
